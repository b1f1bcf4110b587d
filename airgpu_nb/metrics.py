"""A run's telemetry as Prometheus metrics: a text file beside the executed notebook (for
node_exporter's textfile collector or a sidecar) and, when $AIRGPU_PUSHGATEWAY_URL is set, a
push to a Pushgateway.

Names follow NVIDIA's DCGM exporter where there is a counterpart (``DCGM_FI_DEV_GPU_UTIL`` ->
``airgpu_gpu_utilization_*``, ``DCGM_FI_DEV_FB_USED`` -> ``airgpu_gpu_memory_used_peak_mib``,
``DCGM_FI_DEV_POWER_USAGE`` -> ``airgpu_gpu_power_usage_mean_watts``) and so do the ``gpu`` and
``UUID`` labels, so dashboards can join them with DCGM's series. Every series also carries
``dag``, ``task`` and ``run``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .timeline import IDLE_UTIL_PCT, percentile, summarise

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV = "AIRGPU_PUSHGATEWAY_URL"
PUSH_JOB = "airgpu"
PUSH_TIMEOUT_S = 5.0
RUN_LABELS = ("dag", "task", "run")
GPU_LABELS = (*RUN_LABELS, "gpu", "UUID")


def prom_path(executed_notebook: str | os.PathLike[str]) -> Path:
    """``<notebook stem>.prom`` beside the executed notebook."""
    path = Path(executed_notebook)
    return path.with_name(f"{path.stem}.prom")


def per_gpu(samples: list[dict], interval_s: float) -> list[dict]:
    """One summary per sampled device (a whole GPU or a MIG slice), in sampling order."""
    devices: dict[tuple[int, str], list[dict]] = {}
    for sample in samples:
        for gpu in sample.get("gpus") or ():
            devices.setdefault((gpu["index"], gpu["uuid"]), []).append(gpu)
    duration = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0.0
    out = []
    for (index, uuid), readings in devices.items():
        utils = [r["util_pct"] for r in readings if r.get("util_pct") is not None]
        power = [r["power_w"] for r in readings if r.get("power_w") is not None]
        out.append({
            "index": index, "uuid": uuid,
            "util_mean": sum(utils) / len(utils) if utils else None,
            "util_p95": percentile(utils, 95) if utils else None,
            "idle_fraction": (sum(u < IDLE_UTIL_PCT for u in utils) / len(utils)
                              if utils else None),
            "mem_used_peak_mb": max(r.get("mem_used_mb") or 0.0 for r in readings),
            "mem_total_mb": max(r.get("mem_total_mb") or 0.0 for r in readings),
            "power_mean_w": sum(power) / len(power) if power else None,
            "gpu_seconds": duration,
        })
    return out


def build_registry(telemetry: Mapping[str, Any], labels: Mapping[str, str]) -> Any:
    """A fresh ``CollectorRegistry`` holding this run's metrics (never the global one)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    run = {name: str(labels.get(name, "")) for name in RUN_LABELS}
    samples = list(telemetry.get("samples") or [])
    interval = float(telemetry.get("interval_s") or 1.0)
    summary = telemetry.get("summary") or (summarise(samples, interval) if samples else {})

    def run_gauge(name: str, doc: str, value: Any) -> None:
        if value is not None:
            Gauge(name, doc, RUN_LABELS, registry=registry).labels(**run).set(float(value))

    run_gauge("airgpu_run_duration_seconds", "Wall time the notebook's cells ran, sampled.",
              summary.get("duration_s"))
    run_gauge("airgpu_run_samples", "Telemetry samples taken during the run.",
              summary.get("samples"))
    run_gauge("airgpu_run_gpu_count", "GPUs (or MIG slices) sampled during the run.",
              summary.get("gpu_count"))
    run_gauge("airgpu_run_gpu_utilization_mean", "Mean GPU utilisation (%) over all sampled "
              "GPUs; mean of DCGM_FI_DEV_GPU_UTIL.", summary.get("gpu_util_mean"))
    run_gauge("airgpu_run_gpu_seconds", "GPU-seconds held: GPUs sampled x duration.",
              summary.get("gpu_seconds"))
    run_gauge("airgpu_run_cpu_utilization_mean_percent", "Mean CPU of the kernel's process "
              "tree, percent of one core.", summary.get("cpu_pct_mean"))
    run_gauge("airgpu_run_cpu_utilization_peak_percent", "Peak CPU of the kernel's process "
              "tree, percent of one core.", summary.get("cpu_pct_peak"))
    run_gauge("airgpu_run_memory_rss_peak_mib", "Peak resident memory of the kernel's "
              "process tree (MiB).", summary.get("rss_peak_mb"))

    gauges = {
        "util_mean": ("airgpu_gpu_utilization_mean", "Mean of DCGM_FI_DEV_GPU_UTIL (%) "
                      "during the run."),
        "util_p95": ("airgpu_gpu_utilization_p95", "95th percentile of DCGM_FI_DEV_GPU_UTIL "
                     "(%) during the run."),
        "idle_fraction": ("airgpu_gpu_idle_fraction", f"Share of readings under "
                          f"{IDLE_UTIL_PCT:g} % utilisation."),
        "mem_used_peak_mb": ("airgpu_gpu_memory_used_peak_mib", "Peak of DCGM_FI_DEV_FB_USED "
                             "(MiB) during the run."),
        "mem_total_mb": ("airgpu_gpu_memory_total_mib", "Framebuffer size (MiB); per slice "
                         "for MIG."),
        "power_mean_w": ("airgpu_gpu_power_usage_mean_watts", "Mean of "
                         "DCGM_FI_DEV_POWER_USAGE (W) during the run."),
        "gpu_seconds": ("airgpu_gpu_seconds", "Seconds this GPU was held by the run."),
    }
    made: dict[str, Any] = {}
    for gpu in per_gpu(samples, interval):
        gpu_labels = {**run, "gpu": str(gpu["index"]), "UUID": str(gpu["uuid"])}
        for key, (name, doc) in gauges.items():
            if gpu[key] is None:
                continue  # e.g. utilisation of a MIG slice: NVML does not report it
            if name not in made:
                made[name] = Gauge(name, doc, GPU_LABELS, registry=registry)
            made[name].labels(**gpu_labels).set(float(gpu[key]))
    return registry


