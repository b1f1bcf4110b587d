"""Can this Docker daemon give a container a GPU? Asked before the docker target starts one.

Without the NVIDIA Container Toolkit, Docker refuses a GPU device request only when the container
starts (``could not select device driver "" with capabilities: [[gpu]]``), as a raw API error the
task then retries. This module reads ``docker info`` through the same Docker SDK client the
DockerOperator uses and turns that into one line naming the fix, before any container exists, and
fails the task for good (an infrastructure error, not a flaky run). With ``allow_cpu`` the task
runs without the device request instead, and says so in its log and in the executed notebook.

It also removes a container once its run succeeded (``post_execute``): the provider's
``auto_remove="success"`` removes the container in a ``finally``, failed runs included (provider
4.6.1), which would lose what ``docker logs``/``docker cp`` need after a failure.

Imported only when the task runs (the generated DAG imports it inside its hooks), so parsing a
DAG file pays nothing for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Environment variable telling the in-container run that the GPU request was dropped.
CPU_FALLBACK_ENV = "AIRGPU_CPU_FALLBACK"

FIX = ("install the NVIDIA Container Toolkit on the Docker host, run "
       "`sudo nvidia-ctk runtime configure --runtime=docker` and restart dockerd "
       "(`sudo systemctl restart docker`)")


@dataclass(frozen=True)
class GpuSupport:
    """What ``docker info`` says about GPU requests on one daemon."""

    ok: bool
    #: How the daemon would honour a request ("runtime nvidia", "CDI nvidia.com/gpu=0"), or
    #: what it lacks.
    detail: str
    daemon: str  # "Docker 20.10.24 on host-1"


def gpu_support(info: Mapping[str, Any]) -> GpuSupport:
    """Read a ``docker info`` answer (the Engine API's ``/info``): an NVIDIA runtime
    (``nvidia-ctk runtime configure`` registers one) or NVIDIA devices discovered through CDI
    (Docker 28+: ``DiscoveredDevices``) mean a GPU request can be honoured."""
    daemon = f"Docker {info.get('ServerVersion') or '?'} on {info.get('Name') or '?'}"
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    nvidia = [name for name in runtimes if "nvidia" in name.lower()]
    if nvidia:
        return GpuSupport(True, f"runtime {nvidia[0]}", daemon)
    devices = [str(d.get("ID", "")) for d in info.get("DiscoveredDevices") or []
               if isinstance(d, Mapping)]
    cdi = [d for d in devices if d.startswith("nvidia.com/")]
    if cdi:
        return GpuSupport(True, f"CDI {', '.join(cdi[:4])}", daemon)
    spec_dirs = info.get("CDISpecDirs") or []
    lacks = (f"no NVIDIA runtime (runtimes: {', '.join(runtimes) or 'none'}) and no NVIDIA CDI "
             f"device{' in ' + ', '.join(spec_dirs) if spec_dirs else ''}")
    return GpuSupport(False, lacks, daemon)


def refusal(support: GpuSupport) -> str:
    """The one line a GPU-less daemon gets."""
    return (f"airgpu: the Docker daemon cannot give this container a GPU ({support.daemon}: "
            f"{support.detail}); {FIX}, or run on CPU with --allow-cpu")


def fallback_note(support: GpuSupport) -> str:
    return (f"GPU request dropped: {support.daemon} has {support.detail}; running on CPU "
            "because --allow-cpu is set")


def check_gpu_host(context: Mapping[str, Any], allow_cpu: bool) -> None:
    """``pre_execute`` of the docker target's DockerOperator: nothing to do without a GPU
    request; otherwise ask the daemon, then go on, drop the request (``allow_cpu``, which a
    trigger's conf may override) or fail at once without a retry."""
    task = context["task"]
    if not getattr(task, "device_requests", None):
        return
    params = context.get("params") or {}
    if "allow_cpu" in params:
        allow_cpu = params["allow_cpu"] is True
    support = gpu_support(task.cli.info())
    if support.ok:
        log.info("airgpu: %s can honour the GPU request (%s)", support.daemon, support.detail)
        return
    if allow_cpu:
        note = fallback_note(support)
        log.warning("airgpu: %s", note)
        task.device_requests = []
        task.environment = {**(task.environment or {}), CPU_FALLBACK_ENV: note}
        return
    from airflow.sdk.exceptions import AirflowFailException

    message = refusal(support)
    log.error("%s", message)
    raise AirflowFailException(message)


def remove_container(context: Mapping[str, Any]) -> None:
    """``post_execute`` of the docker target's DockerOperator (so: only after a successful run):
    remove the container; a failed run's container stays for ``docker logs``/``docker cp``."""
    task = context["task"]
    container = getattr(task, "container", None)
    if not container:
        return
    try:
        task.cli.remove_container(container["Id"])
    except Exception as exc:  # a leftover container is no reason to fail a finished run
        log.warning("airgpu: could not remove container %s: %s", container["Id"][:12], exc)
