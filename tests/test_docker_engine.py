"""The docker target against a real Docker engine: `airflow dags test` runs the generated DAG's
real DockerOperator, which starts the runtime image built from docker/Dockerfile.runtime.

The session starts `dockerd` when no daemon answers (and stops the one it started), and builds
the runtime image once (`scripts/docker_images.py --only runtime`: on a local Debian base with
tensorflow-cpu where tensorflow/tensorflow cannot be pulled; about 2 minutes from nothing, seconds
when the layers are cached). This host has no GPU runtime, which is exactly what the GPU-less
diagnosis needs. Only images, containers and volumes named `airgpu-nb*` (or started from the
runtime image by these tests) are touched.

Cost on the 2-core machine (image cached): the example's training run about 45 s, the awkward
parameters run about 30 s, the failing notebook with its retry about 50 s, the GPU-less refusal
about 15 s, the image inspection about 15 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from docker_daemon import build_images
from docker_daemon import docker as _docker

from airgpu_nb import cli
from airgpu_nb.findings import first_error, gpu_report
from conftest import ROOT, write_notebook

pytestmark = pytest.mark.docker

RUNTIME = "airgpu-nb-runtime:0.1.0"
NOTE = 'say "hi" \'there\'\nto ünïcode ✓ 日本 {{ x }} {% if 1 %}x{% endif %} {# c #}'


@pytest.fixture(scope="session")
def runtime_image(docker_daemon) -> str:
    """Built once per session; the layers stay cached between sessions."""
    build_images(["runtime"])
    return RUNTIME


def _containers() -> set[str]:
    out = _docker("ps", "-a", "--filter", f"ancestor={RUNTIME}", "--format", "{{.ID}}").stdout
    return set(out.split())


@pytest.fixture
def new_containers(runtime_image) -> Iterator[set[str]]:
    """Containers the test leaves (a failed run keeps its own); removed afterwards."""
    before = _containers()
    left: set[str] = set()
    yield left
    left |= _containers() - before
    for container in left:
        _docker("rm", "-f", container, check=False)


@pytest.fixture
def outputs(tmp_path) -> Path:
    """A host folder bind-mounted as /opt/airgpu/outputs, owned by the container's user."""
    path = tmp_path / "outputs"
    path.mkdir()
    os.chown(path, 1000, 1000)
    return path


def promote_docker(airflow_home, notebook: Path, dag_id: str, outputs: Path, *args: str) -> None:
    argv = ["promote", str(notebook), "--target", "docker", "--dag-id", dag_id,
            "--dags-dir", str(airflow_home.dags), "--outputs-volume", str(outputs),
            "--image", RUNTIME, "--force", *args]
    assert cli.main(argv) == 0


def dags_test(airflow_home, dag_id: str, conf: dict | None = None, timeout: int = 600):
    args = ["dags", "test", dag_id] + (["-c", json.dumps(conf)] if conf else [])
    started = time.monotonic()
    run = airflow_home.airflow(*args, check=False, timeout=timeout)
    run.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    run.log = run.stdout + run.stderr  # type: ignore[attr-defined]
    return run


def executed(outputs: Path, dag_id: str) -> list[Path]:
    return sorted((outputs / dag_id).glob("*/*.ipynb"))


# -- the image ----------------------------------------------------------------------------------

