"""Run the notebook in a pod: through the cncf.kubernetes provider's KubernetesPodOperator
(``--target kubernetes``) or as an ordinary task in a KubernetesExecutor worker pod
(``--target kubernetes-executor``).

One spec becomes one pod request (:func:`pod_request`, shared by both paths): GPU limits (=
requests) of ``nvidia.com/gpu``, a MIG slice ``nvidia.com/mig-<profile>`` (the device plugin's
"mixed" strategy) or a time-sliced ``nvidia.com/gpu.shared``; CPU and memory requests and limits;
a node selector for GPU nodes (labels from GPU feature discovery) and tolerations for tainted GPU
node pools; a locked-down security context; a memory-backed ``/dev/shm``; executed notebooks on a
volume or in an object store; and what batch schedulers read: a Kueue queue label, a priority
class and the cluster autoscaler's safe-to-evict annotation. Kubernetes places the pod, so no
Airflow pool is held. The injected GPU check cell is the driver/image validation at pod start: a
node without a working driver fails the run before any training.

Why a target and not an ``--executor`` setting on the local target: the settings table says
which targets take each setting, and every pod setting (``--cpu``, ``--mig``, ``--toleration``,
...) is taken by exactly the two pod targets. As a setting of ``local`` those rows would apply to
``local`` only sometimes, which the table cannot say, and ``--mig`` would have to be allowed on a
target that otherwise refuses it. ``kubernetes-executor`` runs the local target's task body
(``airflow_task.run_notebook_task``); ``--task-executor`` adds ``executor="KubernetesExecutor"``
for a deployment whose default executor is another one (Airflow's multiple executors).

The DAG file holds the pod override as plain data; the ``V1Pod`` is made from it only when
Airflow first reads ``executor_config`` (the DAG processor serialising the DAG), never while the
file is imported, so neither a worker parsing the file for its task nor ``airflow dags test``
imports the kubernetes client.
"""

from __future__ import annotations

import ast
import copy
import pprint
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from ..spec import PromotionSpec
from . import base as c

DEFAULT_CPU = "2"
DEFAULT_MEMORY = "8Gi"
DEFAULT_OUTPUTS_CLAIM = "airgpu-outputs"
DEFAULT_WORKER_USER = "50000:50000"  # the `airflow` user of the apache/airflow images
GPU_TAINT = "nvidia.com/gpu"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
SHARING = ("shared",)
EXECUTOR_TARGET = "kubernetes-executor"
WORKER_CONTAINER = "base"  # the KubernetesExecutor merges pod_override into this container
MANAGED_BY = {"app.kubernetes.io/managed-by": "airgpu-nb"}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
NODE_NAME_ENV = "AIRGPU_NODE_NAME"
OUTPUT_ENV = "AIRGPU_OUTPUT_DIR"  # run.OUTPUT_ENV: where the worker pod keeps executed notebooks

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_TOLERATION = re.compile(r"^(?P<key>[^=:]+)(=(?P<value>[^:]*))?:(?P<effect>[A-Za-z]+)$")


def pod_request(spec: PromotionSpec, target: str) -> dict[str, Any]:
    """What a pod for ``spec`` asks of Kubernetes, for both pod paths: resources, node selector,
    tolerations, user, volumes and scheduler metadata, all checked (one line naming the flag)."""
    c.check_options(spec, target)
    opts = spec.option_map
    cpu = _cpu_quantity(c.parse_cpu(opts.get("cpu", DEFAULT_CPU)))
    memory = c.parse_size(opts.get("memory", DEFAULT_MEMORY), "memory")
    shm = c.parse_size(opts.get("shm_size", c.DEFAULT_SHM), "shm_size")
    if memory <= shm:  # a memory-backed emptyDir counts against the memory limit
        raise SpecError(f"--memory ({_bytes_quantity(memory)}) must be larger than "
                        f"--shm-size ({_bytes_quantity(shm)})")
    default_user = DEFAULT_WORKER_USER if target == EXECUTOR_TARGET else c.DEFAULT_USER
    uid, gid = c.parse_user(opts.get("user", default_user))
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
    labels = dict(MANAGED_BY)
    if "kueue_queue" in opts:
        labels[KUEUE_QUEUE_LABEL] = _queue_name(opts["kueue_queue"])
    annotations = {}
    if opts.get("safe_to_evict") is not None:
        annotations[SAFE_TO_EVICT] = "true" if opts["safe_to_evict"] else "false"
    return {
        "resources": {"cpu": cpu, "memory": _bytes_quantity(memory), **_gpu_resources(spec)},
        "node_selector": _node_selector(spec, opts),
        "tolerations": _tolerations(opts.get("tolerations")),
        "uid": uid,
        "gid": gid,
        "volumes": volumes,
        "output_dir": output_dir,
        "labels": labels,
        "annotations": annotations,
        "priority_class": (_name(opts["priority_class"], "priority_class")
                           if "priority_class" in opts else None),
        "service_account": (_name(opts["service_account"], "service_account")
                            if "service_account" in opts else None),
    }


@dataclass(frozen=True)
class KubernetesTarget:
    name: str = "kubernetes"
    template: str = "kubernetes.py.j2"

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        request = pod_request(spec, self.name)
        command = c.container_command(spec, request["output_dir"])
        opts = spec.option_map
        return {
            **request,
            "pod_name": _pod_name(spec.dag_id),
            "namespace": _label(opts["namespace"], "namespace") if "namespace" in opts else None,
            "image": c.image(spec),
            "cmds": command[:3],
            "arguments": command[3:],
        }


