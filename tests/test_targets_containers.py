"""The compose and docker targets, the in-container command, and the options that do not fit a
target: DAGs import through Airflow's DagBag and carry exactly what the spec asks for.

No Docker engine runs here: the DockerOperator is checked as the DagBag built it (the
arguments it would hand to the Docker API), and the in-container command is run for real with
papermill on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbformat
import pytest

from airgpu_nb import cli
from airgpu_nb.container_run import output_location
from airgpu_nb.targets import names
from airgpu_nb.targets.base import template_safe_json
from conftest import write_notebook

NOTE = 'say "hi" \'there\'\nto ünïcode ✓ {{ 7*7 }} {% if 1 %}x{% endif %} {# c #}'


def notebook(tmp_path: Path, name: str = "train.ipynb") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_notebook(
        tmp_path / name,
        "import json, pathlib\n"
        "pathlib.Path('seen.json').write_text(json.dumps({'note': note, 'epochs': epochs, "
        "'lr': lr, 'flag': flag, 'nothing': nothing}))",
        parameters="note = ''\nepochs = 1\nlr = 0.1\nflag = False\nnothing = 'x'")


def promote(tmp_path: Path, target: str, *args: str, dag_id: str, nb: Path | None = None) -> Path:
    nb = nb or notebook(tmp_path)
    dags = tmp_path / "dags"
    argv = ["promote", str(nb), "--target", target, "--dag-id", dag_id, "--dags-dir", str(dags),
            "-r", "note", NOTE, "-p", "epochs", "3", "-p", "lr", "0.01", "-p", "flag", "True",
            "-p", "nothing", "None", "--allow-cpu", *args]
    assert cli.main(argv) == 0
    return dags


def load_dag(dags: Path, dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def render(task: Any, value: Any, conf: dict[str, Any] | None = None) -> Any:
    """Render like a task run does: Airflow's params merge, then its Jinja environment."""
    from airflow.sdk.definitions.param import process_params

    context = {"params": process_params(task.dag, task, conf, suppress_exception=False),
               "run_id": "scheduled__2026-01-02T03:04:05+00:00",
               "ti": SimpleNamespace(try_number=1)}
    return task.render_template(value, context)


def arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


EXPECTED = {"note": NOTE, "epochs": 3, "lr": 0.01, "flag": True, "nothing": None}


# -- every target -------------------------------------------------------------------------------

