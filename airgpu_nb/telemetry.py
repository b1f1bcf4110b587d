"""The GPU and CPU sampler behind every run's timeline and ``%%airgpu profile``.

One background thread reads, at a fixed interval, each visible GPU through NVML (utilisation,
memory, power) and the CPU and memory of a process tree through psutil. NVML handles and
``psutil.Process`` objects are kept across samples so that a sample costs well under a
millisecond of CPU per GPU: sampling must never be what slows a training run down.

Nothing here imports NVML or starts a thread until :meth:`Sampler.start`; the module itself
imports only the standard library (the papermill engine imports it while papermill loads).

What a run leaves in the notebook is in :mod:`airgpu_nb.timeline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MB = 2**20
INTERVAL_ENV = "AIRGPU_TELEMETRY_INTERVAL"
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.05


def interval_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Sampling interval from $AIRGPU_TELEMETRY_INTERVAL; a bad value warns and uses 1 s."""
    return float_env(INTERVAL_ENV, DEFAULT_INTERVAL_S, minimum=MIN_INTERVAL_S, environ=environ)


def float_env(name: str, default: float, minimum: float,
              environ: Mapping[str, str] | None = None) -> float:
    """A number from the environment; a bad one is a warning and the default, never a failed
    run (environment variables are set by operators, far from the notebook)."""
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


@dataclass
class _Gpu:
    """One sampled device: a whole GPU or one MIG slice (``mig``)."""

    index: int
    uuid: str
    handle: Any
    mig: bool
    util_supported: bool = True
    power_supported: bool = True


class Sampler:
    """Samples a process tree and the visible GPUs on a daemon thread.

    ``pid`` is the root of the process tree to measure (default: this process); its children are
    included, so a kernel's data-loader workers count. ``gpu_indices`` limits NVML devices
    (default: those named by ``CUDA_VISIBLE_DEVICES``, else all).
    """

    def __init__(self, interval_s: float = 1.0, pid: int | None = None,
                 gpu_indices: list[int] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s!r}")
        self.interval_s = float(interval_s)
        self.pid = os.getpid() if pid is None else int(pid)
        self.gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self.samples: list[dict] = []
        self.marks: list[dict] = []
        self.gpu_available = False
        #: CPU seconds spent taking samples (all threads): the sampler's own cost.
        self.cpu_time_s = 0.0
        self._t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._gpus: list[_Gpu] = []
        self._root: Any = None
        self._procs: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Sampler:
        """Open NVML, take the first sample now and keep sampling in the background."""
        if self._thread is not None:
            raise RuntimeError("Sampler already started")
        self._open_psutil()
        self._open_nvml()
        self._t0 = time.monotonic()
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="airgpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        """Stop the thread, take a final sample and release NVML; returns the samples."""
        if self._thread is None:
            return self.samples
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        self._close_nvml()
        return self.samples

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def elapsed(self) -> float:
        """Seconds since :meth:`start` on the samples' clock (0.0 before it)."""
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def mark(self, label: str) -> None:
        """Record a boundary (a cell starting, say) on the samples' clock."""
        self.marks.append({"t": round(self.elapsed(), 4), "label": str(label)})

    # -- sampling --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # never let a sampling hiccup kill the thread silently
                log.debug("airgpu: sample failed", exc_info=True)

    def _sample(self) -> None:
        cpu0 = time.thread_time()
        sample = {"t": round(self.elapsed(), 4)}
        sample.update(self._read_processes())
        sample["gpus"] = self._read_gpus()
        with self._lock:
            self.samples.append(sample)
        self.cpu_time_s += time.thread_time() - cpu0

    def _open_psutil(self) -> None:
        import psutil

        try:
            self._root = psutil.Process(self.pid)
        except psutil.Error:
            self._root = None
        self._procs = {} if self._root is None else {self.pid: self._root}
        self._tree_reads = 0

    def _read_processes(self) -> dict[str, float]:
        """CPU (percent of one core, summed over the tree) and resident memory in MB."""
        import psutil

        if self._root is None:
            return {"cpu_pct": 0.0, "rss_mb": 0.0}
        pids = self._tree_pids()
        cpu = rss = 0.0
        alive: dict[int, Any] = {}
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                proc = proc or psutil.Process(pid)
                # A process seen for the first time reports 0.0 and is measured from then on.
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
            alive[pid] = proc
        self._procs = alive
        return {"cpu_pct": round(cpu, 1), "rss_mb": round(rss / MB, 1)}

    def _tree_pids(self) -> list[int]:
        """The root and its descendants. Linux lists children per thread in /proc (microseconds);
        elsewhere psutil scans every process, so that is done only every tenth sample."""
        pids = _proc_children(self.pid)
        if pids is not None:
            return [self.pid, *pids]
        self._tree_reads += 1
        if self._tree_reads % 10 != 1:
            return list(self._procs) or [self.pid]
        import psutil

        try:
            return [self.pid, *(c.pid for c in self._root.children(recursive=True))]
        except psutil.Error:
            return [self.pid]

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no device: CPU fields only
            log.debug("airgpu: NVML unavailable (%s)", exc)
            return
        self._nvml = pynvml
        self.gpu_available = True
        try:
            self._gpus = _open_devices(pynvml, self.gpu_indices)
        except Exception as exc:
            log.warning("airgpu: could not list GPUs through NVML: %s", exc)
            self._gpus = []

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
            self._gpus = []

    def _read_gpus(self) -> list[dict]:
        nvml = self._nvml
        if nvml is None:
            return []
        out = []
        for gpu in self._gpus:
            entry: dict[str, Any] = {"index": gpu.index, "uuid": gpu.uuid, "util_pct": None,
                                     "mem_used_mb": 0.0, "mem_total_mb": 0.0, "power_w": None}
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(gpu.handle)
                entry["mem_used_mb"] = round(memory.used / MB, 1)
                entry["mem_total_mb"] = round(memory.total / MB, 1)
            except nvml.NVMLError:
                pass
            if gpu.util_supported:
                try:
                    entry["util_pct"] = float(nvml.nvmlDeviceGetUtilizationRates(gpu.handle).gpu)
                except nvml.NVMLError:
                    gpu.util_supported = False  # MIG slices: NVML reports "not supported"
            if gpu.power_supported:
                try:
                    entry["power_w"] = round(nvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000, 1)
                except nvml.NVMLError:
                    gpu.power_supported = False
            out.append(entry)
        return out


