"""`airgpu report`: how busy the GPU was in each cell of an executed notebook, as a table, JSON
or a PNG timeline. Reads only what the ``airgpu`` engine wrote into the notebook."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import NotebookError
from .keys import METADATA_KEY, first_line
from .timeline import summarise

#: ``airgpu report --png``: a full-width figure, 1000 x 550 pixels.
REPORT_SIZE = (10.0, 5.5)
REPORT_DPI = 100


def load(path: str | os.PathLike[str]) -> tuple[Any, dict]:
    """The notebook and its run telemetry, checked against ``schemas/telemetry.schema.json``;
    ``NotebookError`` when there is none, or when it is not what the engine writes."""
    from .notebook import read_notebook

    nb = read_notebook(path)
    namespace = nb.metadata.get(METADATA_KEY)
    telemetry = namespace.get("telemetry") if isinstance(namespace, Mapping) else None
    if telemetry is None:
        raise NotebookError(f"{path} has no airgpu telemetry: run it with `airgpu run` or its "
                            "DAG (telemetry on) and report on the executed notebook")
    _check(telemetry, "", f"{path}: metadata.{METADATA_KEY}.telemetry")
    for index, cell in enumerate(nb.cells):
        cell_namespace = cell.get("metadata", {}).get(METADATA_KEY)
        if isinstance(cell_namespace, Mapping) and "telemetry" in cell_namespace:
            _check(cell_namespace["telemetry"], "cell", f"{path}: cell {index}'s telemetry")
        elif cell_namespace is not None and not isinstance(cell_namespace, Mapping):
            raise NotebookError(f"{path}: cell {index}'s metadata.{METADATA_KEY} is not an "
                                "object: not written by airgpu")
    return nb, dict(telemetry)


@cache
def _validator(definition: str) -> Any:
    import jsonschema  # nbformat's own dependency

    schema = json.loads(resources.files(__package__).joinpath(
        "schemas/telemetry.schema.json").read_text(encoding="utf-8"))
    if definition:
        schema = {**schema, "$ref": f"#/$defs/{definition}"}
        for key in ("type", "required", "properties"):
            schema.pop(key, None)
    return jsonschema.Draft202012Validator(schema)


def _check(value: Any, definition: str, where: str) -> None:
    error = next(iter(_validator(definition).iter_errors(value)), None)
    if error is not None:
        at = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise NotebookError(f"{where} is damaged at {at} ({first_line(error.message)[:120]}): "
                            "not as the airgpu engine writes it; run the notebook again")


def build(nb: Any, telemetry: Mapping[str, Any]) -> dict:
    """The report as data: run summary plus one row per code cell that ran."""
    interval = float(telemetry.get("interval_s") or 1.0)
    summary = telemetry.get("summary") or summarise(telemetry["samples"], interval)
    cells = []
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        stats = (cell.metadata.get(METADATA_KEY) or {}).get("telemetry")
        if not stats:
            continue
        cells.append({
            "index": index, "execution_count": cell.get("execution_count"),
            "source": first_line(cell.get("source", "")),
            "start_s": stats.get("start_s"), "end_s": stats.get("end_s"),
            "duration_s": stats.get("duration_s"), "samples": stats.get("samples"),
            "gpu_util_mean": stats.get("gpu_util_mean"),
            "gpu_mem_peak_mb": stats.get("gpu_mem_peak_mb"),
            "cpu_pct_mean": stats.get("cpu_pct_mean"),
        })
    return {"interval_s": interval, "gpu_available": bool(telemetry.get("gpu_available")),
            "summary": dict(summary), "cells": cells}


def render_text(report: Mapping[str, Any], width: int = 48) -> str:
    """A fixed-width table, one line per cell, then the run's summary."""
    header = (f"{'cell':>4} {'In':>5} {'duration':>9} {'GPU util':>9} {'GPU mem peak':>13} "
              f"{'CPU mean':>9}  source")
    lines = [header, "-" * len(header)]
    for row in report["cells"]:
        count = row["execution_count"]
        lines.append(
            f"{row['index']:>4} {f'[{count}]' if count else '':>5} "
            f"{_num(row['duration_s'], ' s', 2):>9} {_num(row['gpu_util_mean'], ' %'):>9} "
            f"{_num(row['gpu_mem_peak_mb'], ' MiB', 0):>13} {_num(row['cpu_pct_mean'], ' %'):>9}"
            f"  {row['source'][:width]}")
    s = report["summary"]
    lines += [
        "",
        f"run: {_num(s.get('duration_s'), ' s', 2)}, {s.get('samples', 0)} samples every "
        f"{report['interval_s']:g} s, {s.get('gpu_count') or 0} GPU(s) sampled",
        f"GPU: utilisation mean {_num(s.get('gpu_util_mean'), ' %')}, p95 "
        f"{_num(s.get('gpu_util_p95'), ' %')}, idle {_pct(s.get('idle_fraction'))} of readings, "
        f"memory peak {_num(s.get('gpu_mem_peak_mb'), ' MiB', 0)}, "
        f"{_num(s.get('gpu_seconds'), ' GPU-seconds', 1)}",
        f"CPU: mean {_num(s.get('cpu_pct_mean'), ' %')}, peak {_num(s.get('cpu_pct_peak'), ' %')}"
        f" (of one core); RSS peak {_num(s.get('rss_peak_mb'), ' MiB', 0)}",
    ]
    if not s.get("gpu_count"):
        lines.append("no GPU data: NVML saw no GPU during this run")
    return "\n".join(lines)


