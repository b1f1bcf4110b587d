"""End to end through real Airflow (`airflow dags test` on SQLite) and real papermill kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.cli import main
from airgpu_nb.findings import first_error, gpu_report
from airgpu_nb.inject import CHECK_TAG
from airgpu_nb.promote import promote
from conftest import BIN, write_notebook

pytestmark = pytest.mark.e2e

AWKWARD = {"quote": "it's \"quoted\"", "newline": "line 1\nline 2\r\n", "unicode": "naïve 日本 🚀",
           "code": "'); import os; os.system('id'); ('", "n": 7, "x": 2.5, "flag": True,
           "nothing": None}


def executed_runs(outputs: Path, dag_id: str) -> list[Path]:
    return sorted((outputs / dag_id).glob("*/*.ipynb"))


def check_cell(nb):
    return next(c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", []))


def test_example_notebook_trains_through_airflow(airflow_home, example_notebook):
    result = promote(example_notebook, dags_dir=airflow_home.dags, allow_cpu=True,
                     parameters={"epochs": 3}).write()
    run = airflow_home.airflow("dags", "test", result.spec.dag_id)
    assert run.returncode == 0
    [executed] = executed_runs(airflow_home.outputs, "train_classifier")
    nb = nbformat.read(executed, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags[1] == ["parameters"] and tags[2] == ["injected-parameters"]
    assert CHECK_TAG in tags[3]  # after papermill's injected parameters
    report = gpu_report(nb)
    assert report["ok"] is True and "running on CPU because --allow-cpu" in report["message"]
    assert first_error(nb) is None
    metrics = json.loads((executed.parent / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_accuracy"] > 0.8
    assert (executed.parent / "model.keras").is_file()


def test_awkward_parameter_values_arrive_in_the_notebook_intact(airflow_home, tmp_path):
    path = write_notebook(
        tmp_path / "awkward.ipynb",
        "import json\nwith open('seen.json', 'w', encoding='utf-8') as f:\n"
        f"    json.dump({{k: globals()[k] for k in {sorted(AWKWARD)!r}}}, f)",
        parameters="quote = 'default'\nn = 0")
    result = promote(path, dags_dir=airflow_home.dags, allow_cpu=True,
                     parameters=AWKWARD, allow_new_parameters=True).write()
    airflow_home.airflow("dags", "test", result.spec.dag_id)
    [executed] = executed_runs(airflow_home.outputs, "awkward")
    seen = json.loads((executed.parent / "seen.json").read_text(encoding="utf-8"))
    assert seen == AWKWARD


def test_a_failing_cell_fails_the_task_and_each_try_keeps_its_notebook(airflow_home, tmp_path):
    path = write_notebook(tmp_path / "boom.ipynb", "print('before')",
                          "raise ValueError('boom at ' + str(epoch))", "print('never')",
                          parameters="epoch = 1")
    result = promote(path, dags_dir=airflow_home.dags, allow_cpu=True, retries=1,
                     retry_delay_s=1).write()
    run = airflow_home.airflow("dags", "test", result.spec.dag_id, check=False)
    assert run.returncode != 0
    names = sorted(p.name for p in executed_runs(airflow_home.outputs, "boom"))
    assert names == ["boom.ipynb", "boom.try-2.ipynb"]
    for executed in executed_runs(airflow_home.outputs, "boom"):
        nb = nbformat.read(executed, as_version=4)
        error = first_error(nb)
        assert error["ename"] == "ValueError" and error["evalue"] == "boom at 1"
        assert nb.cells[-1].execution_count is None  # nothing ran after the error
        assert any("papermill-error-cell-tag" in c.metadata.get("tags", []) for c in nb.cells)


def test_a_task_past_its_timeout_fails_and_keeps_the_partial_notebook(airflow_home, tmp_path):
    path = write_notebook(tmp_path / "slow.ipynb", "print('started', flush=True)",
                          "import time\ntime.sleep(120)", parameters="x = 1")
    result = promote(path, dags_dir=airflow_home.dags, allow_cpu=True, retries=0,
                     execution_timeout_s=12).write()
    run = airflow_home.airflow("dags", "test", result.spec.dag_id, check=False, timeout=240)
    assert run.returncode != 0
    [executed] = executed_runs(airflow_home.outputs, "slow")
    nb = nbformat.read(executed, as_version=4)
    printed = [o.get("text", "") for c in nb.cells for o in c.get("outputs", [])]
    assert any("started" in text for text in printed)


def test_requested_gpus_that_are_absent_fail_fast_before_training(tmp_path, capsys):
    path = write_notebook(tmp_path / "gpu.ipynb", "open('trained', 'w').write('yes')",
                          parameters="x = 1")
    output = tmp_path / "out" / "gpu.ipynb"
    assert main(["run", str(path), "--output", str(output), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "GpuCheckError" in err and "Likely cause" in err and "without CUDA" in err
    nb = nbformat.read(output, as_version=4)
    assert first_error(nb)["ename"] == "GpuCheckError"
    assert gpu_report(nb)["ok"] is False
    assert not (output.parent / "trained").exists()


def test_airgpu_run_names_outputs_like_the_dag_and_applies_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_notebook(tmp_path / "p.ipynb", "open('seen.txt', 'w').write(repr(word))",
                          parameters="word = 'default'")
    result = subprocess.run([str(BIN / "airgpu"), "run", str(path), "--allow-cpu",
                             "-r", "word", "1.0", "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    executed = Path(result.stdout.strip().splitlines()[-1])
    assert executed.name == "p.ipynb" and executed.parent.name.startswith("local__")
    assert executed.parent.parent.name == "p"
    assert (executed.parent / "seen.txt").read_text() == "'1.0'"


def test_a_kernel_that_dies_fails_the_run_and_keeps_the_notebook(tmp_path, capsys):
    path = write_notebook(tmp_path / "dies.ipynb", "print('alive')", "import os\nos._exit(1)",
                          parameters="x = 1")
    output = tmp_path / "out" / "dies.ipynb"
    assert main(["run", str(path), "--output", str(output), "--allow-cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("airgpu: error:") and "executed notebook" in err
    assert output.is_file()


def test_the_cli_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "airgpu_nb", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("airgpu-nb ")
