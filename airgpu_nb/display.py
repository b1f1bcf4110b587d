"""What the magics and the panel show after a promotion: one MIME bundle, HTML and plain text."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dagbag import DagImportCheck
    from .promote import PromotionResult


def render_promotion(result: PromotionResult, check: DagImportCheck | None,
                     warning: str | None = None) -> dict[str, str]:
    """A MIME bundle (HTML and plain text) naming the DAG, the files, the DagBag verdict and the
    commands to run it; the magic and the panel show the same thing."""
    spec = result.spec
    commands = [f"airflow dags test {spec.dag_id}", f"airflow dags trigger {spec.dag_id}"]
    verdict = "not checked" if check is None else check.message
    lines = [f"Promoted DAG {spec.dag_id} (target {spec.target})",
             f"  wrote {result.dag_file}", f"  wrote {result.notebook_file}",
             f"  DagBag: {verdict}", f"  run it: {commands[0]}", f"  or: {commands[1]}"]
    lines += [f"  note: {note}" for note in result.notes]
    if warning:
        lines.insert(0, f"warning: {warning}")
    mark = {True: "✔", False: "✘", None: "-"}[None if check is None else check.ok]
    e = html.escape
    parts = []
    if warning:
        parts.append(f"<p class='airgpu-warning'><b>Warning:</b> {e(warning)}</p>")
    parts.append(
        f"<p>Promoted DAG <code>{e(spec.dag_id)}</code> (target <code>{e(spec.target)}</code>)"
        "</p><ul>"
        f"<li>wrote <code>{e(str(result.dag_file))}</code></li>"
        f"<li>wrote <code>{e(str(result.notebook_file))}</code></li>"
        f"<li>DagBag: {mark} {e(verdict)}</li></ul>"
        f"<p>Run it: <code>{e(commands[0])}</code> or <code>{e(commands[1])}</code></p>")
    if result.notes:
        parts.append("<ul class='airgpu-notes'>" + "".join(
            f"<li><b>Note:</b> {e(note)}</li>" for note in result.notes) + "</ul>")
    return {"text/html": "".join(parts), "text/plain": "\n".join(lines)}
