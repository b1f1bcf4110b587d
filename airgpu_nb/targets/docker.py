"""Run the notebook in its own container through the Docker provider's DockerOperator.

The container gets a GPU device request (N GPUs, all of them, or chosen device ids, with
capability ``gpu``, like ``docker run --gpus``), the prepared notebook read-only and an outputs
mount, a larger ``/dev/shm`` for input pipelines, and a non-root user. It is removed when the run
succeeds and kept when it fails, for ``docker logs``/``docker cp``. The task holds the ``gpu``
pool like the local target, since the containers share the box's GPUs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from ..spec import PromotionSpec
from . import base as c

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")  # an index or a GPU-UUID
_VOLUME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
DEFAULT_OUTPUTS_VOLUME = "airgpu-outputs"


@dataclass(frozen=True)
class DockerTarget:
    name: str = "docker"
    template: str = "docker.py.j2"
    queue: str = "gpu"  # a worker on the GPU box, which reaches its Docker daemon

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        c.no_mig(spec, self.name)
        c.check_options(spec, self.name)
        opts = spec.option_map
        shm = c.parse_size(opts.get("shm_size", c.DEFAULT_SHM), "shm_size")
        memory = c.parse_size(opts["memory"], "memory") if "memory" in opts else None
        if memory is not None and memory <= shm:
            raise SpecError(f"--memory ({opts['memory']}) must be larger than --shm-size "
                            f"({opts.get('shm_size', c.DEFAULT_SHM)})")
        uid, gid = c.parse_user(opts.get("user", c.DEFAULT_USER))
        mounts = []
        if "notebooks_volume" in opts:
            mounts.append(_mount(opts["notebooks_volume"], "notebooks_volume", c.CONTAINER_DAGS,
                                 read_only=True))
        if "outputs_url" in opts:
            output_dir = c.output_url(opts["outputs_url"])
        else:
            output_dir = c.CONTAINER_OUTPUTS
            mounts.append(_mount(opts.get("outputs_volume", DEFAULT_OUTPUTS_VOLUME),
                                 "outputs_volume", c.CONTAINER_OUTPUTS, read_only=False))
        return {
            "queue": self.queue,
            "image": c.image(spec),
            "command": c.container_command(spec, output_dir),
            "device_requests": _device_requests(spec, opts.get("device_ids")),
            # None: the DAG folder as the worker sees it (a worker on the Docker host).
            "dags_mount": None if "notebooks_volume" in opts else c.CONTAINER_DAGS,
            "mounts": mounts,
            "shm_size": shm,
            "mem_limit": memory,
            "cpus": c.parse_cpu(opts["cpu"]) / 1000 if "cpu" in opts else None,
            "user": f"{uid}:{gid}",
        }


def _mount(source: object, option: str, target: str, read_only: bool) -> dict[str, Any]:
    """A bind mount for an absolute host path, else a named volume."""
    text = c.check_text(source, option)
    if text.startswith("/"):
        kind = "bind"
    elif _VOLUME_RE.fullmatch(text):
        kind = "volume"
    else:
        raise SpecError(f"{c.flag(option)} takes an absolute host path or a Docker volume name, "
                        f"not {text!r}")
    return {"source": text, "target": target, "type": kind, "read_only": read_only}


def _device_requests(spec: PromotionSpec, device_ids: object) -> list[dict[str, Any]]:
    """Keyword arguments of each ``docker.types.DeviceRequest``; count -1 means all GPUs."""
    count = spec.gpu.count
    if device_ids is not None:
        ids = c.string_list(device_ids, "device_ids")
        for device in ids:
            if not _DEVICE_ID_RE.fullmatch(device):
                raise SpecError(f"--device-id takes a GPU index or UUID, not {device!r}")
        if len(set(ids)) != len(ids):
            raise SpecError(f"--device-id names a GPU twice: {', '.join(ids)}")
        if count != len(ids):
            raise SpecError(f"--device-id names {len(ids)} GPU(s) but --gpus is {count}; "
                            f"pass --gpus {len(ids)}")
        return [{"device_ids": ids, "capabilities": [["gpu"]]}]
    if count == 0:
        return []
    return [{"count": -1 if count == "all" else count, "capabilities": [["gpu"]]}]


TARGET = DockerTarget()
