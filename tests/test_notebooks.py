"""The example notebooks run top to bottom under nbval (lax: outputs that vary are not compared).

They run from a copy of notebooks/ in a temporary folder (the tour promotes its neighbour), so
the files they write stay out of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e
# the tour runs in tests/test_magics.py, beside the check that it matches its generator
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name != "airgpu_tour.ipynb")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_under_nbval(notebook, tmp_path):
    shutil.copytree(notebook.parent, tmp_path, dirs_exist_ok=True)
    copy = tmp_path / notebook.name
    env = {**os.environ, "AIRGPU_DAGS_DIR": str(tmp_path / "dags"),
           "AIRGPU_OUTPUT_DIR": str(tmp_path / "outputs")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(copy)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
