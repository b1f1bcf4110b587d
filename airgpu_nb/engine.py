"""The ``airgpu`` papermill engine: nbclient plus a GPU/CPU timeline attributed to cells.

papermill loads every ``papermill.engine`` entry point while ``papermill.engines`` itself is
still being imported, so this module imports nothing heavy and builds ``AirgpuEngine`` on first
attribute access (PEP 562). Importing it first, or from papermill, can never fail or cycle.

What a run leaves (also when it fails, with the partial timeline):

- ``nb.metadata.airgpu.telemetry`` = ``{interval_s, samples, summary, gpu_available}``
- each executed code cell's ``metadata.airgpu.telemetry`` = that cell's summary, plus its
  ``start_s``/``end_s`` on the samples' clock
- a markdown note tagged ``airgpu-idle-warning`` at the top when GPUs were requested and sat idle
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from .telemetry import Sampler, summarise

log = logging.getLogger(__name__)

METADATA_KEY = "airgpu"  # the same namespace inject.py keeps the promotion settings under
INTERVAL_ENV = "AIRGPU_TELEMETRY_INTERVAL"
IDLE_THRESHOLD_ENV = "AIRGPU_IDLE_THRESHOLD"
DEFAULT_INTERVAL_S = 1.0
DEFAULT_IDLE_THRESHOLD_PCT = 20.0
IDLE_TAG = "airgpu-idle-warning"
#: papermill passes unknown ``execute_notebook`` keywords to the engine; ``run.execute`` hands
#: a dict under this name and gets the run's telemetry back in it (no second read of the file).
SINK_KWARG = "airgpu_telemetry"
#: A 12-hour run at 1 s is 43,200 samples; beyond this many the stored timeline is thinned
#: (summaries are computed from every sample first).
MAX_STORED_SAMPLES = 20_000
MIN_INTERVAL_S = 0.05


def interval_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Sampling interval from $AIRGPU_TELEMETRY_INTERVAL; a bad value warns and uses 1 s."""
    return _float_env(environ, INTERVAL_ENV, DEFAULT_INTERVAL_S, minimum=MIN_INTERVAL_S)


def idle_threshold_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Mean GPU utilisation (percent) under which a run counts as idle."""
    return _float_env(environ, IDLE_THRESHOLD_ENV, DEFAULT_IDLE_THRESHOLD_PCT, minimum=0.0)


def _float_env(environ: Mapping[str, str] | None, name: str, default: float,
               minimum: float) -> float:
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # also catches nan
        log.warning("airgpu: ignoring %s=%r (want a number >= %s); using %s", name, raw,
                    minimum, default)
        return default
    return value


class RunRecorder:
    """One run's sampler and cell spans; writes them into the notebook when the run ends."""

    def __init__(self, interval_s: float, pid: int | None = None) -> None:
        self.sampler = Sampler(interval_s, pid=pid)
        self.spans: dict[int, list[float]] = {}

    def start(self) -> None:
        self.sampler.start()

    def cell_started(self, index: int) -> None:
        self.sampler.mark(f"cell {index}")
        self.spans[index] = [self.sampler.marks[-1]["t"], self.sampler.marks[-1]["t"]]

    def cell_finished(self, index: int) -> None:
        if index in self.spans:
            self.spans[index][1] = round(self.sampler.elapsed(), 4)

    def finish(self, nb: Any, sink: MutableMapping[str, Any] | None = None) -> dict | None:
        """Stop sampling, annotate ``nb`` and warn about an idle GPU. Never raises: losing the
        timeline must not fail a run that otherwise worked."""
        try:
            samples = self.sampler.stop()
            telemetry = annotate(nb, samples, self.sampler.interval_s,
                                 {i: (a, b) for i, (a, b) in self.spans.items()},
                                 gpu_available=self.sampler.gpu_available)
            warn_if_idle(nb, telemetry)
        except Exception as exc:
            log.warning("airgpu: telemetry could not be recorded: %s", exc, exc_info=True)
            return None
        if sink is not None:
            sink.update(telemetry=telemetry, settings=_settings(nb))
        return telemetry


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


