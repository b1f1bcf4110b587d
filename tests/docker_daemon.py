"""A Docker daemon and the project's images for the tests that drive a real engine
(tests/test_docker_engine.py, tests/test_compose_stack.py; marker `docker`).

The session starts `dockerd` when no daemon answers and stops the one it started; images are
built with scripts/docker_images.py, the same code as `make images` (on a local Debian base where
the official ones cannot be pulled). Only images, containers and volumes named `airgpu-nb*` are
touched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIDFILE = Path("/var/run/airgpu-nb-dockerd.pid")
DAEMON_LOG = Path("/var/log/airgpu-nb-dockerd.log")


def docker(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[None]:
    """A daemon that answers: the one running, or `dockerd` started here and stopped after."""
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        pytest.skip("no Docker engine here: `make sysdeps` installs docker.io")
    images = image_builder()
    if not images.daemon_answers() and os.geteuid() != 0:
        pytest.skip("no Docker daemon answers and starting dockerd needs root")
    with images.running_daemon(DAEMON_LOG, PIDFILE):
        yield


def image_builder() -> ModuleType:
    """scripts/docker_images.py, the code behind `make images`."""
    spec = importlib.util.spec_from_file_location("docker_images",
                                                  ROOT / "scripts" / "docker_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_images(names: Sequence[str], services: bool = False) -> dict[str, float]:
    """Build (or reuse from the layer cache) the named images; seconds per image built."""
    images = image_builder()
    try:
        times = images.build_images(list(names))
        if services:
            times.update(images.build_services())
    except images.BuildError as exc:
        pytest.fail(f"building {', '.join(names)}: {exc}")
    return times
