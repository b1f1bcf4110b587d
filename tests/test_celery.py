"""A real distributed run: Airflow 3 with CeleryExecutor on PostgreSQL and Redis, a CPU worker on
queue `default` and a GPU worker on queue `gpu`, all started here on loopback ports.

A `compose`-target DAG is triggered twice at once. Its task must run on the `gpu` worker (the
task instance's hostname comes from each worker's own `hostname_callable`, and the notebook
records the worker it ran in), leave its executed notebook where the local naming says, and the
`gpu` pool with one slot must keep the two runs apart even though the GPU worker could run two
tasks at a time. Everything started is stopped at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from glob import glob
from pathlib import Path
from typing import Any

import pytest

from airgpu_nb import cli
from airgpu_nb.run import executed_path
from conftest import write_notebook

pytestmark = [pytest.mark.celery, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent
DAG_ID = "celery_gpu_check"
NOTEBOOK = "celery_nb.ipynb"


def _postgres_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Processes of the deployment, each in its own process group so teardown reaches every
    child (gunicorn/uvicorn workers, Celery pool processes, task supervisors)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs = root / "logs"
        self.logs.mkdir()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              user: str | None = None) -> subprocess.Popen[bytes]:
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=self.root)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM every group (postgres: SIGINT, its fast shutdown), then SIGKILL stragglers."""
        for name, proc in reversed(self.procs):
            sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
            _signal_group(proc, sig)
        deadline = time.monotonic() + 20
        for _name, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid


