"""The kubernetes target: the pod KubernetesPodOperator itself builds from a promoted DAG is a
valid Kubernetes object (kubernetes-validate, strict) and asks for exactly what the spec says.

No cluster runs here: ``build_pod_request_obj(dry_run=True)`` is the provider's own code path
up to the API call, so what is checked is what would be sent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airgpu_nb import cli
from conftest import write_notebook

K8S_VERSION = "1.37.0"
PARAMS = {"lr": 0.01, "epochs": 3, "note": 'say "hi"\nto ünïcode ✓ {{ 7*7 }}', "flag": True,
          "nothing": None}


def promote(tmp_path: Path, *args: str, dag_id: str) -> Path:
    nb = write_notebook(tmp_path / "train.ipynb", "print(lr)", parameters=(
        "lr = 0.1\nepochs = 1\nnote = ''\nflag = False\nnothing = None"))
    dags = tmp_path / "dags"
    argv = ["promote", str(nb), "--target", "kubernetes", "--dag-id", dag_id,
            "--dags-dir", str(dags), "-p", "lr", "0.01", "-p", "epochs", "3",
            "-r", "note", PARAMS["note"], "-p", "flag", "True", *args]
    assert cli.main(argv) == 0
    return dags


def load_task(dags: Path, dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    bag = DagBag(dag_folder=str(dags), include_examples=False) if _takes_examples() else \
        DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    task = bag.dags[dag_id].get_task("run_notebook")
    assert isinstance(task, KubernetesPodOperator)
    return task


def _takes_examples() -> bool:
    import inspect

    from airflow.dag_processing.dagbag import DagBag

    return "include_examples" in inspect.signature(DagBag.__init__).parameters


def pod_dict(task: Any) -> dict[str, Any]:
    """The pod as the API server would receive it, validated strictly."""
    import kubernetes_validate
    from kubernetes.client import ApiClient

    pod = task.build_pod_request_obj(dry_run=True)
    obj = ApiClient().sanitize_for_serialization(pod)
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return obj


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["containers"]
    return only


def assert_locked_down(obj: dict[str, Any]) -> None:
    pod_sc = obj["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 1000 and pod_sc["runAsGroup"] == 1000
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(obj)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert obj["spec"].get("hostNetwork") in (None, False)


def volumes(obj: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
    vols = {v["name"]: v for v in obj["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(obj)["volumeMounts"]}
    return vols, mounts


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_whole_gpus_pod_requests_gpus_cpu_memory_and_mounts_volumes(tmp_path):
    dags = promote(tmp_path, "--gpus", "2", "--namespace", "ml-jobs", "--service-account",
                   "trainer", "--cpu", "8", "--memory", "32Gi", "--shm-size", "4g",
                   "--gpu-product", "NVIDIA-A100-SXM4-80GB", "--notebooks-volume", "airflow-dags",
                   "--outputs-volume", "nb-outputs", "--image", "registry.example/rt:1.0",
                   dag_id="k8s_whole")
    task = load_task(dags, "k8s_whole")
    assert task.get_logs is True
    assert task.on_finish_action.value == "delete_succeeded_pod"
    obj = pod_dict(task)
    res = container(obj)["resources"]
    want = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert res["limits"] == want and res["requests"] == want
    assert obj["metadata"]["namespace"] == "ml-jobs"
    assert obj["spec"]["serviceAccountName"] == "trainer"
    assert obj["spec"]["restartPolicy"] == "Never"
    assert container(obj)["image"] == "registry.example/rt:1.0"
    assert obj["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                           "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert obj["spec"]["tolerations"] == [GPU_TOLERATION]
    assert_locked_down(obj)
    vols, mounts = volumes(obj)
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert vols["notebooks"]["persistentVolumeClaim"] == {"claimName": "airflow-dags",
                                                          "readOnly": True}
    assert mounts["notebooks"] == {"name": "notebooks", "mountPath": "/opt/airgpu/dags",
                                   "readOnly": True}
    assert vols["outputs"]["persistentVolumeClaim"]["claimName"] == "nb-outputs"
    assert mounts["outputs"]["mountPath"] == "/opt/airgpu/outputs"
    assert mounts["outputs"]["readOnly"] is False
    name = obj["metadata"]["name"]
    assert name.startswith("airgpu-k8s-whole") and len(name) <= 63


def test_mig_profile_requests_a_mig_slice_and_outputs_go_to_the_object_store(tmp_path):
    dags = promote(tmp_path, "--mig", "1g.10gb", "--namespace", "ml",
                   "--outputs-url", "s3://bucket/airgpu/", dag_id="k8s_mig")
    obj = pod_dict(load_task(dags, "k8s_mig"))
    res = container(obj)["resources"]
    assert res["limits"] == res["requests"] == {"cpu": "2", "memory": "8Gi",
                                                "nvidia.com/mig-1g.10gb": "1"}
    assert "nvidia.com/gpu" not in res["limits"]
    assert obj["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    vols, mounts = volumes(obj)
    assert set(vols) == set(mounts) == {"dshm"}  # no outputs claim: the URL is the place
    config = json.loads(_arg(container(obj)["args"], "--config-json"))
    assert config["output_dir"] == "s3://bucket/airgpu"
    assert_locked_down(obj)


def test_time_sliced_sharing_requests_gpu_shared(tmp_path):
    dags = promote(tmp_path, "--gpu-sharing", "shared", "--namespace", "ml",
                   dag_id="k8s_shared")
    obj = pod_dict(load_task(dags, "k8s_shared"))
    res = container(obj)["resources"]
    assert res["limits"]["nvidia.com/gpu.shared"] == "1"
    assert res["requests"]["nvidia.com/gpu.shared"] == "1"
    assert "nvidia.com/gpu" not in res["limits"]


def test_dedicated_pool_taints_and_node_labels_are_tolerated_and_selected(tmp_path):
    dags = promote(tmp_path, "--namespace", "ml", "--toleration", "dedicated=gpu:NoSchedule",
                   "--toleration", "cloud.example.com/spot:NoExecute",
                   "--node-selector", "pool=gpu-a100", "--memory", "6g", "--cpu", "1500m",
                   dag_id="k8s_taints")
    obj = pod_dict(load_task(dags, "k8s_taints"))
    assert obj["spec"]["tolerations"] == [
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
        {"key": "cloud.example.com/spot", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert obj["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                           "pool": "gpu-a100"}
    res = container(obj)["resources"]
    assert res["limits"] == {"cpu": "1500m", "memory": "6Gi", "nvidia.com/gpu": "1"}


def test_pod_arguments_carry_the_runs_params_exactly(tmp_path):
    """The args are rendered by Airflow's own templating; user text is data, never template."""
    from airflow.sdk.definitions.param import process_params

    dags = promote(tmp_path, "--namespace", "ml", dag_id="k8s_params")
    task = load_task(dags, "k8s_params")
    assert task.cmds == ["python", "-m", "airgpu_nb.container_run"]
    params = process_params(task.dag, task, {"epochs": 5}, suppress_exception=False)
    context = {"params": params, "run_id": "manual__2026-01-02T03:04:05+00:00",
               "ti": SimpleNamespace(try_number=2)}
    args = task.render_template(task.arguments, context)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert json.loads(_arg(args, "--params-json")) == {**PARAMS, "epochs": 5}
    assert _arg(args, "--run-id") == "manual__2026-01-02T03:04:05+00:00"
    assert _arg(args, "--try-number") == "2"
    config = json.loads(_arg(args, "--config-json"))
    assert config["notebook"] == "/opt/airgpu/dags/k8s_params.ipynb"
    assert config["name"] == "train.ipynb" and config["output_dir"] == "/opt/airgpu/outputs"


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# (args, message) that `--target kubernetes` refuses; the executor's are further down.
POD_REFUSALS = [
    (["--device-id", "0"], "does not take --device-id"),
    (["--gpus", "all"], "--gpus all has no meaning for a pod"),
    (["--mig", "1g.10gb", "--gpu-sharing", "shared"], "choose one"),
    (["--mig", "9g.99gb"], "unknown MIG profile '9g.99gb'"),
    (["--mig", "1g.10gb", "--gpus", "2"], "do not combine it with --gpus"),
    (["--toleration", "dedicated=gpu"], "--toleration takes KEY[=VALUE]:EFFECT"),
    (["--toleration", "dedicated=gpu:Sometimes"], "EFFECT one of"),
    (["--node-selector", "pool"], "--node-selector takes KEY=VALUE"),
    (["--node-selector", "pool={{ bad }}"], "may not contain '{{'"),
    (["--node-selector", "pool=a b"], "not a valid Kubernetes label value"),
    (["--namespace", "ML_Jobs"], "not a valid Kubernetes name"),
    (["--memory", "2Gi", "--shm-size", "2Gi"], "must be larger than --shm-size"),
    (["--memory", "lots"], "--memory takes a size"),
    (["--cpu", "0"], "--cpu must be at least 1m"),
    (["--user", "0"], "would run as root"),
    (["--outputs-url", "ftp://x/y"], "--outputs-url must be an object-store URL"),
    (["--outputs-url", "s3://b/p", "--outputs-volume", "pvc"], "not both"),
    (["--image", "bad image"], "invalid image reference"),
]


