"""``%%airgpu profile``: run one cell under the shared telemetry sampler, then show a summary and
a small timeline drawn by :func:`airgpu_nb.report.plot`, the same drawing as `airgpu report --png`.
"""

from __future__ import annotations

import base64
import html
import os
import time
from typing import Any

from IPython.display import display

from . import report
from .telemetry import Sampler
from .timeline import summarise

#: The profile's timeline: the report's figure, smaller (512 x 320 pixels) to sit under a cell.
PLOT_OPTIONS: dict[str, Any] = {"title": "airgpu profile", "size": (6.4, 4.0), "dpi": 80,
                                "xlabel": "seconds since the cell started"}


def profile_cell(shell: Any, cell: str, interval_s: float) -> dict[str, Any]:
    """Run ``cell`` in the user's namespace while the sampler watches this kernel and the GPUs;
    show the summary and the timeline, return the summary (raw samples under ``timeline``)."""
    sampler = Sampler(interval_s=interval_s, pid=os.getpid())
    sampler.start()
    start = time.perf_counter()
    try:
        outcome = shell.run_cell(cell, store_history=False)
    finally:
        samples = sampler.stop()
    wall = time.perf_counter() - start
    summary = dict(summarise(samples, interval_s, duration_s=wall))
    summary["wall_s"] = round(wall, 3)
    summary["gpu_available"] = bool(sampler.gpu_available)
    summary["gpu_util_peak"] = max((g["util_pct"] for s in samples for g in s.get("gpus") or []
                                    if g.get("util_pct") is not None), default=None)
    summary["cell_failed"] = not outcome.success
    bundle = profile_bundle(summary)
    png = profile_plot(samples)
    if png is not None:
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
    display(bundle, raw=True)
    summary["timeline"] = samples
    return summary


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def profile_bundle(summary: dict[str, Any]) -> dict[str, str]:
    """The profile summary as text and HTML; without a GPU it says so instead of zeros."""
    rows = [("wall time", _fmt(summary["wall_s"], " s", 2))]
    if summary["gpu_available"]:
        rows += [("GPU utilisation mean / p95 / peak",
                  f"{_fmt(summary.get('gpu_util_mean'), '%')} / "
                  f"{_fmt(summary.get('gpu_util_p95'), '%')} / "
                  f"{_fmt(summary.get('gpu_util_peak'), '%')}"),
                 ("GPU memory peak", _fmt(summary.get("gpu_mem_peak_mb"), " MiB", 0)),
                 ("GPU-seconds held", _fmt(summary.get("gpu_seconds"), " s", 2)),
                 ("GPU idle fraction", _fmt(summary.get("idle_fraction"), "", 2))]
    else:
        rows.append(("GPU", "no GPU: NVML sees no NVIDIA GPU here, so only CPU and memory "
                            "were sampled"))
    rows += [("kernel CPU mean / peak", f"{_fmt(summary.get('cpu_pct_mean'), '%')} / "
                                        f"{_fmt(summary.get('cpu_pct_peak'), '%')}"),
             ("kernel memory peak (RSS)", _fmt(summary.get("rss_peak_mb"), " MiB", 0))]
    if summary.get("cell_failed"):
        rows.append(("cell", "raised an error (shown above); the profile covers the run up to it"))
    text = "airgpu profile\n" + "\n".join(f"  {k:<34} {v}" for k, v in rows)
    table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
    return {"text/plain": text, "text/html": f"<div class='airgpu-profile'><b>airgpu profile"
            f"</b><table><tbody>{table}</tbody></table></div>"}


def profile_plot(samples: list[dict[str, Any]]) -> bytes | None:
    """The timeline as PNG bytes, or None when there are too few samples to draw a line."""
    if len(samples) < 2:
        return None
    return report.plot(samples, **PLOT_OPTIONS)
