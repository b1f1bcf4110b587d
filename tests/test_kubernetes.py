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


@pytest.mark.parametrize(("args", "message"), [
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
])
def test_wrong_kubernetes_settings_are_one_line_errors_and_write_nothing(
        tmp_path, capsys, args, message):
    nb = write_notebook(tmp_path / "nb.ipynb", "x = 1")
    dags = tmp_path / "dags"
    rc = cli.main(["promote", str(nb), "--target", "kubernetes", "--dags-dir", str(dags), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err
    assert not dags.exists()
