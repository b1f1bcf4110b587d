"""Shared fixtures. Airflow reads its configuration at import time, so the test session's
AIRFLOW_HOME (a fresh temporary folder, SQLite) is set here, before any test imports Airflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from deployment import configured, deployment  # noqa: F401 (fixtures for the deploy tests)
from docker_daemon import docker_daemon  # noqa: F401 (the engine tests' daemon)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="airgpu-test-airflow-"))

os.environ.update({
    "AIRFLOW_HOME": str(_SESSION_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(_SESSION_HOME / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "TF_CPP_MIN_LOG_LEVEL": "2",
})
os.environ.pop("AIRGPU_OUTPUT_DIR", None)
os.environ.pop("AIRGPU_DAGS_DIR", None)


class AirflowHome:
    """A migrated Airflow home on SQLite, with the `gpu` pool, shared by the session."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dags = home / "dags"
        self.outputs = home / "airgpu-outputs"
        self.env = {**os.environ, "AIRFLOW_HOME": str(home),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags)}

    def airflow(self, *args: str, check: bool = True, timeout: int = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "airflow"), *args], env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result


@pytest.fixture(scope="session")
def airflow_home() -> Iterator[AirflowHome]:
    home = AirflowHome(_SESSION_HOME)
    home.dags.mkdir(parents=True, exist_ok=True)
    home.airflow("db", "migrate")
    home.airflow("pools", "set", "gpu", "1", "one slot per GPU")
    yield home
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture
def example_notebook() -> Path:
    return ROOT / "notebooks" / "train_classifier.ipynb"


def write_notebook(path: Path, *sources: str, parameters: str | None = None,
                   kernel: str = "python3", language: str = "python") -> Path:
    """A small notebook: an optional `parameters` cell, then one code cell per source."""
    cells = []
    if parameters is not None:
        cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    cells += [nbformat.v4.new_code_cell(src) for src in sources]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": kernel, "language": language, "display_name": kernel}})
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    return path


@pytest.fixture
def make_notebook(tmp_path: Path):
    def make(name: str = "nb.ipynb", *sources: str, **kwargs) -> Path:
        return write_notebook(tmp_path / name, *sources, **kwargs)
    return make
