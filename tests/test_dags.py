"""DAG integrity: every DAG in dags/ and every freshly promoted DAG imports through Airflow's
DagBag with no import errors, and the checked-in example is what promotion produces today."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from airgpu_nb.promote import promote
from conftest import ROOT, write_notebook


def dagbag(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder), safe_mode=False)


def test_every_checked_in_dag_imports_cleanly():
    bag = dagbag(ROOT / "dags")
    assert bag.import_errors == {}
    assert "train_classifier" in bag.dag_ids
    task = bag.dags["train_classifier"].get_task("run_notebook")
    assert (task.pool, task.pool_slots, task.queue) == ("gpu", 1, "gpu")


def test_checked_in_example_dag_is_not_stale(tmp_path, monkeypatch):
    """`make dags` regenerates it; this fails when promotion output changed without that."""
    monkeypatch.chdir(ROOT)
    result = promote("notebooks/train_classifier.ipynb", dags_dir=tmp_path, allow_cpu=True)
    result.write()
    for name in ("train_classifier.py", "train_classifier.ipynb"):
        assert (tmp_path / name).read_bytes() == (ROOT / "dags" / name).read_bytes(), (
            f"dags/{name} is stale: run `make dags`")


def test_checked_in_files_carry_no_machine_specific_paths():
    for path in (ROOT / "dags").iterdir():
        text = path.read_text()
        assert str(ROOT) not in text and "/root/" not in text and "/home/" not in text


def test_a_promoted_dag_with_awkward_values_imports_and_keeps_them(tmp_path):
    values = {"quote": "it's \"x\"", "nl": "a\nb", "uni": "ünï 🚀", "n": 3, "f": 0.5,
              "b": True, "none": None}
    path = write_notebook(tmp_path / "odd name (1).ipynb", "pass", parameters="quote = ''")
    result = promote(path, dags_dir=tmp_path / "dags", parameters=values, allow_new_parameters=True,
                     schedule="0 3 * * 1",
                     gpus=2, tags=["x'y"]).write()
    bag = dagbag(tmp_path / "dags")
    assert bag.import_errors == {}
    dag = bag.dags[result.spec.dag_id]
    assert result.spec.dag_id == "odd_name_1"
    assert {k: dag.params[k] for k in values} == values
    assert dag.tags == {"x'y"} or sorted(dag.tags) == ["x'y"]
    assert dag.get_task("run_notebook").pool_slots == 2


@pytest.mark.parametrize("dag_file", sorted((ROOT / "dags").glob("*.py")), ids=lambda p: p.name)
def test_dag_files_import_nothing_heavy_at_parse_time(dag_file):
    """Parse-time imports decide how fast the scheduler can parse: papermill, TensorFlow and the
    airgpu-nb runtime are imported inside the task only."""
    tree = ast.parse(dag_file.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "datetime", "airflow.sdk"}