@dataclass(frozen=True)
class KubernetesExecutorTarget:
    """The local target's task, in a KubernetesExecutor worker pod shaped by ``pod_override``."""

    name: str = EXECUTOR_TARGET
    template: str = "kubernetes_executor.py.j2"

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        request = pod_request(spec, self.name)
        output_dir = request["output_dir"]
        if spec.output_dir:  # a relative --output-dir lands inside the outputs volume
            output_dir = (spec.output_dir if spec.output_dir.startswith("/")
                          else f"{output_dir}/{spec.output_dir}")
        pod = worker_pod_override(request, image=c.image(spec) if spec.image else None,
                                  env={OUTPUT_ENV: output_dir})
        return {"pod_source": pod_literal(pod),
                "task_executor": bool(spec.option_map.get("task_executor"))}


def pod_literal(pod: Mapping[str, Any], indent: str = "    ") -> str:
    """``pod`` as an indented Python literal a person can read in the DAG file (checked to read
    back as exactly ``pod``, like every value rendered into a DAG)."""
    from ..render import literal

    literal(pod)  # refuses anything that is not a plain literal
    text = textwrap.indent(pprint.pformat(dict(pod), width=96, sort_dicts=False), indent)
    if ast.literal_eval(text.strip()) != pod:
        raise SpecError("cannot write the pod override into a DAG file as a literal")
    return text


def worker_pod_override(request: Mapping[str, Any], image: str | None = None,
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``pod_request`` as a KubernetesExecutor ``pod_override`` in the API's own JSON form.

    Only what we ask for is set; the provider merges it over the deployment's pod template
    (containers by position, lists of volumes, mounts and env appended, the rest overridden)."""
    env_list: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in (env or {}).items()]
    env_list.append({"name": NODE_NAME_ENV,
                     "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "resources": {"requests": dict(request["resources"]),
                      "limits": dict(request["resources"])},
        "securityContext": {
            "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "env": env_list,
        "volumeMounts": [{"name": v["name"], "mountPath": v["path"], "readOnly": v["read_only"]}
                         for v in request["volumes"]],
    }
    if image is not None:
        container["image"] = image
    volumes = []
    for v in request["volumes"]:
        if v["kind"] == "shm":
            volumes.append({"name": v["name"],
                            "emptyDir": {"medium": "Memory", "sizeLimit": v["size"]}})
        else:
            volumes.append({"name": v["name"], "persistentVolumeClaim": {
                "claimName": v["claim"], "readOnly": v["read_only"]}})
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "nodeSelector": dict(request["node_selector"]),
        "tolerations": [{k: v for k, v in t.items() if v is not None}
                        for t in request["tolerations"]],
        "securityContext": {"runAsNonRoot": True, "runAsUser": request["uid"],
                            "runAsGroup": request["gid"], "fsGroup": request["gid"],
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": volumes,
    }
    if request["priority_class"] is not None:
        pod_spec["priorityClassName"] = request["priority_class"]
    if request["service_account"] is not None:
        pod_spec["serviceAccountName"] = request["service_account"]
    metadata: dict[str, Any] = {"labels": dict(request["labels"])}
    if request["annotations"]:
        metadata["annotations"] = dict(request["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


class PodOverride(dict):  # type: ignore[type-arg]
    """``{"pod_override": V1Pod}`` for ``executor_config``, made from plain data on first read.

    Importing a DAG file must stay as cheap as a one-operator DAG, and the kubernetes client
    costs more than that. Airflow reads ``executor_config`` only where it needs the pod: the DAG
    processor serialises it (and imports the client for that anyway) and the executor gets it
    back as a real ``V1Pod``. Every read of this mapping builds the pod first, so no reader sees
    it empty; pickling and copying give a plain dict holding the ``V1Pod``.
    """

    def __init__(self, pod: Mapping[str, Any]) -> None:
        super().__init__()
        self._pod = copy.deepcopy(dict(pod))

    def _loaded(self) -> PodOverride:
        if not dict.__contains__(self, "pod_override"):
            from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

            pod = PodGenerator.deserialize_model_dict(copy.deepcopy(self._pod))
            dict.__setitem__(self, "pod_override", pod)
        return self

    @property
    def pod_data(self) -> dict[str, Any]:
        """The pod override as the DAG file holds it (API JSON form), without building it."""
        return copy.deepcopy(self._pod)

    def __getitem__(self, key: Any) -> Any:
        return dict.__getitem__(self._loaded(), key)

    def __iter__(self) -> Iterator[Any]:
        return dict.__iter__(self._loaded())

    def __len__(self) -> int:
        return 1

    def __contains__(self, key: object) -> bool:
        return key == "pod_override"

    def __eq__(self, other: object) -> bool:
        return dict.__eq__(self._loaded(), other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PodOverride({self._pod!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (list(self.items()),))

    def get(self, key: Any, default: Any = None) -> Any:
        return dict.get(self._loaded(), key, default)

    def keys(self) -> Any:
        return dict.keys(self._loaded())

    def values(self) -> Any:
        return dict.values(self._loaded())

    def items(self) -> Any:
        return dict.items(self._loaded())

    def copy(self) -> dict[str, Any]:
        return dict(self.items())


def executor_config(pod: Mapping[str, Any]) -> PodOverride:
    """The ``executor_config`` of a task in a KubernetesExecutor worker pod (see PodOverride)."""
    return PodOverride(pod)


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


def _queue_name(value: object) -> str:
    """A Kueue LocalQueue name, which Kueue reads from a label: a DNS label (63 at most)."""
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise SpecError(f"--kueue-queue: {value!r} is not a valid Kueue LocalQueue name "
                        "(lowercase letters, digits and '-', at most 63)")
    return value


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
EXECUTOR = KubernetesExecutorTarget()