def write_textfile(telemetry: Mapping[str, Any], path: str | os.PathLike[str],
                   labels: Mapping[str, str]) -> Path:
    """Write the run's metrics in Prometheus text format (atomically, by prometheus-client)."""
    from prometheus_client import write_to_textfile

    path = Path(path)
    write_to_textfile(str(path), build_registry(telemetry, labels))
    return path


def push(telemetry: Mapping[str, Any], labels: Mapping[str, str], url: str) -> bool:
    """Push the run's metrics to a Pushgateway (see :func:`push_registry`)."""
    return push_registry(build_registry(telemetry, labels), labels, url)


def push_registry(registry: Any, labels: Mapping[str, str], url: str,
                  what: str = "metrics") -> bool:
    """Push ``registry`` to a Pushgateway, grouped by DAG and task so the gateway keeps each
    task's latest result rather than one group per run forever. A failure is a warning, never
    a failed task.

    ``user:password@`` in ``url`` becomes HTTP basic auth; the URL is logged without it.
    """
    from prometheus_client import push_to_gateway
    from prometheus_client.exposition import basic_auth_handler, default_handler

    from .urls import credentials, redact_url, scrub, split_secrets

    grouping = {name: str(labels.get(name, "")) for name in ("dag", "task")}
    login = credentials(url)
    handler = default_handler
    if login is not None:
        def handler(**request: Any) -> Any:
            return basic_auth_handler(**request, username=login[0], password=login[1])
    try:
        push_to_gateway(split_secrets(url).bare, job=PUSH_JOB, registry=registry,
                        grouping_key=grouping, timeout=PUSH_TIMEOUT_S, handler=handler)
    except Exception as exc:
        log.warning("airgpu: could not push %s to the Pushgateway at %s: %s", what,
                    redact_url(url), scrub(f"{type(exc).__name__}: {exc}", url))
        return False
    return True


def publish(telemetry: Mapping[str, Any], executed_notebook: str | os.PathLike[str],
            labels: Mapping[str, str]) -> Path | None:
    """The text file, and the push when configured. Never raises: metrics are a by-product
    of the run, not a reason for it to fail."""
    written = None
    try:
        written = write_textfile(telemetry, prom_path(executed_notebook), labels)
    except Exception as exc:
        log.warning("airgpu: could not write Prometheus metrics beside %s: %s",
                    executed_notebook, exc)
    url = os.environ.get(PUSHGATEWAY_ENV, "").strip()
    if url:
        push(telemetry, labels, url)
    return written
