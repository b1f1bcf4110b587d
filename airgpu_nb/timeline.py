"""A run's timeline: the summaries that answer "how busy was the GPU" and how a run's samples
are written into the executed notebook.

What a run leaves in the notebook (:func:`annotate`):

- ``nb.metadata.airgpu.telemetry`` = ``{interval_s, samples, summary, gpu_available}``
- each executed code cell's ``metadata.airgpu.telemetry`` = that cell's summary, plus its
  ``start_s``/``end_s`` on the samples' clock

Standard library only at import time (the papermill engine imports it while papermill loads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .keys import METADATA_KEY
from .telemetry import Sampler

#: A GPU sample under this utilisation (percent) counts as idle in ``idle_fraction``.
IDLE_UTIL_PCT = 5.0
#: A 12-hour run at 1 s is 43,200 samples; beyond this many the stored timeline is thinned
#: (summaries are computed from every sample first).
MAX_STORED_SAMPLES = 20_000


# -- summaries -------------------------------------------------------------------------------


def summarise(samples: list[dict], interval_s: float, duration_s: float | None = None) -> dict:
    """The few numbers that answer "how busy was the GPU": for a run, a cell or a profile.

    ``duration_s`` overrides the span of the samples (a cell shorter than one interval still has
    a duration). GPU fields are None when there was no GPU data; utilisation is None when NVML
    did not report it (MIG slices). ``gpu_seconds`` is GPUs held x duration;
    ``idle_fraction`` the share of GPU readings under 5 % utilisation.
    """
    if duration_s is None:
        duration_s = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0.0
    cpu = [float(s.get("cpu_pct") or 0.0) for s in samples]
    rss = [float(s.get("rss_mb") or 0.0) for s in samples]
    gpu_rows = [s.get("gpus") or [] for s in samples]
    utils = [g["util_pct"] for row in gpu_rows for g in row if g.get("util_pct") is not None]
    devices = {(g.get("index"), g.get("uuid")) for row in gpu_rows for g in row}
    has_gpu = bool(devices)
    summary = {
        "duration_s": round(max(duration_s, 0.0), 3),
        "samples": len(samples),
        "gpu_count": len(devices),
        "gpu_util_mean": _round(sum(utils) / len(utils)) if utils else None,
        "gpu_util_p95": _round(percentile(utils, 95)) if utils else None,
        "gpu_mem_peak_mb": (_round(max(sum(g.get("mem_used_mb") or 0.0 for g in row)
                                       for row in gpu_rows)) if has_gpu else None),
        "gpu_seconds": _round(len(devices) * duration_s) if has_gpu else None,
        "idle_fraction": (_round(sum(u < IDLE_UTIL_PCT for u in utils) / len(utils), 3)
                          if utils else None),
        "cpu_pct_mean": _round(sum(cpu) / len(cpu)) if cpu else None,
        "cpu_pct_peak": _round(max(cpu)) if cpu else None,
        "rss_peak_mb": _round(max(rss)) if rss else None,
    }
    return summary


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _round(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


# -- a run's timeline in the notebook ------------------------------------------------------------


class RunRecorder:
    """One run's sampler and the span of each cell on the samples' clock."""

    def __init__(self, interval_s: float, pid: int | None = None) -> None:
        self.sampler = Sampler(interval_s, pid=pid)
        self.spans: dict[int, list[float]] = {}

    def start(self) -> None:
        self.sampler.start()

    def cell_started(self, index: int) -> None:
        now = round(self.sampler.elapsed(), 4)
        self.spans[index] = [now, now]

    def cell_finished(self, index: int) -> None:
        if index in self.spans:
            self.spans[index][1] = round(self.sampler.elapsed(), 4)

    def finish(self, nb: Any) -> dict:
        """Stop sampling and write the timeline into ``nb``; returns the run's telemetry."""
        samples = self.sampler.stop()
        return annotate(nb, samples, self.sampler.interval_s,
                        {i: (a, b) for i, (a, b) in self.spans.items()},
                        gpu_available=self.sampler.gpu_available)


def annotate(nb: Any, samples: list[dict], interval_s: float,
             spans: Mapping[int, tuple[float, float]], gpu_available: bool = False) -> dict:
    """Write the run's and each executed code cell's telemetry into ``nb``; returns the run's.

    ``spans`` maps a cell's index to its (start, end) on the samples' clock.
    """
    import nbformat

    telemetry = {
        "interval_s": interval_s,
        "gpu_available": bool(gpu_available or any(s.get("gpus") for s in samples)),
        "summary": summarise(samples, interval_s),
        "samples": _thin(samples, MAX_STORED_SAMPLES),
    }
    namespace = dict(nb.metadata.get(METADATA_KEY) or {})
    namespace["telemetry"] = telemetry
    nb.metadata[METADATA_KEY] = nbformat.from_dict(namespace)
    for index, (start, end) in sorted(spans.items()):
        if index >= len(nb.cells) or nb.cells[index].get("cell_type") != "code":
            continue
        cell_summary = summarise(cell_samples(samples, start, end), interval_s,
                                 duration_s=end - start)
        cell_summary.update(start_s=round(start, 3), end_s=round(end, 3))
        cell_meta = dict(nb.cells[index].metadata.get(METADATA_KEY) or {})
        cell_meta["telemetry"] = cell_summary
        nb.cells[index].metadata[METADATA_KEY] = nbformat.from_dict(cell_meta)
    return telemetry


def cell_samples(samples: list[dict], start: float, end: float) -> list[dict]:
    """The samples taken while a cell ran; for a cell shorter than one interval, the first
    sample after it (NVML utilisation and psutil CPU both average over the preceding period,
    so that sample covers the cell)."""
    inside = [s for s in samples if start <= s["t"] <= end]
    if inside:
        return inside
    after = next((s for s in samples if s["t"] > end), None)
    return [after] if after is not None else []


def _thin(samples: list[dict], limit: int) -> list[dict]:
    if len(samples) <= limit:
        return list(samples)
    step = -(-len(samples) // limit)
    thinned = samples[::step]
    if thinned[-1] is not samples[-1]:
        thinned.append(samples[-1])
    return thinned