def _proc_children(pid: int) -> list[int] | None:
    """Descendants of ``pid`` from /proc/PID/task/TID/children, or None where that is missing."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            if current == pid:
                return None if not os.path.isdir("/proc") else []
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children", encoding="ascii") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except FileNotFoundError:
                if current == pid and tid == str(pid):
                    return None  # kernel without CONFIG_PROC_CHILDREN
                continue
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def _open_devices(nvml: Any, indices: Sequence[int] | None) -> list[_Gpu]:
    """NVML handles for the devices a run can see; MIG-enabled GPUs become their slices."""
    count = nvml.nvmlDeviceGetCount()
    wanted_uuids: set[str] = set()
    if indices is None:
        indices, wanted_uuids = _visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), count)
    gpus: list[_Gpu] = []
    for index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        slices = _mig_slices(nvml, index, handle)
        if index in indices or uuid in wanted_uuids:
            gpus.extend(slices or [_Gpu(index, uuid, handle, mig=False)])
        else:
            gpus.extend(s for s in slices if s.uuid in wanted_uuids)
    return gpus


def _mig_slices(nvml: Any, index: int, handle: Any) -> list[_Gpu]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        return []
    if not current:
        return []
    slices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:
            continue
        slices.append(_Gpu(index, _text(nvml.nvmlDeviceGetUUID(mig)), mig, mig=True))
    return slices


def _visible_devices(value: str | None, count: int) -> tuple[list[int], set[str]]:
    """Indices and UUIDs CUDA_VISIBLE_DEVICES names; unset means every device."""
    if value is None:
        return list(range(count)), set()
    indices, uuids = [], set()
    for item in (part.strip() for part in value.split(",")):
        if item.isdigit():
            indices.append(int(item))
        elif item.startswith(("GPU-", "MIG-")):
            uuids.add(item)
        else:
            break  # CUDA stops at the first invalid entry ("", "-1", "none" hide everything)
    return indices, uuids


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