def test_every_registered_target_promotes_to_a_dag_that_imports_cleanly(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    assert {"local", "compose", "docker", "kubernetes"} <= set(names())
    nb = notebook(tmp_path)
    dags = tmp_path / "dags"
    for target in ("local", "compose", "docker", "kubernetes"):
        assert cli.main(["promote", str(nb), "--target", target, "--dag-id", f"all_{target}",
                         "--dags-dir", str(dags), "-r", "note", NOTE]) == 0
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    assert {f"all_{t}" for t in ("local", "compose", "docker", "kubernetes")} <= set(bag.dags)
    for dag_id, dag in bag.dags.items():
        assert dag.params["note"] == NOTE, dag_id
        assert [t.task_id for t in dag.tasks] == ["run_notebook"]


# -- compose ------------------------------------------------------------------------------------

def test_compose_task_runs_on_the_gpu_queue_holding_one_pool_slot_per_gpu(tmp_path):
    dags = promote(tmp_path, "compose", "--gpus", "2", dag_id="compose_two")
    task = load_dag(dags, "compose_two").get_task("run_notebook")
    assert (task.queue, task.pool, task.pool_slots) == ("gpu", "gpu", 2)
    text = (dags / "compose_two.py").read_text()
    assert "airflow-worker-gpu" in text  # names the compose service that serves the queue


@pytest.mark.parametrize("args", [["--mig", "1g.10gb"], ["--namespace", "ml"], ["--cpu", "2"]])
def test_compose_refuses_settings_only_containers_can_honour(tmp_path, capsys, args):
    nb = notebook(tmp_path)
    rc = cli.main(["promote", str(nb), "--target", "compose", "--dags-dir",
                   str(tmp_path / "dags"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "compose" in err, err
    assert not (tmp_path / "dags").exists()


# -- docker -------------------------------------------------------------------------------------

def _docker_task(tmp_path: Path, *args: str, dag_id: str) -> Any:
    from airflow.providers.docker.operators.docker import DockerOperator

    dags = promote(tmp_path, "docker", *args, dag_id=dag_id)
    task = load_dag(dags, dag_id).get_task("run_notebook")
    assert isinstance(task, DockerOperator)
    return task


def test_docker_task_reserves_n_gpus_and_runs_locked_down(tmp_path):
    from docker.types import DeviceRequest

    task = _docker_task(tmp_path, "--gpus", "2", "--shm-size", "4g", "--memory", "16g",
                        "--cpu", "4", "--image", "registry.example/airgpu:1", dag_id="dk_two")
    (request,) = task.device_requests
    assert isinstance(request, DeviceRequest)
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    assert not request.get("DeviceIDs")
    assert task.image == "registry.example/airgpu:1"
    assert task.user == "1000:1000"
    assert task.shm_size == 4 * 1024**3
    assert task.mem_limit == 16 * 1024**3
    assert task.cpus == 4.0
    # Kept on failure for `docker logs`: the provider's "success" removes failed ones too, so
    # post_execute (which runs after a successful execute only) removes it instead.
    assert task.auto_remove == "never" and task._post_execute_hook.__name__ == "remove_container"
    assert task._pre_execute_hook.__name__ == "check_gpu_host"  # GPUs asked for: ask the daemon
    assert task.privileged is False and not task.cap_add
    assert (task.pool, task.pool_slots, task.queue) == ("gpu", 2, "gpu")
    mounts = {m["Target"]: m for m in task.mounts}
    dags_mount = mounts["/opt/airgpu/dags"]
    assert dags_mount["Source"] == str((tmp_path / "dags").resolve())
    assert dags_mount["Type"] == "bind" and dags_mount["ReadOnly"] is True
    outputs = mounts["/opt/airgpu/outputs"]
    assert outputs["Source"] == "airgpu-outputs" and outputs["Type"] == "volume"
    assert outputs["ReadOnly"] is False


def test_docker_all_gpus_is_count_minus_one_and_zero_gpus_requests_none(tmp_path):
    every = _docker_task(tmp_path / "a", "--gpus", "all", dag_id="dk_all")
    assert [(r["Count"], r["Capabilities"]) for r in every.device_requests] == [(-1, [["gpu"]])]
    assert every.pool_slots == 1
    none = _docker_task(tmp_path / "b", "--gpus", "0", dag_id="dk_none")
    assert none.device_requests == []
    assert none._pre_execute_hook is None  # nothing to ask the daemon


def test_docker_chosen_device_ids_are_requested_by_id(tmp_path):
    task = _docker_task(tmp_path, "--gpus", "2", "--device-id", "1", "--device-id",
                        "GPU-8f6e3a2c-1b2d-4e5f-9a0b-123456789abc",
                        "--outputs-volume", "/srv/airgpu/outputs",
                        "--notebooks-volume", "/srv/airflow/dags", dag_id="dk_ids")
    (request,) = task.device_requests
    assert request["DeviceIDs"] == ["1", "GPU-8f6e3a2c-1b2d-4e5f-9a0b-123456789abc"]
    assert request["Capabilities"] == [["gpu"]] and not request.get("Count")
    mounts = {m["Target"]: m for m in task.mounts}
    assert mounts["/opt/airgpu/dags"]["Source"] == "/srv/airflow/dags"
    assert mounts["/opt/airgpu/outputs"] == {**mounts["/opt/airgpu/outputs"],
                                             "Source": "/srv/airgpu/outputs", "Type": "bind"}


def test_docker_command_is_an_argument_list_carrying_params_exactly(tmp_path):
    task = _docker_task(tmp_path, dag_id="dk_cmd")
    assert isinstance(task.command, list)
    assert task.command[:3] == ["python", "-m", "airgpu_nb.container_run"]
    assert NOTE not in " ".join(task.command)  # user text is never template source
    args = render(task, task.command)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert json.loads(arg(args, "--params-json")) == EXPECTED
    overridden = render(task, task.command, conf={"epochs": 7, "note": "{{ run_id }}"})
    assert json.loads(arg(overridden, "--params-json")) == {**EXPECTED, "epochs": 7,
                                                            "note": "{{ run_id }}"}
    assert arg(args, "--run-id") == "scheduled__2026-01-02T03:04:05+00:00"


def test_static_values_survive_airflow_templating_even_with_jinja_in_a_file_name(tmp_path):
    nb = notebook(tmp_path, "odd {{ name }} {% x %}.ipynb")
    dags = promote(tmp_path, "docker", dag_id="dk_odd", nb=nb)
    task = load_dag(dags, "dk_odd").get_task("run_notebook")
    config = json.loads(arg(render(task, task.command), "--config-json"))
    assert config["name"] == "odd {{ name }} {% x %}.ipynb"


@pytest.mark.parametrize("value", [NOTE, {"a": ["{{", "}}", "%}", "#}"]}, 1.5, None, True,
                                   "{#", "}}{{"])
def test_template_safe_json_round_trips_through_jinja_untouched(value):
    import jinja2

    text = template_safe_json({"v": value})
    assert jinja2.Environment().from_string(text).render() == text
    assert json.loads(text) == {"v": value}


@pytest.mark.parametrize(("args", "message"), [
    (["--mig", "1g.10gb"], "--mig needs a target that can request a MIG slice"),
    (["--device-id", "0", "--device-id", "1"], "names 2 GPU(s) but --gpus is 1"),
    (["--device-id", "0", "--gpus", "all"], "but --gpus is all"),
    (["--device-id", "0", "--device-id", "0", "--gpus", "2"], "names a GPU twice"),
    (["--device-id", "0;rm", ], "--device-id takes a GPU index or UUID"),
    (["--namespace", "ml"], "does not take --namespace (it is for the kubernetes target)"),
    (["--gpu-sharing", "shared"], "does not take --gpu-sharing"),
    (["--toleration", "a:NoSchedule"], "does not take --toleration"),
    (["--outputs-volume", "../x"], "absolute host path or a Docker volume name"),
    (["--shm-size", "2g", "--memory", "1g"], "must be larger than --shm-size"),
    (["--user", "0:0"], "would run as root"),
    (["--gpu-sharing", "half"], "unknown GPU sharing mode 'half'; valid choices: shared"),
])
def test_wrong_docker_settings_are_one_line_errors_and_write_nothing(
        tmp_path, capsys, args, message):
    nb = notebook(tmp_path)
    dags = tmp_path / "dags"
    rc = cli.main(["promote", str(nb), "--target", "docker", "--dags-dir", str(dags), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err
    assert not dags.exists()


def test_promote_help_documents_the_container_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["promote", "--help"])
    out = capsys.readouterr().out
    for option in ("--namespace", "--service-account", "--node-selector", "--toleration",
                   "--gpu-product", "--gpu-sharing", "--device-id", "--cpu", "--memory",
                   "--shm-size", "--outputs-volume", "--outputs-url", "--notebooks-volume"):
        assert option in out


# -- the in-container command -------------------------------------------------------------------

def test_container_command_runs_the_notebook_with_exact_params_and_local_naming(tmp_path):
    """The rendered docker command, run here for real (paths mapped to this machine)."""
    task = _docker_task(tmp_path, dag_id="dk_run")
    args = render(task, task.command, conf={"epochs": 2})
    config = json.loads(arg(args, "--config-json"))
    config["notebook"] = str(tmp_path / "dags" / Path(config["notebook"]).name)
    config["output_dir"] = str(tmp_path / "outputs")
    config["telemetry"] = False
    args[args.index("--config-json") + 1] = json.dumps(config)
    note = "GPU request dropped: Docker 1 on h has no NVIDIA runtime; running on CPU"
    proc = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "AIRGPU_CPU_FALLBACK": note})
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = (tmp_path / "outputs" / "dk_run" / "scheduled__2026-01-02T03_04_05_00_00"
                / "train.ipynb")
    assert proc.stdout.strip() == str(executed)
    assert executed.is_file()
    seen = json.loads((executed.parent / "seen.json").read_text())
    assert seen == {**EXPECTED, "epochs": 2}
    # Progress on stderr (the container's log): every cell, then a summary; and the note.
    nb = nbformat.read(executed, as_version=4)
    assert "airgpu-cpu-fallback" in nb.cells[0].metadata["tags"]
    assert nb.metadata["airgpu"]["cpu_fallback"] == note
    total = len(nb.cells) - 1
    for number in range(1, total + 1):
        assert f"cell {number}/{total} started" in proc.stderr, proc.stderr[-3000:]
        assert re.search(rf"cell {number}/{total} done in \d+\.\d s", proc.stderr)
    assert f"notebook done: {total} cells in" in proc.stderr
    assert note in proc.stderr
    assert "Executing Cell" not in proc.stderr  # papermill's own lines became ours


def test_a_failed_container_run_logs_a_summary_line(tmp_path):
    nb = write_notebook(tmp_path / "boom.ipynb", "print('before', flush=True)",
                        "raise ValueError('boom')", parameters="x = 1")
    config = {"dag_id": "d", "notebook": str(nb), "name": "boom.ipynb", "kernel": "python3",
              "output_dir": str(tmp_path / "out"), "telemetry": False}
    proc = subprocess.run([sys.executable, "-m", "airgpu_nb.container_run", "--run-id", "r",
                           "--config-json", json.dumps(config)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "before" in proc.stderr and "cell 3/3 started" in proc.stderr
    assert re.search(r"notebook failed after \d+\.\d s: cell \d+ raised ValueError: boom",
                     proc.stderr), proc.stderr[-3000:]
    assert (tmp_path / "out" / "d" / "r" / "boom.ipynb").is_file()


# -- the GPU-less Docker host -------------------------------------------------------------------

@pytest.mark.parametrize(("info", "ok", "says"), [
    ({"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}}, True,
     "runtime nvidia"),
    ({"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi",
                                                       "ID": "nvidia.com/gpu=0"}]}, True,
     "CDI nvidia.com/gpu=0"),
    ({"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}, "ServerVersion": "20.10.24",
      "Name": "box"}, False, "no NVIDIA runtime (runtimes: io.containerd.runc.v2, runc)"),
    ({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
      "DiscoveredDevices": [{"Source": "cdi", "ID": "vendor.com/fpga=0"}]}, False,
     "no NVIDIA CDI device in /etc/cdi, /var/run/cdi"),
])
def test_docker_info_says_whether_a_gpu_request_can_be_honoured(info, ok, says):
    from airgpu_nb.docker_host import gpu_support, refusal

    support = gpu_support(info)
    assert support.ok is ok and says in support.detail
    if not ok:
        line = refusal(support)
        assert "\n" not in line
        for fix in ("NVIDIA Container Toolkit", "nvidia-ctk runtime configure --runtime=docker",
                    "restart dockerd", "--allow-cpu"):
            assert fix in line


def test_the_docker_dag_parses_without_the_docker_host_check(tmp_path):
    """The check is imported inside the task's hook: parsing the DAG file pays nothing."""
    dags = promote(tmp_path, "docker", "--gpus", "1", dag_id="dk_parse")
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('airgpu_nb')))")
    proc = subprocess.run([sys.executable, "-c", code, str(dags / "dk_parse.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_container_run_names_a_missing_notebook_and_bad_json(tmp_path):
    config = {"dag_id": "d", "notebook": str(tmp_path / "missing.ipynb"), "name": "n.ipynb",
              "kernel": "python3", "output_dir": str(tmp_path), "telemetry": False}
    base = [sys.executable, "-m", "airgpu_nb.container_run", "--run-id", "r"]
    missing = subprocess.run([*base, "--config-json", json.dumps(config)], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "is not in the container" in missing.stderr
    bad = subprocess.run([*base, "--config-json", json.dumps(config), "--params-json", "[1]"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr


def test_object_store_outputs_are_named_like_local_ones():
    assert output_location("s3://bucket/runs", "dag", "manual__2026-01-01T00:00:00+00:00",
                           "train.ipynb", 2) == (
        "s3://bucket/runs/dag/manual__2026-01-01T00_00_00_00_00/train.try-2.ipynb")
    assert output_location("/out", "dag", "r", "train.ipynb", 1) == "/out/dag/r/train.ipynb"


def test_container_run_lets_a_run_override_the_gpu_check_parameters(tmp_path):
    """`allow_cpu` / `gpus_requested` belong to the check cell: a trigger may override them
    (as on the local target), while a bad user parameter name is still refused."""
    from airgpu_nb.container_run import run
    from airgpu_nb.errors import SpecError

    config = {"dag_id": "d", "notebook": str(tmp_path / "missing.ipynb"), "name": "n.ipynb",
              "kernel": "python3", "output_dir": str(tmp_path), "telemetry": False}
    with pytest.raises(SpecError, match="is not in the container"):
        run(config, {"allow_cpu": True, "gpus_requested": 0, "epochs": 2}, "r", 1)
    with pytest.raises(SpecError, match="invalid parameter name"):
        run(config, {"class": 1}, "r", 1)
