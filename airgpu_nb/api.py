"""Core calls the shells share beyond ``promote()``: run a notebook as its DAG task would, and
ask Airflow whether a written DAG file imports.

The CLI, the magics and the panel call these so that no behaviour lives in only one shell.
Nothing heavy is imported at module import time (no papermill, Airflow or TensorFlow).
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# Re-exported: the run lives in run.py beside execute(); callers keep ``api.run_notebook``.
from .run import run_notebook as run_notebook

if TYPE_CHECKING:
    from .promote import PromotionResult

# Runs in a child process: importing Airflow configures logging, settings and plugins, which a
# user's kernel should not inherit, and a broken DAG must not take the kernel down with it.
_DAGBAG_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
try:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:
        from airflow.models.dagbag import DagBag
except ImportError as exc:
    print("AIRGPU_DAGBAG " + json.dumps({"airflow": False, "error": str(exc)}))
    sys.exit(0)
bag = DagBag(dag_folder=sys.argv[1])
print("AIRGPU_DAGBAG " + json.dumps({
    "airflow": True,
    "dag_ids": sorted(bag.dag_ids),
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
}))
"""
_MARKER = "AIRGPU_DAGBAG "


@dataclass(frozen=True)
class DagImportCheck:
    """Whether Airflow's DagBag imports a DAG file: ``ok`` is None when Airflow is absent."""

    ok: bool | None
    message: str
    dag_ids: tuple[str, ...] = ()
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)


def check_dag_import(dag_file: str | os.PathLike[str], dag_id: str | None = None,
                     timeout: float = 300.0) -> DagImportCheck:
    """Parse ``dag_file`` with Airflow's DagBag in a child process and say what it found."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _DAGBAG_SCRIPT, str(dag_file)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return DagImportCheck(False, f"DagBag did not finish within {timeout:.0f} s")
    seconds = time.perf_counter() - start
    found = [line[len(_MARKER):] for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if not found:
        tail = _last_line(proc.stderr) or f"exit code {proc.returncode}"
        return DagImportCheck(False, f"DagBag check crashed: {tail}", seconds=seconds)
    data = json.loads(found[-1])
    if not data["airflow"]:
        return DagImportCheck(None, "skipped: Airflow is not installed in this environment",
                              seconds=seconds)
    errors = data["import_errors"]
    ids = tuple(data["dag_ids"])
    if errors:
        first = _last_line(next(iter(errors.values())))
        return DagImportCheck(False, f"import error: {first}", ids, seconds, errors)
    if dag_id is not None and dag_id not in ids:
        return DagImportCheck(False, f"the file imports but defines no DAG {dag_id!r}", ids,
                              seconds)
    return DagImportCheck(True, f"imports cleanly in Airflow's DagBag ({', '.join(ids)})", ids,
                          seconds)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


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
