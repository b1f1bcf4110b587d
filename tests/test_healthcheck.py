"""`airgpu healthcheck-dag`: a standing DAG that checks GPU slots on a schedule. It runs for real
under `airflow dags test` (this machine has no GPU: it must fail saying so, naming the node, and
pass with --allow-cpu), publishes Prometheus metrics with the run telemetry's names, and on a
KubernetesExecutor node pool gets one GPU worker pod per slot built by the provider's own code."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from airgpu_nb import cli
from airgpu_nb.healthcheck import pin_slot


def metric_lines(folder: Path, task: str) -> dict[str, str]:
    (prom,) = folder.rglob(f"{task}.prom")
    found = {}
    for line in prom.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            found[name] = value
    return found


def dags_test(airflow_home, dags: Path, outputs: Path, dag_id: str):
    return airflow_home.airflow("dags", "test", dag_id, check=False, env={
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRGPU_OUTPUT_DIR": str(outputs)})


def test_health_dag_fails_on_a_machine_without_gpu_naming_node_and_cause(airflow_home, tmp_path,
                                                                         capsys):
    dags = tmp_path / "dags"
    assert cli.main(["healthcheck-dag", "--dag-id", "hc_cpu", "--dags-dir", str(dags),
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dag_file"] == str(dags / "hc_cpu.py")
    result = dags_test(airflow_home, dags, tmp_path / "out", "hc_cpu")
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    node = socket.gethostname()
    assert (f"GPU health check failed on node {node} (worker {node}, slot 0): no GPU usable: "
            in log), log[-3000:]
    assert "built without CUDA" in log  # the likely cause, from the verification cell's logic
    metrics = metric_lines(tmp_path / "out", "check_gpu_slot_0")
    assert metrics["airgpu_gpu_check_ok"] == "0.0"
    assert metrics["airgpu_gpu_check_gpus_usable"] == "0.0"
    # the run telemetry's own series and names, so dashboards need nothing new
    assert {"airgpu_run_duration_seconds", "airgpu_run_gpu_count",
            "airgpu_run_cpu_utilization_mean_percent"} <= set(metrics)


def test_health_dag_passes_with_allow_cpu_and_still_reports_no_gpu(airflow_home, tmp_path):
    dags = tmp_path / "dags"
    assert cli.main(["healthcheck-dag", "--dag-id", "hc_allow", "--dags-dir", str(dags),
                     "--allow-cpu", "--slots", "2", "--schedule", "*/30 * * * *"]) == 0
    result = dags_test(airflow_home, dags, tmp_path / "out", "hc_allow")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for slot in (0, 1):
        metrics = metric_lines(tmp_path / "out", f"check_gpu_slot_{slot}")
        assert metrics["airgpu_gpu_check_ok"] == "1.0"
        assert metrics["airgpu_gpu_check_gpus_usable"] == "0.0"


def test_local_health_dag_has_one_task_per_slot_on_queue_and_pool(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    dags = tmp_path / "dags"
    assert cli.main(["healthcheck-dag", "--dag-id", "hc_slots", "--dags-dir", str(dags),
                     "--slots", "4", "--queue", "gpu-a100", "--pool", "a100"]) == 0
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    dag = bag.dags["hc_slots"]
    assert sorted(t.task_id for t in dag.tasks) == [f"check_gpu_slot_{i}" for i in range(4)]
    assert {(t.queue, t.pool, t.pool_slots) for t in dag.tasks} == {("gpu-a100", "a100", 1)}
    assert all(t.executor_config == {} for t in dag.tasks)
    assert dag.schedule == "@hourly"


def test_node_pool_health_dag_gets_one_gpu_pod_per_slot_built_by_the_provider(tmp_path):
    from test_kubernetes import GPU_TOLERATION, container, worker_pod

    dags = tmp_path / "dags"
    assert cli.main(["healthcheck-dag", "--dag-id", "hc_pool", "--dags-dir", str(dags),
                     "--target", "kubernetes-executor", "--slots", "2",
                     "--node-selector", "cloud.google.com/gke-nodepool=gpu-pool",
                     "--toleration", "dedicated=gpu:NoSchedule"]) == 0
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(dag_folder=str(dags)).dags["hc_pool"]
    assert {t.pool for t in dag.tasks} == {"default_pool"}
    stored = json.loads(json.dumps(DagSerialization.to_dict(dag)))
    task = DagSerialization.from_dict(stored).get_task("check_gpu_slot_1")
    obj = worker_pod(tmp_path, task.executor_config, "hc_pool")
    assert container(obj)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert obj["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                           "cloud.google.com/gke-nodepool": "gpu-pool"}
    assert obj["spec"]["tolerations"][:2] == [GPU_TOLERATION, {
        "key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    env = {e["name"]: e for e in container(obj)["env"]}
    assert env["AIRGPU_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize(("args", "message"), [
    (["--slots", "0"], "--slots takes a number of GPU slots from 1 to 64"),
    (["--dag-id", "bad id"], "invalid DAG id"),
    (["--schedule", "every hour"], "invalid schedule"),
    (["--node-selector", "pool=gpu"], "are for --target kubernetes-executor"),
    (["--queue", "gpu{{x}}"], "--queue takes a plain name"),
    (["--target", "kubernetes-executor", "--toleration", "dedicated=gpu"],
     "--toleration takes KEY[=VALUE]:EFFECT"),
    (["--target", "docker"], "invalid choice"),
])
def test_wrong_health_dag_options_are_one_line_and_write_nothing(tmp_path, capsys, args,
                                                                 message):
    rc = cli.main(["healthcheck-dag", "--dags-dir", str(tmp_path / "d"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "d").exists()


def test_a_hand_edited_health_dag_is_kept_unless_forced(tmp_path, capsys):
    argv = ["healthcheck-dag", "--dag-id", "hc_edit", "--dags-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    path = tmp_path / "hc_edit.py"
    path.write_text(path.read_text() + "# mine\n")
    assert cli.main(argv) == 2
    assert "edited by hand" in capsys.readouterr().err
    assert path.read_text().endswith("# mine\n")
    assert cli.main([*argv, "--force"]) == 0
    assert not path.read_text().endswith("# mine\n")


def test_the_regenerate_line_writes_the_same_dag(tmp_path):
    import shlex

    argv = ["--dag-id", "hc_regen", "--target", "kubernetes-executor", "--slots", "3",
            "--node-selector", "pool=gpu", "--toleration", "a=b:NoExecute", "--gpu-product",
            "NVIDIA-H100-80GB-HBM3", "--allow-cpu", "--task-executor"]
    assert cli.main(["healthcheck-dag", "--dags-dir", str(tmp_path / "a"), *argv]) == 0
    first = (tmp_path / "a" / "hc_regen.py").read_text()
    line = next(ln for ln in first.splitlines() if ln.startswith("#   airgpu healthcheck-dag"))
    words = shlex.split(line[len("#   "):])[1:]
    assert cli.main([*words, "--dags-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "hc_regen.py").read_text() == first


def test_each_slot_checks_its_own_gpu(monkeypatch):
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pin_slot(1, None) == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    inventory = {"devices": [{"uuid": "GPU-aaa"}, {"uuid": "GPU-bbb"}]}
    assert pin_slot(0, inventory) == "GPU-aaa"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pin_slot(2, inventory) is None  # a slot with no GPU sees none, never GPU 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "-1"
