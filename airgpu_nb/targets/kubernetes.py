"""Run the notebook in a pod through the cncf.kubernetes provider's KubernetesPodOperator.

One spec becomes: GPU limits (= requests) of ``nvidia.com/gpu``, a MIG slice
``nvidia.com/mig-<profile>`` (the device plugin's "mixed" strategy) or a time-sliced
``nvidia.com/gpu.shared``; CPU and memory requests and limits; a node selector for GPU nodes
(labels from GPU feature discovery) and tolerations for tainted GPU node pools; a locked-down
security context; a memory-backed ``/dev/shm``; executed notebooks on a volume or in an object
store. Kubernetes places the pod, so no Airflow pool is held. The injected GPU check cell is the
driver/image validation at pod start: a node without a working driver fails the run before any
training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from ..spec import PromotionSpec
from . import base as c

DEFAULT_CPU = "2"
DEFAULT_MEMORY = "8Gi"
DEFAULT_OUTPUTS_CLAIM = "airgpu-outputs"
GPU_TAINT = "nvidia.com/gpu"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
SHARING = ("shared",)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_TOLERATION = re.compile(r"^(?P<key>[^=:]+)(=(?P<value>[^:]*))?:(?P<effect>[A-Za-z]+)$")


@dataclass(frozen=True)
class KubernetesTarget:
    name: str = "kubernetes"
    template: str = "kubernetes.py.j2"

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        c.check_options(spec, self.name)
        opts = spec.option_map
        cpu = _cpu_quantity(c.parse_cpu(opts.get("cpu", DEFAULT_CPU)))
        memory = c.parse_size(opts.get("memory", DEFAULT_MEMORY), "memory")
        shm = c.parse_size(opts.get("shm_size", c.DEFAULT_SHM), "shm_size")
        if memory <= shm:  # a memory-backed emptyDir counts against the memory limit
            raise SpecError(f"--memory ({_bytes_quantity(memory)}) must be larger than "
                            f"--shm-size ({_bytes_quantity(shm)})")
        uid, gid = c.parse_user(opts.get("user", c.DEFAULT_USER))
        resources = {"cpu": cpu, "memory": _bytes_quantity(memory), **_gpu_resources(spec)}
        volumes = [{"name": "dshm", "kind": "shm", "size": _bytes_quantity(shm),
                    "path": "/dev/shm", "read_only": False}]
        if "notebooks_volume" in opts:
            volumes.append({"name": "notebooks", "kind": "pvc", "path": c.CONTAINER_DAGS,
                            "claim": _name(opts["notebooks_volume"], "notebooks_volume"),
                            "read_only": True})
        if "outputs_url" in opts:
            output_dir = c.output_url(opts["outputs_url"])
        else:
            output_dir = c.CONTAINER_OUTPUTS
            volumes.append({"name": "outputs", "kind": "pvc", "path": c.CONTAINER_OUTPUTS,
                            "claim": _name(opts.get("outputs_volume", DEFAULT_OUTPUTS_CLAIM),
                                           "outputs_volume"),
                            "read_only": False})
        command = c.container_command(spec, output_dir)
        return {
            "pod_name": _pod_name(spec.dag_id),
            "namespace": _label(opts["namespace"], "namespace") if "namespace" in opts else None,
            "service_account": (_name(opts["service_account"], "service_account")
                                if "service_account" in opts else None),
            "image": c.image(spec),
            "cmds": command[:3],
            "arguments": command[3:],
            "resources": resources,
            "node_selector": _node_selector(spec, opts),
            "tolerations": _tolerations(opts.get("tolerations")),
            "uid": uid,
            "gid": gid,
            "volumes": volumes,
        }


def _gpu_resources(spec: PromotionSpec) -> dict[str, str]:
    sharing = spec.option_map.get("gpu_sharing")
    if sharing is not None and sharing not in SHARING:
        raise SpecError.invalid_choice("GPU sharing mode", sharing, SHARING)
    if spec.gpu.mig is not None:
        if sharing is not None:
            raise SpecError("--mig and --gpu-sharing are two ways to split a GPU; choose one")
        return {f"nvidia.com/mig-{spec.gpu.mig}": "1"}
    count = spec.gpu.count
    if count == "all":
        raise SpecError("--gpus all has no meaning for a pod; give a number of GPUs")
    if count == 0:
        if sharing is not None:
            raise SpecError("--gpu-sharing needs --gpus 1 or more")
        return {}
    return {"nvidia.com/gpu.shared" if sharing else "nvidia.com/gpu": str(count)}


def _node_selector(spec: PromotionSpec, opts: dict[str, Any]) -> dict[str, str]:
    selector: dict[str, str] = {}
    if spec.gpu.mig is not None or spec.gpu.count != 0:
        selector["nvidia.com/gpu.present"] = "true"
    if "gpu_product" in opts:
        selector["nvidia.com/gpu.product"] = _label_value(opts["gpu_product"], "gpu_product")
    extra = opts.get("node_selector") or {}
    if not isinstance(extra, dict):
        pairs = {}
        for item in c.string_list(extra, "node_selector"):
            key, sep, value = item.partition("=")
            if not sep:
                raise SpecError(f"--node-selector takes KEY=VALUE, not {item!r}")
            pairs[key] = value
        extra = pairs
    for key, value in extra.items():
        selector[_label_key(key, "node_selector")] = _label_value(value, "node_selector")
    return selector


def _tolerations(extra: object) -> list[dict[str, str | None]]:
    """The GPU taint the device plugin docs recommend, plus a dedicated pool's own taints."""
    tolerations: list[dict[str, str | None]] = [
        {"key": GPU_TAINT, "operator": "Exists", "value": None, "effect": "NoSchedule"}]
    for item in c.string_list(extra, "tolerations") if extra is not None else []:
        match = _TOLERATION.fullmatch(item)
        if match is None or match.group("effect") not in EFFECTS:
            raise SpecError(f"--toleration takes KEY[=VALUE]:EFFECT with EFFECT one of "
                            f"{', '.join(EFFECTS)}, not {item!r}")
        key = _label_key(match.group("key"), "tolerations")
        value = match.group("value")
        entry = {"key": key, "operator": "Exists" if value is None else "Equal",
                 "value": None if value is None else _label_value(value, "tolerations"),
                 "effect": match.group("effect")}
        if entry not in tolerations:
            tolerations.append(entry)
    return tolerations


def _label_key(value: object, option: str) -> str:
    if not isinstance(value, str) or not _LABEL_KEY.fullmatch(value):
        raise SpecError(f"{c.flag(option)}: {value!r} is not a valid Kubernetes label key")
    return value


def _label_value(value: object, option: str) -> str:
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
        raise SpecError(f"{c.flag(option)}: {value!r} is not a valid Kubernetes label value")
    return value


def _label(value: object, option: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise SpecError(f"{c.flag(option)}: {value!r} is not a valid Kubernetes name "
                        "(lowercase letters, digits and '-', at most 63)")
    return value


def _name(value: object, option: str) -> str:
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.fullmatch(value):
        raise SpecError(f"{c.flag(option)}: {value!r} is not a valid Kubernetes name "
                        "(lowercase letters, digits, '-' and '.')")
    return value


def _pod_name(dag_id: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", dag_id.lower()).strip("-")
    return f"airgpu-{cleaned}"[:50].rstrip("-")


def _cpu_quantity(milli: int) -> str:
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _bytes_quantity(size: int) -> str:
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


TARGET = KubernetesTarget()
