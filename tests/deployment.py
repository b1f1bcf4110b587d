"""A real Airflow 3 deployment for the tests that deploy, trigger and watch (`test_deploy.py`,
`test_runcard.py`): api-server, scheduler and dag-processor with the LocalExecutor on SQLite (the
embedded default), the simple auth manager with a known user, on a free loopback port. Started
once per test module that imports the fixture, stopped at its end, also on failure.

The deployment keeps Airflow's default `dags_are_paused_at_creation=True`: a promoted DAG that
arrives unpaused proves the generated `is_paused_upon_creation=False`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery_stack import free_port

from airgpu_nb.airflow_api import AirflowClient, load_config

BIN = Path(sys.executable).parent
USER = "airgpu"


@dataclass
class Deployment:
    url: str
    password: str
    dags: Path
    outputs: Path
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]]

    def env(self, **extra: str) -> dict[str, str]:
        return {"AIRGPU_AIRFLOW_URL": self.url, "AIRGPU_AIRFLOW_USERNAME": USER,
                "AIRGPU_AIRFLOW_PASSWORD": self.password, **extra}

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """SIGTERM each process group (gunicorn/uvicorn workers, task supervisors), then SIGKILL."""
    for _name, proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for _name, proc in reversed(procs):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    root = Path(tempfile.mkdtemp(prefix="airgpu-deploy-"))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    home, dags, outputs, logs = (root / n for n in ("airflow", "dags", "outputs", "logs"))
    for folder in (home, dags, outputs, logs):
        folder.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    password = "pw-" + secrets.token_hex(12)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: password}))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
        # A re-promotion within this window shows its new source before its new DAG.
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
        "AIRGPU_OUTPUT_DIR": str(outputs),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for key in ("AIRGPU_AIRFLOW_URL", "AIRGPU_AIRFLOW_USERNAME", "AIRGPU_AIRFLOW_PASSWORD",
                "AIRGPU_AIRFLOW_TOKEN", "AIRGPU_DAGS_DIR"):
        env.pop(key, None)
    airflow = str(BIN / "airflow")
    started = time.monotonic()
    try:
        for args in (["db", "migrate"], ["pools", "set", "gpu", "2", "one slot per GPU"]):
            done = subprocess.run([airflow, *args], env=env, capture_output=True, text=True,
                                  timeout=240)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        for name, argv in (("api-server", ["api-server", "--host", "127.0.0.1", "--port",
                                           str(port), "--workers", "1"]),
                           ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
            with open(logs / f"{name}.log", "wb") as log:
                procs.append((name, subprocess.Popen(
                    [airflow, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)))
        deployment = Deployment(url, password, dags, outputs, logs, procs)
        config = load_config(deployment.env())
        deadline = time.monotonic() + 120
        while True:
            deployment.check_alive()
            try:
                with AirflowClient(config) as client:
                    client.version()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        print(f"deployment up in {time.monotonic() - started:.1f}s")
        yield deployment
    except BaseException:
        for name, _proc in procs:
            text = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
            print(f"----- {name} -----\n{text}", file=sys.stderr)
        raise
    finally:
        _stop(procs)
        shutil.rmtree(root, ignore_errors=True)


def use_deployment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], cwd: Path) -> None:
    """Point airgpu's client at a deployment through the environment only: its URL and
    credentials, no token from outside, and a working directory with no pyproject.toml above."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AIRGPU_AIRFLOW_TOKEN", raising=False)
    monkeypatch.chdir(cwd)


@pytest.fixture
def configured(deployment: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    use_deployment(monkeypatch, deployment.env(), tmp_path)
    return deployment
