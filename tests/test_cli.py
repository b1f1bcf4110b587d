"""The CLI through main(argv): outputs, exit codes, and every bad input from PRODUCT.md refused
with one line on stderr and nothing written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.cli import main
from conftest import write_notebook


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture
def nb(tmp_path):
    return write_notebook(tmp_path / "train.ipynb", "print(epochs)", parameters="epochs = 3")


def test_promote_writes_the_dag_and_prepared_copy_and_leaves_the_source_alone(nb, tmp_path,
                                                                               capsys):
    before = hashlib.sha256(nb.read_bytes()).hexdigest()
    dags = tmp_path / "dags"
    assert main(["promote", str(nb), "--dags-dir", str(dags), "--json", "-p", "epochs", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"dag_id", "dag_file", "notebook", "target"} <= out.keys()
    assert out["dag_id"] == "train" and out["target"] == "local"
    assert files_under(dags) == {"train.py", "train.ipynb"}
    assert Path(out["dag_file"]) == dags / "train.py"
    assert hashlib.sha256(nb.read_bytes()).hexdigest() == before
    prepared = nbformat.read(dags / "train.ipynb", as_version=4)
    assert prepared.metadata["airgpu"]["settings"]["parameters"] == {"epochs": 5}
    assert "params={'epochs': 5}" in (dags / "train.py").read_text()


def test_p_and_r_values_keep_their_types(nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    assert main(["promote", str(nb), "--dags-dir", str(dags), "--json",
                 "--allow-new-parameters", "-p", "a", "1", "-p", "b", "1.5", "-p", "c", "True",
                 "-p", "d", "None", "-r", "e", "1", "-p", "f", "x y"]) == 0
    params = json.loads(capsys.readouterr().out)["parameters"]
    assert params == {"epochs": 3, "a": 1, "b": 1.5, "c": True, "d": None, "e": "1", "f": "x y"}


def test_re_promotion_reuses_settings_recorded_in_the_prepared_copy(nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    main(["promote", str(nb), "--dags-dir", str(dags), "--dag-id", "nightly", "--schedule",
          "@daily", "--gpus", "2", "-p", "epochs", "9"])
    again = tmp_path / "again"
    assert main(["promote", str(dags / "nightly.ipynb"), "--dags-dir", str(again), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (out["dag_id"], out["schedule"], out["gpus"]) == ("nightly", "@daily", 2)
    assert out["parameters"]["epochs"] == 9


def test_pyproject_settings_sit_between_defaults_and_explicit_options(tmp_path, capsys):
    project = tmp_path / "proj"
    (project / "nbs").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.airgpu]\nschedule = "@hourly"\ngpus = 4\ntags = ["team-a"]\n')
    path = write_notebook(project / "nbs" / "t.ipynb", "pass")
    assert main(["promote", str(path), "--dags-dir", str(tmp_path / "d"), "--gpus", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "@hourly" and out["gpus"] == 1
    assert "tags=['team-a']" in Path(out["dag_file"]).read_text()


def bad_notebooks(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "notjson.ipynb").write_text("{ this is not json")
    (tmp / "list.ipynb").write_text("[1, 2, 3]")
    (tmp / "v3.ipynb").write_text(json.dumps({"nbformat": 3, "nbformat_minor": 0,
                                              "metadata": {}, "worksheets": []}))
    write_notebook(tmp / "r.ipynb", "print(1)", kernel="ir", language="R")
    (tmp / "folder.ipynb").mkdir()
    (tmp / "invalid.ipynb").write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5,
                                                   "metadata": {}, "cells": [{"bogus": 1}]}))
    return {
        "not JSON": (tmp / "notjson.ipynb", "not JSON"),
        "not a notebook": (tmp / "list.ipynb", "not a Jupyter notebook"),
        "non-Python kernel": (tmp / "r.ipynb", "Python notebooks only"),
        "missing": (tmp / "missing.ipynb", "not found"),
        "directory": (tmp / "folder.ipynb", "is a directory"),
        "invalid cells": (tmp / "invalid.ipynb", "not a valid notebook"),
    }


@pytest.mark.parametrize("case", ["not JSON", "not a notebook", "non-Python kernel", "missing",
                                  "directory", "invalid cells"])
def test_bad_notebooks_exit_2_with_one_line_and_write_nothing(case, tmp_path, capsys):
    path, message = bad_notebooks(tmp_path)[case]
    dags = tmp_path / "dags"
    assert main(["promote", str(path), "--dags-dir", str(dags)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("airgpu: error:")
    assert message in err
    assert files_under(dags) == set()


def test_nbformat_3_is_upgraded_in_the_prepared_copy_and_the_source_left_alone(tmp_path, capsys):
    source = tmp_path / "old.ipynb"
    source.write_text(json.dumps({
        "nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "old"},
        "worksheets": [{"metadata": {}, "cells": [
            {"cell_type": "code", "language": "python", "input": "x = 1\nprint(x)",
             "outputs": [], "metadata": {}, "collapsed": False}]}]}))
    before = source.read_bytes()
    assert main(["promote", str(source), "--dags-dir", str(tmp_path / "dags"), "--json"]) == 0
    prepared = nbformat.read(tmp_path / "dags" / "old.ipynb", as_version=nbformat.NO_CONVERT)
    assert prepared.nbformat == 4
    nbformat.validate(prepared)
    assert [c.source for c in prepared.cells if c.cell_type == "code"][-1] == "x = 1\nprint(x)"
    assert source.read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--dag-id", "bad id!"], "invalid DAG id"),
    (["-p", "1x", "3"], "invalid parameter name"),
    (["-p", "class", "3"], "invalid parameter name"),
    (["-p", "lr", "nan"], "no Python literal"),
    (["-p", "gpus_requested", "2"], "belongs to the GPU check"),
    (["--target", "mars"], "unknown target 'mars'; valid choices: "),
    (["--mig", "5g.1tb"], "unknown MIG profile"),
    (["--gpus", "-1"], "--gpus must be >= 0"),
    (["--gpus", "lots"], "--gpus takes a whole number"),
    (["--schedule", "every day"], "invalid schedule"),
    (["--start-date", "yesterday"], "invalid start date"),
    (["--bogus-option"], "unrecognized arguments"),
    (["-p", "only-name"], "expected 2 arguments"),
])
def test_bad_options_exit_2_with_one_line_and_write_nothing(args, message, nb, tmp_path,
                                                            capsys):
    dags = tmp_path / "dags"
    assert main(["promote", str(nb), "--dags-dir", str(dags), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert message in err
    assert files_under(dags) == set()


def test_unknown_target_error_lists_the_valid_targets(nb, tmp_path, capsys):
    main(["promote", str(nb), "--dags-dir", str(tmp_path / "d"), "--target", "mars"])
    assert "local" in capsys.readouterr().err


def test_a_hand_edited_dag_is_not_overwritten_without_force(nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    assert main(["promote", str(nb), "--dags-dir", str(dags)]) == 0
    dag = dags / "train.py"
    edited = dag.read_text().replace("retries", "retries", 1) + "# my tweak\n"
    dag.write_text(edited)
    prepared_before = (dags / "train.ipynb").read_bytes()
    capsys.readouterr()
    assert main(["promote", str(nb), "--dags-dir", str(dags), "-p", "epochs", "7"]) == 2
    err = capsys.readouterr().err
    assert "edited by hand" in err and "--force" in err and err.count("\n") == 1
    assert dag.read_text() == edited
    assert (dags / "train.ipynb").read_bytes() == prepared_before
    assert main(["promote", str(nb), "--dags-dir", str(dags), "--force"]) == 0
    assert "# my tweak" not in dag.read_text()


def test_a_foreign_dag_file_with_the_same_name_is_kept(nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "train.py").write_text("# someone else's DAG\n")
    assert main(["promote", str(nb), "--dags-dir", str(dags)]) == 2
    assert "not generated by airgpu-nb" in capsys.readouterr().err
    assert (dags / "train.py").read_text() == "# someone else's DAG\n"


def test_a_dags_dir_that_is_a_file_is_refused(nb, tmp_path, capsys):
    target = tmp_path / "dags"
    target.write_text("x")
    assert main(["promote", str(nb), "--dags-dir", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("dags", ["/proc", "/proc/airgpu-nope/dags"])
def test_a_dags_dir_that_is_not_writable_is_refused_with_nothing_written(dags, nb, capsys):
    # /proc refuses new files even to root, who ignores permission bits: a real unwritable dir
    before = files_under(nb.parent)
    assert main(["promote", str(nb), "--dags-dir", dags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("cannot write to" in err or "cannot create" in err), err
    assert files_under(nb.parent) == before


def test_an_unwritable_dags_dir_is_reported_before_anything_is_written(nb, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; covered through /proc above")
    dags = tmp_path / "ro"
    dags.mkdir()
    dags.chmod(0o555)
    assert main(["promote", str(nb), "--dags-dir", str(dags)]) == 2
    assert "not writable" in capsys.readouterr().err
    assert files_under(dags) == set()


def test_the_source_cannot_be_overwritten_by_its_prepared_copy(tmp_path, capsys):
    path = write_notebook(tmp_path / "train.ipynb", "pass")
    assert main(["promote", str(path), "--dags-dir", str(tmp_path)]) == 2
    assert "overwrite the source notebook" in capsys.readouterr().err


def test_help_explains_each_command(capsys):
    for command in ("promote", "run", "verify", "status"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: airgpu {command}" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "promote" in capsys.readouterr().out


def test_status_json_works_without_a_gpu(capsys):
    assert main(["status", "--json", "--no-tensorflow"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nvml"] is None and "cuda_visible_devices" in info