def _settings(nb: Any) -> dict:
    return dict((nb.metadata.get(METADATA_KEY) or {}).get("settings") or {})


def gpus_requested(nb: Any) -> int:
    """GPUs the promotion asked for (``metadata.airgpu.settings``): 'all' and a MIG slice
    count as at least one; 0 when the notebook was not promoted."""
    settings = _settings(nb)
    count = settings.get("gpus")
    if settings.get("mig"):
        return 1
    if count == "all":
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
    """Put the note at the top (replacing an old one), or remove a stale one."""
    import nbformat

    nb.cells = [c for c in nb.cells if IDLE_TAG not in c.get("metadata", {}).get("tags", [])]
    if message is None:
        return
    note = nbformat.v4.new_markdown_cell(message, metadata={"tags": [IDLE_TAG]})
    note.pop("id", None)
    note["id"] = IDLE_TAG
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


def first_line(source: str | list[str], width: int = 60) -> str:
    text = "".join(source) if isinstance(source, list) else str(source)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "\u2026"


def _kernel_pid(km: Any) -> int | None:
    """The kernel's process id, when its provisioner is a local process."""
    pid = getattr(getattr(km, "provisioner", None), "pid", None)
    if pid is None:
        pid = getattr(getattr(km, "kernel", None), "pid", None)
    return pid if isinstance(pid, int) else None


def _build_engine() -> type:
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    class TelemetryNotebookClient(PapermillNotebookClient):
        """papermill's client with the sampler running while cells execute."""

        def __init__(self, nb_man: Any, sink: MutableMapping[str, Any] | None = None,
                     **kwargs: Any) -> None:
            super().__init__(nb_man, **kwargs)
            self.airgpu_sink = sink
            self.airgpu_recorder: RunRecorder | None = None

        def papermill_execute_cells(self) -> None:
            # The kernel is up by now: sample its process tree, not papermill's.
            recorder = RunRecorder(interval_from_env(), pid=_kernel_pid(self.km))
            try:
                recorder.start()
            except Exception as exc:
                log.warning("airgpu: telemetry off for this run: %s", exc)
                return super().papermill_execute_cells()
            self.airgpu_recorder = recorder
            try:
                super().papermill_execute_cells()
            finally:
                self.airgpu_recorder = None
                recorder.finish(self.nb, self.airgpu_sink)

        def execute_cell(self, cell: Any, cell_index: int, *args: Any, **kwargs: Any) -> Any:
            recorder = self.airgpu_recorder
            if recorder is None or cell.get("cell_type") != "code":
                return super().execute_cell(cell, cell_index, *args, **kwargs)
            recorder.cell_started(cell_index)
            try:
                return super().execute_cell(cell, cell_index, *args, **kwargs)
            finally:
                recorder.cell_finished(cell_index)

    class AirgpuEngine(NBClientEngine):
        """papermill's nbclient engine, recording GPU telemetry into the executed notebook."""

        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str,
                                     log_output: bool = False, stdout_file: Any = None,
                                     stderr_file: Any = None, start_timeout: int = 60,
                                     execution_timeout: int | None = None,
                                     **kwargs: Any) -> Any:
            sink = kwargs.pop(SINK_KWARG, None)
            # Same argument handling as NBClientEngine, with our client.
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final_kwargs = merge_kwargs(
                safe_kwargs,
                timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
                startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file,
            )
            return TelemetryNotebookClient(nb_man, sink=sink, **final_kwargs).execute()

    AirgpuEngine.__module__ = __name__
    AirgpuEngine.__qualname__ = "AirgpuEngine"
    TelemetryNotebookClient.__module__ = __name__
    return AirgpuEngine


def __getattr__(name: str) -> Any:
    if name == "AirgpuEngine":
        engine = _build_engine()
        globals()[name] = engine
        return engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