def _num(value: Any, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def cell_marks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Where each cell of ``build()``'s report started, labelled ``[In]`` (or ``#index``)."""
    return [{"t": row["start_s"],
             "label": f"[{row['execution_count']}]" if row["execution_count"]
             else f"#{row['index']}"}
            for row in report["cells"] if row.get("start_s") is not None]


def plot(samples: Sequence[Mapping[str, Any]], marks: Sequence[Mapping[str, Any]] = (), *,
         title: str = "", xlabel: str = "seconds since the first cell started",
         size: tuple[float, float] = REPORT_SIZE, dpi: int = REPORT_DPI) -> bytes:
    """GPU utilisation and memory over time (CPU and RSS when there was no GPU), with a dashed
    line at each mark (``{"t": seconds, "label": text}``), as PNG bytes.

    One drawing for `airgpu report --png` and `%%airgpu profile`. ``Figure`` directly, never
    pyplot: no backend switch or global state in a user's kernel, and it works headless.
    """
    from matplotlib.figure import Figure

    times = [s["t"] for s in samples]
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    devices = sorted({(g["index"], g["uuid"]) for s in samples for g in s.get("gpus") or ()})
    if devices:
        for index, uuid in devices:
            label = f"GPU {index}" + (f" {uuid[:12]}" if uuid.startswith("MIG-") else "")
            rows = [_reading(s, index, uuid) for s in samples]
            util = [float("nan") if r is None or r.get("util_pct") is None else r["util_pct"]
                    for r in rows]
            mem = [float("nan") if r is None else r.get("mem_used_mb", 0.0) for r in rows]
            top.plot(times, util, label=label)
            bottom.plot(times, mem, label=label)
        top.set_ylabel("GPU util (%)")
        top.set_ylim(0, 105)
        bottom.set_ylabel("GPU memory (MiB)")
    else:
        top.plot(times, [s.get("cpu_pct", 0.0) for s in samples], label="CPU", color="tab:red")
        top.set_ylabel("CPU (% of one core)")
        bottom.plot(times, [s.get("rss_mb", 0.0) for s in samples], label="RSS",
                    color="tab:purple")
        bottom.set_ylabel("memory RSS (MiB)")
        title = f"{title} (no GPU data: CPU shown)".strip()
    for mark in marks:
        for axis in (top, bottom):
            axis.axvline(mark["t"], color="0.6", linewidth=0.8, linestyle="--")
        top.annotate(str(mark.get("label", "")), (mark["t"], 1.0),
                     xycoords=("data", "axes fraction"), fontsize=7, color="0.35",
                     xytext=(2, -10), textcoords="offset points")
    bottom.set_xlabel(xlabel)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "airgpu telemetry")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _reading(sample: Mapping[str, Any], index: int, uuid: str) -> Mapping[str, Any] | None:
    return next((g for g in sample.get("gpus") or () if g["index"] == index and
                 g["uuid"] == uuid), None)


def report(path: str | os.PathLike[str], png: str | os.PathLike[str] | None = None) -> dict:
    """Load, build and (optionally) draw: what `airgpu report` prints."""
    target = None if png is None else _png_target(png)
    nb, telemetry = load(path)
    result = build(nb, telemetry)
    result["notebook"] = str(path)
    if target is not None:
        image = plot(telemetry["samples"], cell_marks(result), title=Path(path).name)
        _write_atomically(target, image)
        result["png"] = str(target)
    return result


def _png_target(png: str | os.PathLike[str]) -> Path:
    """``--png FILE`` checked before anything is drawn: a ``.png`` file, not a folder."""
    target = Path(png)
    if target.is_dir():
        raise NotebookError(f"--png {png}: is a folder; give a file name such as "
                            f"{target / 'report.png'}")
    if target.suffix.lower() != ".png":
        raise NotebookError(f"--png {png}: the file name must end in .png (the drawing is a "
                            "PNG image)")
    return target


def _write_atomically(target: Path, data: bytes) -> None:
    """A temporary file beside ``target``, then a rename: a reader never sees half a PNG."""
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise NotebookError(f"--png {target}: cannot write it: {exc.strerror or exc}") from None
