"""Advice when a run held a GPU and barely used it: a log warning and a markdown note, tagged
``airgpu-idle-warning``, at the top of the executed notebook.

Reads only the telemetry :func:`airgpu_nb.timeline.annotate` wrote. Standard library only at
import time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .keys import IDLE_TAG, METADATA_KEY, cell_tags, first_line, set_cell_id
from .telemetry import float_env

log = logging.getLogger(__name__)

IDLE_THRESHOLD_ENV = "AIRGPU_IDLE_THRESHOLD"
DEFAULT_IDLE_THRESHOLD_PCT = 20.0


def idle_threshold_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Mean GPU utilisation (percent) under which a run counts as idle."""
    return float_env(IDLE_THRESHOLD_ENV, DEFAULT_IDLE_THRESHOLD_PCT, minimum=0.0,
                     environ=environ)


def settings(nb: Any) -> dict:
    """The promotion settings recorded in the notebook (``metadata.airgpu.settings``)."""
    return dict((nb.metadata.get(METADATA_KEY) or {}).get("settings") or {})


def gpus_requested(nb: Any) -> int:
    """GPUs the promotion asked for: 'all' and a MIG slice count as at least one; 0 when the
    notebook was not promoted."""
    chosen = settings(nb)
    count = chosen.get("gpus")
    if chosen.get("mig") or count == "all":
        return 1
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def idle_cells(nb: Any, threshold: float, limit: int = 3) -> list[dict]:
    """Cells under ``threshold`` utilisation, the most idle GPU time first."""
    found = []
    for index, cell in enumerate(nb.cells):
        summary = (cell.get("metadata", {}).get(METADATA_KEY) or {}).get("telemetry") or {}
        util = summary.get("gpu_util_mean")
        if cell.get("cell_type") != "code" or util is None or util >= threshold:
            continue
        idle_s = summary.get("duration_s", 0.0) * (1 - util / 100)
        found.append({"index": index, "execution_count": cell.get("execution_count"),
                      "source": first_line(cell.get("source", "")), "util": util,
                      "duration_s": summary.get("duration_s", 0.0), "idle_s": idle_s})
    found.sort(key=lambda c: -c["idle_s"])
    return found[:limit]


def idle_message(nb: Any, telemetry: Mapping[str, Any], threshold: float) -> str | None:
    """The idle-GPU note's markdown, or None when the GPU was busy enough, not requested or
    not measured (no GPU data is not evidence of an idle GPU)."""
    requested = gpus_requested(nb)
    summary = telemetry.get("summary") or {}
    mean = summary.get("gpu_util_mean")
    if requested <= 0 or mean is None or mean >= threshold:
        return None
    lines = [
        f"**airgpu: the GPU sat mostly idle in this run.** Mean utilisation was {mean:.1f} % "
        f"(warning under {threshold:g} %) over {summary.get('duration_s', 0):.1f} s, with "
        f"{requested} GPU(s) requested; {100 * (summary.get('idle_fraction') or 0):.0f} % of "
        "readings were idle.",
        "",
    ]
    cells = idle_cells(nb, threshold)
    if cells:
        lines.append("Least busy cells:")
        lines += [f"- {_cell_name(c)} `{c['source']}`: {c['util']:.1f} % over "
                  f"{c['duration_s']:.1f} s" for c in cells]
        lines.append("")
    lines += [
        "Suggestions:",
        "- **Larger batches**: raise `batch_size` (and scale the learning rate) until GPU "
        "utilisation or memory rises.",
        "- **Input pipeline prefetching**: keep the GPU fed with `tf.data`: "
        "`ds.map(f, num_parallel_calls=tf.data.AUTOTUNE).cache().prefetch(tf.data.AUTOTUNE)`.",
        "- **A MIG slice**: a small model may fit one, e.g. `airgpu promote --target kubernetes "
        "--mig 1g.10gb`, leaving the rest of the GPU to others.",
        "- **Fewer GPUs**: request fewer with `--gpus`, or `--gpus 0 --allow-cpu` for a "
        "notebook that hardly uses one.",
        "",
        f"_Threshold: ${IDLE_THRESHOLD_ENV} (default {DEFAULT_IDLE_THRESHOLD_PCT:g} %). "
        "Per-cell figures: `airgpu report` on this notebook._",
    ]
    return "\n".join(lines)


def apply_idle_note(nb: Any, message: str | None) -> None:
    """Put the note at the top (replacing an old one), or remove a stale one.

    The note gets a cell id only where the notebook's nbformat has ids (4.5 on): an id in a
    4.0-4.4 notebook fails validation.
    """
    import nbformat

    nb.cells = [c for c in nb.cells if IDLE_TAG not in cell_tags(c)]
    if message is None:
        return
    note = nbformat.v4.new_markdown_cell(message, metadata={"tags": [IDLE_TAG]})
    set_cell_id(nb, note, IDLE_TAG)
    # papermill's own bookkeeping expects this on every cell before it finishes the run.
    note.metadata["papermill"] = {"status": "completed", "exception": None,
                                  "start_time": None, "end_time": None, "duration": None}
    nb.cells.insert(0, note)


def warn_if_idle(nb: Any, telemetry: Mapping[str, Any],
                 threshold: float | None = None) -> str | None:
    """Log the idle-GPU warning and add or clear the note; returns the note's text."""
    threshold = idle_threshold_from_env() if threshold is None else threshold
    apply_idle_note(nb, None)  # first, so that cell numbers do not count an old note
    message = idle_message(nb, telemetry, threshold)
    cells = idle_cells(nb, threshold) if message is not None else []
    apply_idle_note(nb, message)
    if message is not None:
        names = ", ".join(f"{_cell_name(c)} ({c['util']:.0f} %)" for c in cells) \
            or "none measured"
        log.warning("airgpu: GPU mostly idle: mean utilisation %.1f %% < %g %%; least busy "
                    "cells: %s. See the note at the top of the executed notebook.",
                    telemetry["summary"]["gpu_util_mean"], threshold, names)
    return message


def _cell_name(cell: Mapping[str, Any]) -> str:
    count = cell.get("execution_count")
    return f"In [{count}]" if count else f"cell {cell['index']}"
