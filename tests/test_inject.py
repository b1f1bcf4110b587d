"""The prepared copy: exactly one check cell, in the right place, replaced on re-promotion."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest

from airgpu_nb.gpu_check import PROBE_SOURCE
from airgpu_nb.inject import CHECK_TAG, check_cell_source, prepare
from airgpu_nb.notebook import read_notebook
from airgpu_nb.promote import promote
from airgpu_nb.spec import GpuRequest, PromotionSpec
from conftest import write_notebook

SPEC = PromotionSpec(dag_id="train", notebook_name="train.ipynb", gpu=GpuRequest(count=2))


def tags(nb):
    return [cell.metadata.get("tags", []) for cell in nb.cells]


def check_indices(nb):
    return [i for i, cell in enumerate(nb.cells) if CHECK_TAG in cell.metadata.get("tags", [])]


def test_check_cell_goes_right_after_the_parameters_cell(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "import os", "print(1)",
                                      parameters="epochs = 3"))
    prepared = prepare(nb, SPEC)
    assert check_indices(prepared) == [1]
    assert tags(prepared)[0] == ["parameters"]


def test_without_a_parameters_cell_the_check_goes_first(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "import os", "print(1)"))
    assert check_indices(prepare(nb, SPEC)) == [0]


def test_check_follows_an_injected_parameters_cell_left_by_papermill(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "print(1)", parameters="x = 1"))
    injected = nbformat.v4.new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(1, injected)
    prepared = prepare(nb, SPEC)
    assert check_indices(prepared) == [2]


def test_re_preparing_replaces_the_check_cell_and_is_idempotent(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "print(1)", parameters="x = 1"))
    once = prepare(nb, SPEC)
    twice = prepare(once, SPEC)
    assert len(check_indices(twice)) == 1
    assert nbformat.writes(once) == nbformat.writes(twice)
    changed = prepare(once, SPEC.replace(gpu=GpuRequest(count=0), allow_cpu=True))
    assert len(check_indices(changed)) == 1
    source = changed.cells[check_indices(changed)[0]].source
    assert "globals().get('gpus_requested', 0)" in source
    assert "globals().get('allow_cpu', True)" in source


def test_a_moved_stale_check_cell_is_removed_not_duplicated(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "print(1)", "print(2)",
                                      parameters="x = 1"))
    prepared = prepare(nb, SPEC)
    stale = prepared.cells.pop(1)
    prepared.cells.append(stale)
    assert check_indices(prepare(prepared, SPEC)) == [1]


def test_prepare_never_touches_the_input_and_clears_outputs(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "print('secret token')", parameters="x = 1")
    nb = read_notebook(path)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="secret token\n")]
    nb.cells[1].execution_count = 4
    before = nbformat.writes(nb)
    prepared = prepare(nb, SPEC)
    assert nbformat.writes(nb) == before
    assert all(c.outputs == [] and c.execution_count is None
               for c in prepared.cells if c.cell_type == "code")


def test_settings_are_recorded_for_re_promotion(tmp_path):
    nb = read_notebook(write_notebook(tmp_path / "a.ipynb", "print(1)", parameters="x = 1"))
    meta = prepare(nb, SPEC).metadata["airgpu"]
    assert meta["settings"]["dag_id"] == "train"
    assert meta["settings"]["gpus"] == 2
    assert meta["source_notebook"] == "train.ipynb"


@pytest.mark.parametrize("gpus,allow", [(1, False), ("all", True), (0, False)])
def test_check_cell_source_is_valid_python_with_literal_defaults(gpus, allow):
    source = check_cell_source(gpus, allow)
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "verify_gpus"]
    assert len(calls) == 1
    assert f"globals().get('gpus_requested', {gpus!r})" in source
    # self-contained: the standard library, pynvml and IPython; TensorFlow only in the probe's
    # source, which runs in a child process (or in the kernel when promotion says it may)
    assert imported_modules(tree) <= {"importlib", "json", "os", "signal", "subprocess", "sys",
                                      "time", "pynvml", "IPython"}
    assert "tensorflow" in imported_modules(ast.parse(PROBE_SOURCE))
    assert PROBE_SOURCE in source


def imported_modules(tree: ast.AST) -> set[str]:
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}


def notebook_with_minor(path, minor):
    """A notebook file of nbformat 4.``minor``; cell ids exist only from 4.5 on."""
    write_notebook(path, "print(1)", parameters="x = 1")
    data = json.loads(path.read_text())
    data["nbformat_minor"] = minor
    for cell in data["cells"]:
        if minor < 5:
            cell.pop("id", None)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("minor", [2, 4])
def test_an_older_notebook_gets_a_check_cell_without_an_id_and_stays_valid(tmp_path, minor):
    source = notebook_with_minor(tmp_path / "old.ipynb", minor)
    prepared = prepare(read_notebook(source), SPEC)
    cell = prepared.cells[check_indices(prepared)[0]]
    assert "id" not in cell
    nbformat.validate(prepared)
    result = promote(source, dags_dir=tmp_path / "dags").write()
    on_disk = json.loads(result.notebook_file.read_text())
    assert on_disk["nbformat_minor"] == minor
    assert not any("id" in c for c in on_disk["cells"])
    nbformat.validate(nbformat.read(result.notebook_file, as_version=4))


def test_a_4_5_notebook_gets_the_stable_check_cell_id(tmp_path):
    source = notebook_with_minor(tmp_path / "new.ipynb", 5)
    result = promote(source, dags_dir=tmp_path / "dags").write()
    on_disk = json.loads(result.notebook_file.read_text())
    assert on_disk["nbformat_minor"] == 5
    [cell] = [c for c in on_disk["cells"] if CHECK_TAG in c["metadata"].get("tags", [])]
    assert cell["id"] == "airgpu-gpu-check"
    nbformat.validate(nbformat.read(result.notebook_file, as_version=4))


def test_the_check_cell_id_never_collides_with_a_user_cell(tmp_path):
    nb = read_notebook(notebook_with_minor(tmp_path / "new.ipynb", 5))
    nb.cells[1]["id"] = CHECK_TAG
    prepared = prepare(nb, SPEC)
    nbformat.validate(prepared)
    assert prepared.cells[check_indices(prepared)[0]]["id"] == f"{CHECK_TAG}-1"
    assert prepared.cells[2]["id"] == CHECK_TAG