def _proxy_ca_lines(image: str) -> list[str]:
    """Base64 lines of the certificates in the host bundle that the image's own (Debian) bundle
    lacks: the TLS proxy's CA the build was given as a secret."""
    host = Path("/etc/ssl/certs/ca-certificates.crt")
    if not host.is_file():
        return []
    inside = _docker("run", "--rm", "--entrypoint", "cat", image,
                     "/etc/ssl/certs/ca-certificates.crt", check=False).stdout
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----",
                        host.read_text(), re.S)
    extra = [b for b in blocks if b not in inside]
    return [b.splitlines()[len(b.splitlines()) // 2] for b in extra]


def test_runtime_image_runs_as_1000_and_keeps_no_build_secret(runtime_image):
    """The proxy CA reached pip as a BuildKit secret: it is in no layer, env or history."""
    config = json.loads(_docker("image", "inspect", runtime_image).stdout)[0]["Config"]
    assert config["User"] == "1000:1000"
    history = _docker("history", "--no-trunc", "--format", "{{.CreatedBy}}",
                      runtime_image).stdout
    assert "BEGIN CERTIFICATE" not in history and "ca-certificates.crt" not in history
    names = [e.split("=", 1)[0] for e in config.get("Env") or []]
    assert not [n for n in names if re.search(r"CERT|CA_BUNDLE|SSL", n)], names
    for line in _proxy_ca_lines(runtime_image):
        found = _docker("run", "--rm", "--user", "0", "--entrypoint", "grep", runtime_image,
                        "-rlF", "--exclude-dir=proc", "--exclude-dir=sys", line, "/etc", "/opt",
                        "/usr/local", "/root", "/home", "/tmp", check=False)
        assert found.stdout.strip() == "", f"the proxy CA is baked into {found.stdout}"


# -- runs ---------------------------------------------------------------------------------------

def test_example_trains_on_cpu_with_allow_cpu_and_streams_progress(
        airflow_home, runtime_image, outputs, new_containers, example_notebook):
    """`--gpus 1 --allow-cpu` on a daemon without a GPU runtime: the request is dropped (said
    in the log and the executed notebook), the example trains with a trigger-time override,
    and the task log shows the notebook's progress."""
    promote_docker(airflow_home, example_notebook, "docker_train", outputs,
                   "--gpus", "1", "--allow-cpu", "-p", "epochs", "2", "--retries", "0")
    before = _containers()
    run = dags_test(airflow_home, "docker_train", conf={"epochs": 3})
    assert run.returncode == 0, run.log[-6000:]
    [notebook] = executed(outputs, "docker_train")
    assert notebook.stat().st_uid == 1000  # the container's user, not root
    nb = nbformat.read(notebook, as_version=4)
    assert first_error(nb) is None
    assert "running on CPU because --allow-cpu" in gpu_report(nb)["message"]
    assert "airgpu-cpu-fallback" in nb.cells[0].metadata["tags"]
    assert "no NVIDIA runtime" in nb.metadata["airgpu"]["cpu_fallback"]
    metrics = json.loads((notebook.parent / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_accuracy"] > 0.8
    assert (notebook.parent / "model.keras").is_file()
    assert (notebook.parent / "train_classifier.prom").is_file()
    log = run.log
    assert "GPU request dropped" in log and "--allow-cpu" in log
    total = len(nb.cells) - 1  # the CPU-fallback note was added after the run
    for number in (1, total):
        assert f"cell {number}/{total} started" in log, log[-6000:]
    assert re.search(rf"cell {total}/{total} done in \d+\.\d s", log)
    assert "Epoch 3/3" in log  # the notebook's own output (Keras)
    assert re.search(r"notebook done: \d+ cells in", log)
    assert log.index("cell 1/") < log.index("Epoch 1/3") < log.index("notebook done")
    assert _containers() == before  # removed on success


def test_awkward_params_and_a_conf_override_reach_the_kernel_with_the_shm_size(
        airflow_home, runtime_image, outputs, new_containers, tmp_path):
    nb = write_notebook(
        tmp_path / "probe.ipynb",
        "import json, os\nst = os.statvfs('/dev/shm')\n"
        "json.dump({'note': note, 'epochs': epochs, 'flag': flag, 'uid': os.getuid(),\n"
        "           'shm': st.f_blocks * st.f_frsize}, open('seen.json', 'w'))",
        parameters="note = ''\nepochs = 1\nflag = False")
    promote_docker(airflow_home, nb, "docker_probe", outputs, "--gpus", "0",
                   "--shm-size", "96m", "-r", "note", NOTE, "-p", "flag", "True",
                   "--retries", "0")
    override = "conf: 'q' \"qq\"\n{{ run_id }} ✓"
    run = dags_test(airflow_home, "docker_probe", conf={"epochs": 5, "note": override})
    assert run.returncode == 0, run.log[-6000:]
    [notebook] = executed(outputs, "docker_probe")
    seen = json.loads((notebook.parent / "seen.json").read_text(encoding="utf-8"))
    assert seen == {"note": override, "epochs": 5, "flag": True, "uid": 1000,
                    "shm": 96 * 1024**2}
    assert "GPU request dropped" not in run.log  # nothing was requested


def test_a_failing_notebook_keeps_each_try_and_its_stopped_container(
        airflow_home, runtime_image, outputs, new_containers, tmp_path):
    nb = write_notebook(tmp_path / "boom.ipynb", "print('before')",
                        "raise ValueError('boom at ' + str(epoch))", "print('never')",
                        parameters="epoch = 1")
    promote_docker(airflow_home, nb, "docker_boom", outputs, "--gpus", "0",
                   "--retries", "1", "--retry-delay", "1")
    before = _containers()
    run = dags_test(airflow_home, "docker_boom")
    assert run.returncode != 0
    names = [p.name for p in executed(outputs, "docker_boom")]
    assert names == ["boom.ipynb", "boom.try-2.ipynb"], run.log[-4000:]
    for path in executed(outputs, "docker_boom"):
        error = first_error(nbformat.read(path, as_version=4))
        assert error["ename"] == "ValueError" and error["evalue"] == "boom at 1"
    kept = _containers() - before
    new_containers |= kept
    assert len(kept) == 2  # one stopped container per try, for `docker logs`
    for container in kept:
        state = json.loads(_docker("inspect", container).stdout)[0]["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 1
    assert "notebook failed after" in run.log and "boom at 1" in run.log


def test_a_gpu_request_on_a_gpu_less_daemon_fails_at_once_naming_the_fix(
        airflow_home, runtime_image, outputs, new_containers, tmp_path):
    """No NVIDIA runtime here: one clear line, no container, no retry (the default retry delay
    is 5 minutes, so a retry would blow the timeout)."""
    info = json.loads(_docker("info", "--format", "{{json .}}").stdout)
    from airgpu_nb.docker_host import gpu_support

    if gpu_support(info).ok:
        pytest.skip("this Docker daemon has a GPU runtime")
    nb = write_notebook(tmp_path / "gpu.ipynb", "open('trained', 'w').write('yes')",
                        parameters="x = 1")
    promote_docker(airflow_home, nb, "docker_gpu", outputs, "--gpus", "1", "--no-allow-cpu",
                   "--retries", "2")
    before = _containers()
    run = dags_test(airflow_home, "docker_gpu", timeout=240)
    assert run.returncode != 0
    assert run.seconds < 120, run.seconds
    lines = [ln for ln in run.log.splitlines() if "cannot give this container a GPU" in ln]
    assert lines, run.log[-4000:]
    assert "nvidia-ctk runtime configure --runtime=docker" in lines[0]
    assert "NVIDIA Container Toolkit" in lines[0] and "restart dockerd" in lines[0]
    assert "could not select device driver" not in run.log
    assert "up_for_retry" not in run.log.lower()
    assert _containers() == before  # refused before any container was created
    assert executed(outputs, "docker_gpu") == []


def test_a_notebook_with_data_and_a_helper_module_runs_in_the_container_from_its_bundle(
        airflow_home, runtime_image, outputs, new_containers, tmp_path):
    """Issue 9 in a container: the bundle beside the DAG travels with the mounted DAG folder,
    the run starts in a folder seeded from it, and what it writes lands beside the notebook."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "tests" / "projects" / "reads_data", project)
    promote_docker(airflow_home, project / "reads_data.ipynb", "docker_reads_data", outputs,
                   "--gpus", "0", "--retries", "0")
    shutil.rmtree(project)  # the run must need nothing but the DAG folder
    run = dags_test(airflow_home, "docker_reads_data")
    assert run.returncode == 0, run.log[-6000:]
    [notebook] = executed(outputs, "docker_reads_data")
    nb = nbformat.read(notebook, as_version=4)
    assert first_error(nb) is None
    assert gpu_report(nb)["packages"]["ok"] is True
    assert (notebook.parent / "result.txt").read_text() != ""
    assert json.loads((notebook.parent / "artifacts" / "total.json").read_text())["total"]
    assert not (notebook.parent / "data").exists()  # inputs are not copied into outputs