# -- KubernetesExecutor: the worker pod the provider builds from our pod_override ----------------

# A worker pod template shaped like the one the official Helm chart renders: the `base`
# container, a git-sync init container, logs and config volumes, the chart's security context
# and a toleration of its own.
POD_TEMPLATE = """\
apiVersion: v1
kind: Pod
metadata:
  name: placeholder-name
  labels:
    tier: airflow
    component: worker
    release: airflow
  annotations:
    cluster-autoscaler.kubernetes.io/safe-to-evict: "true"
spec:
  initContainers:
    - name: git-sync-init
      image: registry.k8s.io/git-sync/git-sync:v4.4.2
      env:
        - {name: GITSYNC_REPO, value: "https://git.example.com/dags.git"}
        - {name: GITSYNC_ONE_TIME, value: "true"}
      securityContext: {runAsUser: 65533}
      volumeMounts:
        - {name: dags, mountPath: /git}
  containers:
    - name: base
      image: apache/airflow:3.3.2
      imagePullPolicy: IfNotPresent
      args: []
      env:
        - {name: AIRFLOW__CORE__EXECUTOR, value: LocalExecutor}
        - name: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
          valueFrom: {secretKeyRef: {name: airflow-metadata, key: connection}}
      resources: {}
      volumeMounts:
        - {name: logs, mountPath: /opt/airflow/logs}
        - {name: config, mountPath: /opt/airflow/airflow.cfg, subPath: airflow.cfg, readOnly: true}
        - {name: dags, mountPath: /opt/airflow/dags, readOnly: true}
  restartPolicy: Never
  securityContext: {runAsUser: 50000, fsGroup: 0}
  nodeSelector: {}
  tolerations:
    - {key: airflow-workers, operator: Exists, effect: NoSchedule}
  serviceAccountName: airflow-worker
  volumes:
    - {name: logs, emptyDir: {}}
    - {name: config, configMap: {name: airflow-config}}
    - {name: dags, emptyDir: {}}
"""