def _wait(what: str, ready, stack: Stack, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        result = ready()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start_postgres(stack: Stack, root: Path, port: int, password: str) -> None:
    pg = _postgres_bin()
    assert pg is not None
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    pwfile = root / "pgpass"
    pwfile.write_text(password)
    user = "postgres" if os.geteuid() == 0 else None  # postgres refuses to run as root
    if user is not None:
        shutil.chown(root, user)
        for path in (sockets, pwfile):
            shutil.chown(path, user)
    initdb = ["initdb", "-D", str(data), "-U", "airflow", "--auth=scram-sha-256",
              f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"]
    argv = [str(pg / initdb[0]), *initdb[1:]]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, timeout=120, cwd=root)
    stack.start("postgres", [str(pg / "postgres"), "-D", str(data), "-p", str(port),
                             "-k", str(sockets), "-c", "listen_addresses=127.0.0.1",
                             "-c", "fsync=off", "-c", "synchronous_commit=off",
                             "-c", "full_page_writes=off", "-c", "max_connections=200"],
                user=user)

    def ready() -> bool:
        probe = subprocess.run([str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                               capture_output=True)
        return probe.returncode == 0

    _wait("PostgreSQL", ready, stack, 60)


def _hostname_module(root: Path) -> Path:
    """Each worker names itself through Airflow's `hostname_callable`; both run on this
    machine, so the task instance's hostname tells which worker ran it."""
    folder = root / "pylib"
    folder.mkdir()
    (folder / "airgpu_test_hosts.py").write_text(
        "def gpu():\n    return 'gpu-worker.airgpu-test'\n\n\n"
        "def cpu():\n    return 'cpu-worker.airgpu-test'\n")
    return folder


def _api(base: str, method: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/v2{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture
def celery_stack() -> Iterator[tuple[Stack, dict[str, str], str, Path]]:
    if _postgres_bin() is None or shutil.which("redis-server") is None:
        pytest.fail("PostgreSQL and Redis are needed: run `make sysdeps` (Debian packages "
                    "postgresql and redis-server)")
    root = Path(tempfile.mkdtemp(prefix="airgpu-celery-"))
    stack = Stack(root)
    try:
        pg_port, redis_port, api_port = _free_port(), _free_port(), _free_port()
        password = secrets.token_hex(16)
        _start_postgres(stack, root, pg_port, password)
        stack.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(root)])
        db = f"airflow:{password}@127.0.0.1:{pg_port}/postgres"
        home, dags, outputs = root / "airflow", root / "dags", root / "outputs"
        for folder in (home, dags, outputs):
            folder.mkdir()
        api = f"http://127.0.0.1:{api_port}"
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{db}",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRGPU_OUTPUT_DIR": str(outputs),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(_hostname_module(root)), os.environ.get("PYTHONPATH")) if p),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        airflow = str(BIN / "airflow")
        migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True,
                                 text=True, timeout=240)
        assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
        pool = subprocess.run([airflow, "pools", "set", "gpu", "1", "one slot per GPU"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert pool.returncode == 0, pool.stderr[-2000:]
        stack.start("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port",
                                   str(api_port), "--workers", "1"], env)
        stack.start("scheduler", [airflow, "scheduler"], env)
        stack.start("dag-processor", [airflow, "dag-processor"], env)
        for queue, concurrency in (("default", "1"), ("gpu", "2")):
            worker_env = {**env, "AIRGPU_TEST_WORKER": queue,
                          "AIRFLOW__CORE__HOSTNAME_CALLABLE":
                              f"airgpu_test_hosts.{'gpu' if queue == 'gpu' else 'cpu'}"}
            stack.start(f"worker-{queue}", [
                airflow, "celery", "worker", "--queues", queue, "--concurrency", concurrency,
                "--celery-hostname", f"{queue}@airgpu-test", "--skip-serve-logs",
                "--without-gossip", "--without-mingle"], worker_env)
        yield stack, env, api, root
    except BaseException:
        for name, _proc in stack.procs:
            print(f"----- {name} -----\n{stack.tail(name)}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_compose_dag_runs_on_the_gpu_worker_and_the_gpu_pool_serialises_runs(celery_stack):
    stack, _env, api, root = celery_stack
    started = time.monotonic()
    nb = write_notebook(
        root / NOTEBOOK,
        "import os, pathlib, time\n"
        "pathlib.Path('worker.txt').write_text(os.environ.get('AIRGPU_TEST_WORKER', '?'))\n"
        "time.sleep(seconds)",
        parameters="seconds = 1")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", DAG_ID,
                     "--dags-dir", str(root / "dags"), "--allow-cpu", "--no-telemetry",
                     "-p", "seconds", "3"]) == 0

    def api_up() -> bool:
        try:
            return _api(api, "GET", "/version") is not None
        except (urllib.error.URLError, OSError):
            return False

    _wait("the api-server", api_up, stack, 120)

    def dag_parsed() -> bool:
        try:
            return _api(api, "GET", f"/dags/{DAG_ID}")["dag_id"] == DAG_ID
        except urllib.error.HTTPError:
            return False

    _wait("the dag-processor to parse the DAG", dag_parsed, stack, 120)
    _api(api, "PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    run_ids = [_api(api, "POST", f"/dags/{DAG_ID}/dagRuns",
                    {"logical_date": None, "dag_run_id": f"manual__gpu_{i}"})["dag_run_id"]
               for i in range(2)]

    def finished() -> list[dict[str, Any]] | None:
        runs = [_api(api, "GET", f"/dags/{DAG_ID}/dagRuns/{run_id}") for run_id in run_ids]
        if all(run["state"] in ("success", "failed") for run in runs):
            return runs
        return None

    runs = _wait("both DAG runs to finish", finished, stack, 300)
    tis = [_api(api, "GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/run_notebook")
           for run_id in run_ids]
    assert [run["state"] for run in runs] == ["success", "success"], (
        stack.tail("worker-gpu"), tis)
    for ti, run_id in zip(tis, run_ids, strict=True):
        assert ti["state"] == "success"
        assert ti["queue"] == "gpu" and ti["pool"] == "gpu" and ti["pool_slots"] == 1
        assert ti["hostname"] == "gpu-worker.airgpu-test"
        executed = executed_path(root / "outputs", DAG_ID, run_id, NOTEBOOK)
        assert executed.is_file(), sorted(str(p) for p in (root / "outputs").rglob("*"))
        assert (executed.parent / "worker.txt").read_text() == "gpu"
        cells = json.loads(executed.read_text())["cells"]
        assert any("airgpu-gpu-check" in c["metadata"].get("tags", []) for c in cells)
    first, second = sorted(
        (datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
         for ti in tis)
    assert first[1] <= second[0], f"GPU runs overlapped: {first} and {second}"
    assert "airgpu-test" in stack.tail("worker-gpu", 200_000)
    print(f"celery run: {time.monotonic() - started:.1f}s after the stack started")
