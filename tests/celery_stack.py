"""A real CeleryExecutor deployment of Airflow 3, started on loopback ports: PostgreSQL and Redis
(Debian packages), api-server, scheduler, dag-processor, a CPU worker on queue `default` and a
GPU worker on queue `gpu` (the `gpu` pool has one slot), the simple auth manager with one known
user. Shared by `tests/test_celery.py` (its fixture) and `bench/run.py --only deploy`, which is
why it is a plain context manager and imports nothing from pytest or the tests' conftest.

Every process runs in its own process group so that stopping reaches every child (uvicorn
workers, Celery pool processes, task supervisors); everything is stopped on exit, also on
failure.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
USER = "airgpu"


class StackUnavailable(RuntimeError):
    """PostgreSQL or Redis is not installed here."""


def postgres_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def missing_services() -> str | None:
    """Why the stack cannot start here, or None."""
    if postgres_bin() is None or shutil.which("redis-server") is None:
        return ("PostgreSQL and Redis are needed: run `make sysdeps` (Debian packages "
                "postgresql and redis-server)")
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Processes of the deployment, each in its own process group."""

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


def wait_for(what: str, ready: Callable[[], Any], stack: Stack, timeout: float) -> Any:
    """``ready()``'s first truthy answer, polled every second while every process lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        result = ready()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class CeleryDeployment:
    """The running stack: where its API is, its user, its folders and environment."""

    stack: Stack
    env: dict[str, str]
    url: str
    root: Path
    password: str = field(repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def dags(self) -> Path:
        return self.root / "dags"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def client_env(self) -> dict[str, str]:
        """What `airgpu deploy/trigger/runs` need to reach this deployment as its user."""
        return {"AIRGPU_AIRFLOW_URL": self.url, "AIRGPU_AIRFLOW_USERNAME": USER,
                "AIRGPU_AIRFLOW_PASSWORD": self.password}

    def token(self) -> str:
        """A JWT of the simple auth manager for USER (``POST /auth/token``)."""
        if self._token is None:
            body = json.dumps({"username": USER, "password": self.password}).encode()
            request = urllib.request.Request(f"{self.url}/auth/token", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                self._token = json.loads(response.read())["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        """``/api/v2{path}`` as USER; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/api/v2{path}", data=data, method=method,
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")


def _start_postgres(stack: Stack, root: Path, port: int, password: str) -> None:
    pg = postgres_bin()
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

    wait_for("PostgreSQL", ready, stack, 60)


def _hostname_module(root: Path) -> Path:
    """Each worker names itself through Airflow's `hostname_callable`; both run on this
    machine, so the task instance's hostname tells which worker ran it."""
    folder = root / "pylib"
    folder.mkdir()
    (folder / "airgpu_test_hosts.py").write_text(
        "def gpu():\n    return 'gpu-worker.airgpu-test'\n\n\n"
        "def cpu():\n    return 'cpu-worker.airgpu-test'\n")
    return folder


@contextlib.contextmanager
def celery_deployment(echo: Callable[[str], None] | None = None) -> Iterator[CeleryDeployment]:
    """Start the stack, wait until its API answers as USER, yield it; stop it at the end.
    On failure each process's log tail goes to ``echo`` (default: stderr)."""
    why = missing_services()
    if why:
        raise StackUnavailable(why)
    say = echo or (lambda text: print(text, file=sys.stderr))
    root = Path(tempfile.mkdtemp(prefix="airgpu-celery-"))
    stack = Stack(root)
    try:
        pg_port, redis_port, api_port = free_port(), free_port(), free_port()
        password = secrets.token_hex(16)
        _start_postgres(stack, root, pg_port, password)
        stack.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(root)])
        db = f"airflow:{password}@127.0.0.1:{pg_port}/postgres"
        home, dags, outputs = root / "airflow", root / "dags", root / "outputs"
        for folder in (home, dags, outputs):
            folder.mkdir()
        user_password = "pw-" + secrets.token_hex(12)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({USER: user_password}))
        api = f"http://127.0.0.1:{api_port}"
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
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
        for key in ("AIRGPU_AIRFLOW_URL", "AIRGPU_AIRFLOW_USERNAME", "AIRGPU_AIRFLOW_PASSWORD",
                    "AIRGPU_AIRFLOW_TOKEN", "AIRGPU_DAGS_DIR"):
            env.pop(key, None)
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
        deployment = CeleryDeployment(stack, env, api, root, user_password)

        def api_up() -> bool:
            try:
                return deployment.api("GET", "/version") is not None
            except (urllib.error.URLError, OSError):
                return False

        wait_for("the api-server", api_up, stack, 120)
        yield deployment
    except BaseException:
        for name, _proc in stack.procs:
            say(f"----- {name} -----\n{stack.tail(name)}")
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