def _promote_target(tmp_path: Path, target: str, *args: str, dag_id: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    nb = write_notebook(tmp_path / "train.ipynb", "print(lr)", parameters="lr = 0.1")
    dags = tmp_path / "dags"
    assert cli.main(["promote", str(nb), "--target", target, "--dag-id", dag_id,
                     "--dags-dir", str(dags), *args]) == 0
    return dags


def scheduled_executor_config(dags: Path, dag_id: str) -> dict[str, Any]:
    """The task's executor_config as the scheduler gets it: the DAG parsed, serialised to JSON
    by Airflow (as the DAG processor stores it) and read back."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    stored = json.loads(json.dumps(DagSerialization.to_dict(bag.dags[dag_id])))
    return DagSerialization.from_dict(stored).get_task("run_notebook").executor_config


def worker_pod(tmp_path: Path, executor_config: dict[str, Any], dag_id: str) -> dict[str, Any]:
    """The worker pod the KubernetesExecutor's own code builds (no API call), validated."""
    import logging

    import kubernetes_validate
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.providers.cncf.kubernetes.executors.kubernetes_executor_types import (
        KubernetesJob,
    )
    from airflow.providers.cncf.kubernetes.executors.kubernetes_executor_utils import (
        AirflowKubernetesScheduler,
    )
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
    from kubernetes.client import ApiClient

    template = tmp_path / "pod_template.yaml"
    template.write_text(POD_TEMPLATE)
    scheduler = SimpleNamespace(
        kube_config=SimpleNamespace(kube_image="apache/airflow:3.3.2",
                                    pod_template_file=str(template)),
        namespace="airflow", scheduler_job_id="7", supports_task_instance_uuid=False,
        log=logging.getLogger("test"))
    key = TaskInstanceKey(dag_id, "run_notebook", "manual__2026-01-02T03:04:05+00:00", 1, -1)
    command = ["airflow", "tasks", "run", dag_id, "run_notebook", key.run_id]
    job = KubernetesJob(key, command, PodGenerator.from_obj(executor_config), None)
    pod = AirflowKubernetesScheduler._build_pod_request(scheduler, job)
    obj = ApiClient().sanitize_for_serialization(pod)
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return obj


def test_executor_worker_pod_built_by_the_provider_asks_for_its_gpus_and_validates(tmp_path):
    dags = _promote_target(
        tmp_path, "kubernetes-executor", "--gpus", "2", "--cpu", "8", "--memory", "32Gi",
        "--shm-size", "4g", "--gpu-product", "NVIDIA-A100-SXM4-80GB",
        "--node-selector", "cloud.google.com/gke-nodepool=gpu-a100",
        "--toleration", "dedicated=gpu:NoSchedule", "--outputs-volume", "nb-outputs",
        "--service-account", "trainer", dag_id="kx_whole")
    obj = worker_pod(tmp_path, scheduled_executor_config(dags, "kx_whole"), "kx_whole")
    main = container(obj)
    want = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert main["resources"] == {"limits": want, "requests": want}
    assert main["name"] == "base"
    assert main["args"][:3] == ["airflow", "tasks", "run"]  # the executor's own command
    assert main["image"] == "apache/airflow:3.3.2"  # the deployment's worker image is kept
    assert obj["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "cloud.google.com/gke-nodepool": "gpu-a100"}
    assert obj["spec"]["tolerations"] == [
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert obj["spec"]["serviceAccountName"] == "trainer"
    pod_sc = obj["spec"]["securityContext"]
    assert pod_sc == {"runAsNonRoot": True, "runAsUser": 50000, "runAsGroup": 50000,
                      "fsGroup": 50000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert main["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    vols, mounts = volumes(obj)
    # the template's volumes and mounts stay; ours are added
    assert {"logs", "config", "dags", "dshm", "outputs"} <= set(vols) and set(mounts) == {
        "logs", "config", "dags", "dshm", "outputs"}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert vols["outputs"]["persistentVolumeClaim"] == {"claimName": "nb-outputs",
                                                        "readOnly": False}
    env = {e["name"]: e for e in main["env"]}
    assert env["AIRGPU_OUTPUT_DIR"]["value"] == "/opt/airgpu/outputs" == mounts["outputs"][
        "mountPath"]
    assert env["AIRGPU_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in env  # the template's env is kept
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "airgpu-nb"
    assert obj["metadata"]["labels"]["dag_id"] == "kx_whole"  # the executor's labels stay
    assert obj["spec"]["initContainers"][0]["name"] == "git-sync-init"


def test_executor_mig_slice_and_time_slicing_survive_the_merge(tmp_path):
    dags = _promote_target(tmp_path / "mig", "kubernetes-executor", "--mig", "3g.40gb",
                           dag_id="kx_mig")
    obj = worker_pod(tmp_path, scheduled_executor_config(dags, "kx_mig"), "kx_mig")
    assert container(obj)["resources"]["limits"] == {"cpu": "2", "memory": "8Gi",
                                                     "nvidia.com/mig-3g.40gb": "1"}
    dags = _promote_target(tmp_path / "ts", "kubernetes-executor", "--gpu-sharing", "shared",
                           dag_id="kx_shared")
    obj = worker_pod(tmp_path, scheduled_executor_config(dags, "kx_shared"), "kx_shared")
    limits = container(obj)["resources"]["limits"]
    assert limits["nvidia.com/gpu.shared"] == "1" and "nvidia.com/gpu" not in limits


SCHEDULER_ARGS = ("--kueue-queue", "team-a-gpu", "--priority-class", "batch-training",
                  "--no-safe-to-evict")


def assert_scheduler_friendly(obj: dict[str, Any]) -> None:
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
    assert obj["spec"]["priorityClassName"] == "batch-training"
    assert obj["metadata"]["annotations"][
        "cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


def test_scheduler_friendly_executor_pod_overrides_the_templates_evict_annotation(tmp_path):
    dags = _promote_target(tmp_path, "kubernetes-executor", *SCHEDULER_ARGS, dag_id="kx_sched")
    obj = worker_pod(tmp_path, scheduled_executor_config(dags, "kx_sched"), "kx_sched")
    assert_scheduler_friendly(obj)  # the template said "true"; ours wins
    assert obj["metadata"]["labels"]["component"] == "worker"


def test_scheduler_friendly_pod_operator_pod(tmp_path):
    dags = promote(tmp_path, "--namespace", "ml", *SCHEDULER_ARGS, dag_id="k8s_sched")
    obj = pod_dict(load_task(dags, "k8s_sched"))
    assert_scheduler_friendly(obj)
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "airgpu-nb"


def test_pod_operator_pod_carries_no_scheduler_metadata_unless_asked(tmp_path):
    obj = pod_dict(load_task(promote(tmp_path, "--namespace", "ml", dag_id="k8s_plain"),
                             "k8s_plain"))
    assert "kueue.x-k8s.io/queue-name" not in obj["metadata"]["labels"]
    assert "priorityClassName" not in obj["spec"]
    assert "cluster-autoscaler.kubernetes.io/safe-to-evict" not in (
        obj["metadata"].get("annotations") or {})


IMPORT_PROBE = """\
import json, runpy, sys
runpy.run_path(sys.argv[1])
heavy = {"kubernetes", "kubernetes_asyncio", "papermill", "tensorflow", "nbformat"}
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)
                 + sorted(m for m in sys.modules if m.startswith((
                     "airflow.providers.cncf.kubernetes.pod_generator",
                     "airflow.providers.cncf.kubernetes.executors")))))
"""


def test_importing_the_executor_dag_imports_no_kubernetes_client(tmp_path):
    import subprocess
    import sys

    dags = _promote_target(tmp_path, "kubernetes-executor", "--gpus", "1", dag_id="kx_parse")
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(dags / "kx_parse.py")],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


TASK_EXECUTOR_PROBE = """\
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
errors = " ".join(str(e) for e in bag.import_errors.values())
dag = bag.dags.get(sys.argv[2])
print(json.dumps({"errors": errors,
                  "executor": dag.get_task("run_notebook").executor if dag else None}))
"""


@pytest.mark.parametrize(("executors", "loads"), [
    ("LocalExecutor,KubernetesExecutor", True),
    ("LocalExecutor", False),
])
def test_task_executor_names_the_kubernetes_executor_and_airflow_checks_it(tmp_path, executors,
                                                                           loads):
    import os
    import subprocess
    import sys

    dags = _promote_target(tmp_path, "kubernetes-executor", "--task-executor", dag_id="kx_exec")
    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": executors}
    out = subprocess.run([sys.executable, "-c", TASK_EXECUTOR_PROBE, str(dags), "kx_exec"],
                         capture_output=True, text=True, env=env, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if loads:
        assert found == {"errors": "", "executor": "KubernetesExecutor"}
    else:
        assert found["executor"] is None and "KubernetesExecutor" in found["errors"]


def test_executor_pod_override_reads_back_as_a_v1pod_in_every_way_airflow_reads_it(tmp_path):
    import copy
    import pickle

    from kubernetes.client import models as k8s

    from airgpu_nb.targets.kubernetes import executor_config

    config = executor_config({"spec": {"containers": [{"name": "base"}]}})
    assert bool(config) and "pod_override" in config and len(config) == 1
    for seen in (config["pod_override"], config.get("pod_override"), dict(config)["pod_override"],
                 {**config}["pod_override"], copy.deepcopy(config)["pod_override"],
                 pickle.loads(pickle.dumps(config))["pod_override"],
                 next(iter(config.values())), dict(config.items())["pod_override"]):
        assert isinstance(seen, k8s.V1Pod) and seen.spec.containers[0].name == "base"


# (args, message) that `--target kubernetes-executor` refuses.
EXECUTOR_REFUSALS = [
    (["--namespace", "ml"], "does not take --namespace"),
    (["--outputs-url", "s3://b/p"], "does not take --outputs-url"),
    (["--notebooks-volume", "dags"], "does not take --notebooks-volume"),
    (["--gpus", "all"], "--gpus all has no meaning for a pod"),
    (["--kueue-queue", "Team_A"], "not a valid Kueue LocalQueue name"),
    (["--priority-class", "High Priority"], "not a valid Kubernetes name"),
    (["--user", "50000:0"], "would run as root"),
    (["--toleration", "dedicated=gpu"], "--toleration takes KEY[=VALUE]:EFFECT"),
]


@pytest.mark.parametrize(("target", "args", "message"),
                         [("kubernetes", *case) for case in POD_REFUSALS]
                         + [("kubernetes-executor", *case) for case in EXECUTOR_REFUSALS])
def test_wrong_pod_settings_are_one_line_errors_and_write_nothing(tmp_path, capsys, target, args,
                                                                  message):
    nb = write_notebook(tmp_path / "nb.ipynb", "x = 1")
    dags = tmp_path / "dags"
    rc = cli.main(["promote", str(nb), "--target", target, "--dags-dir", str(dags), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not dags.exists()


@pytest.mark.parametrize(("target", "args", "message"), [
    ("kubernetes", ["--task-executor"], "does not take --task-executor"),
    ("local", ["--kueue-queue", "q"], "does not take --kueue-queue"),
    ("docker", ["--priority-class", "p"], "does not take --priority-class"),
    ("local", ["--no-safe-to-evict"], "does not take --safe-to-evict"),
])
def test_pod_only_settings_are_refused_elsewhere(tmp_path, capsys, target, args, message):
    nb = write_notebook(tmp_path / "nb.ipynb", "x = 1")
    rc = cli.main(["promote", str(nb), "--target", target, "--dags-dir", str(tmp_path / "d"),
                   *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_executor_regenerate_command_reproduces_the_dag(tmp_path):
    import os
    import subprocess

    from test_settings import header_command

    from conftest import BIN

    nb = write_notebook(tmp_path / "train.ipynb", "print(lr)", parameters="lr = 0.1")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = ["--target", "kubernetes-executor", "--gpus", "2", "--toleration", "a=b:NoExecute",
            "--node-selector", "pool=gpu", "--task-executor", "--image", "reg.example/w:1",
            "--user", "1000:1000", *SCHEDULER_ARGS]
    assert cli.main(["promote", str(nb), "--dags-dir", str(tmp_path / "a"), *args]) == 0
    command = header_command(tmp_path / "a" / "train.py")
    again = subprocess.run(["bash", "-c", command + " --dags-dir b"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, (command, again.stderr)
    assert (tmp_path / "b" / "train.py").read_bytes() == (tmp_path / "a" / "train.py").read_bytes()
