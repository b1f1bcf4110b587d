"""Issue 9: a notebook carries what it needs (files and helper modules beside it, the packages
it imports), on the real project in tests/projects/reads_data, with real kernels and Airflow."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.bundle import AIRFLOWIGNORE
from airgpu_nb.cli import main
from airgpu_nb.errors import SpecError
from airgpu_nb.findings import first_error, gpu_report
from airgpu_nb.gpu_check import check_packages
from airgpu_nb.inject import CHECK_TAG
from airgpu_nb.needs import find_needs
from airgpu_nb.promote import promote
from conftest import ROOT, write_notebook

PROJECT = ROOT / "tests" / "projects" / "reads_data"
CARRIED = ["configs/model.json", "data/train.csv", "features.py", "scaling.py"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A private copy of the project (tests add symlinks, big files and outputs to it)."""
    copy = tmp_path / "proj"
    shutil.copytree(PROJECT, copy)
    return copy


def bundle_paths(dags: Path, dag_id: str = "reads_data") -> list[str]:
    folder = dags / f"{dag_id}.files" / "files"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def manifest(dags: Path, dag_id: str = "reads_data") -> dict:
    return json.loads((dags / f"{dag_id}.files" / "manifest.json").read_text())


def check_cell_error(nb) -> tuple[int, dict]:
    """(index of the check cell, the error it raised)."""
    index = next(i for i, c in enumerate(nb.cells) if CHECK_TAG in c.metadata.get("tags", []))
    errors = [o for o in nb.cells[index].get("outputs", []) if o.get("output_type") == "error"]
    return index, errors[0] if errors else {}


# -- finding ------------------------------------------------------------------------------------

def test_needs_are_found_through_magics_shell_lines_and_helper_modules():
    nb = nbformat.read(PROJECT / "reads_data.ipynb", as_version=4)
    needs = find_needs(nb, PROJECT / "reads_data.ipynb")
    assert needs.files == ("configs/model.json", "data/train.csv")  # Path('configs') / '...'
    assert needs.modules == ("features.py", "scaling.py")  # scaling: imported by features
    packages = {p.module: p for p in needs.packages}
    assert set(packages) == {"matplotlib", "numpy"}  # %matplotlib inline needs matplotlib
    assert packages["numpy"].version == importlib.metadata.version("numpy")
    assert packages["numpy"].installed and not needs.missing_here
    assert "unused.txt" not in needs.files and not needs.outside


def test_written_files_optional_imports_and_outside_paths_are_told_apart(tmp_path):
    (tmp_path / "p").mkdir()
    for name in ("model.keras", "input.csv"):
        (tmp_path / "p" / name).write_text("x")
    (tmp_path / "shared.csv").write_text("x")
    nb_path = write_notebook(
        tmp_path / "p" / "nb.ipynb",
        "%%time\nimport pandas_not_here_either\nx = open('input.csv').read()",
        "try:\n    import wandb_not_installed\nexcept ImportError:\n    wandb = None",
        "model.save('model.keras')\nopen('../shared.csv').read()")
    needs = find_needs(nbformat.read(nb_path, as_version=4), nb_path)
    assert needs.files == ("input.csv",)  # found inside a %%time cell
    assert needs.written == ("model.keras",) and needs.outside == ("../shared.csv",)
    assert needs.missing_here == ("pandas_not_here_either",)
    assert needs.optional == ("wandb_not_installed",)


# -- promotion ----------------------------------------------------------------------------------

def test_promote_prints_what_it_carries_and_writes_a_checked_bundle(project, tmp_path, capsys):
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--allow-cpu"]) == 0
    err = capsys.readouterr().err
    assert "carries 4 file(s)" in err and all(path in err for path in CARRIED), err
    assert f"numpy {importlib.metadata.version('numpy')}" in err
    assert bundle_paths(dags) == CARRIED  # not unused.txt, not the other notebook
    listed = manifest(dags)["files"]
    assert [f["path"] for f in listed] == CARRIED
    for item in listed:
        data = (project / item["path"]).read_bytes()
        assert item["size"] == len(data)
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
    assert (dags / "reads_data.files" / ".airflowignore").read_text() == AIRFLOWIGNORE
    recorded = nbformat.read(dags / "reads_data.ipynb", as_version=4).metadata.airgpu
    assert recorded.bundle == "reads_data.files"
    assert {p["module"] for p in recorded.packages} == {"matplotlib", "numpy"}
    assert not [p for p in dags.iterdir() if p.name.startswith(".")]  # no staging left


def test_json_carries_the_needs_and_the_bundle(project, tmp_path, capsys):
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir",
                 str(tmp_path / "d"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["needs"]["modules"] == ["features.py", "scaling.py"]
    assert [f["path"] for f in out["bundle"]["files"]] == CARRIED
    assert out["bundle"]["folder"] == "reads_data.files"
    assert any("carries 4 file(s)" in note for note in out["advisories"])


def test_the_dag_processor_never_looks_inside_the_bundle(project, tmp_path):
    try:  # where Airflow 3.3 keeps it; airflow.utils.file re-exports it with a warning
        from airflow._shared.module_loading import find_path_from_directory
    except ImportError:  # pragma: no cover - older Airflow 3
        from airflow.utils.file import find_path_from_directory

    dags = tmp_path / "dags"
    (project / "features.py").write_text("# airflow DAG words here\n" +
                                         (project / "features.py").read_text())
    promote(project / "reads_data.ipynb", dags_dir=dags).write()
    for syntax in ("glob", "regexp"):
        found = {Path(p).name for p in find_path_from_directory(dags, ".airflowignore", syntax)}
        assert found == {"reads_data.py", "reads_data.ipynb"}, syntax


def test_requirements_pins_the_packages_beside_the_dag(project, tmp_path):
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--requirements"]) == 0
    pins = (dags / "reads_data.requirements.txt").read_text().splitlines()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"matplotlib=={importlib.metadata.version('matplotlib')}" in pins


def test_a_symlink_leaving_the_project_is_never_copied(project, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not carry")
    (project / "data" / "leak.csv").symlink_to(outside / "secret.txt")
    (project / "shared").symlink_to(outside, target_is_directory=True)
    (project / "latest.csv").symlink_to(project / "data" / "train.csv")  # stays inside
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--include", "data", "--include", "shared", "--include", "latest.csv"]) == 0
    err = capsys.readouterr().err
    carried = bundle_paths(dags)
    assert "data/leak.csv" not in carried and not any(p.startswith("shared") for p in carried)
    assert "latest.csv" in carried and not (dags / "reads_data.files" / "files" /
                                            "latest.csv").is_symlink()
    assert "do not carry" not in "".join(
        p.read_text() for p in (dags / "reads_data.files").rglob("*") if p.is_file())
    assert "data/leak.csv (a symlink leaving the notebook's folder)" in err
    assert "shared (a symlink leaving the notebook's folder)" in err


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/hostname", "data/../../x"])
def test_include_outside_the_project_is_refused_in_one_line(project, tmp_path, capsys, path):
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--include", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "relative to the notebook's folder" in err, err
    assert not dags.exists()


def test_a_200_mb_file_gets_a_clear_error_and_nothing_is_written(project, tmp_path, capsys):
    with open(project / "data" / "big.bin", "wb") as handle:
        handle.truncate(200 * 2**20)  # sparse: nothing is read before the limit check
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--include", "data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "over the 100 MB bundle limit" in err and "data/big.bin (209.7 MB)" in err
    assert "mounted volume" in err and "object-store URL" in err and "--exclude" in err
    assert not dags.exists()
    # --exclude leaves it behind, named, with the same advice
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--include", "data", "--exclude", "data/*.bin"]) == 0
    err = capsys.readouterr().err
    assert "data/big.bin" not in bundle_paths(dags) and "data/train.csv" in bundle_paths(dags)
    assert "not carried: data/big.bin (--exclude)" in err and "mounted volume" in err


def test_exclude_leaves_a_found_file_behind(project, tmp_path):
    dags = tmp_path / "dags"
    assert main(["promote", str(project / "reads_data.ipynb"), "--dags-dir", str(dags),
                 "--exclude", "configs"]) == 0
    assert bundle_paths(dags) == ["data/train.csv", "features.py", "scaling.py"]


def test_re_promotion_replaces_the_bundle_and_a_foreign_folder_is_kept(project, tmp_path,
                                                                       capsys):
    dags = tmp_path / "dags"
    source = str(project / "reads_data.ipynb")
    assert main(["promote", source, "--dags-dir", str(dags), "--include", "unused.txt"]) == 0
    assert "unused.txt" in bundle_paths(dags)
    assert main(["promote", source, "--dags-dir", str(dags)]) == 0
    assert bundle_paths(dags) == CARRIED
    assert not [p for p in dags.iterdir() if p.name.startswith(".")]
    (dags / "other.files").mkdir()
    (dags / "other.files" / "mine.txt").write_text("a user's folder")
    capsys.readouterr()
    assert main(["promote", source, "--dags-dir", str(dags), "--dag-id", "other"]) == 2
    assert "not written by airgpu-nb" in capsys.readouterr().err
    assert (dags / "other.files" / "mine.txt").read_text() == "a user's folder"
    assert not (dags / "other.py").exists()


def test_a_refused_promotion_leaves_the_previous_bundle_untouched(project, tmp_path, capsys):
    dags = tmp_path / "dags"
    source = str(project / "reads_data.ipynb")
    assert main(["promote", source, "--dags-dir", str(dags)]) == 0
    before = manifest(dags)
    (dags / "reads_data.py").write_text((dags / "reads_data.py").read_text() + "# edited\n")
    assert main(["promote", source, "--dags-dir", str(dags), "--include", "unused.txt"]) == 2
    assert "edited by hand" in capsys.readouterr().err
    assert manifest(dags) == before and "unused.txt" not in bundle_paths(dags)
    assert not [p for p in dags.iterdir() if p.name.startswith(".")]


def test_a_notebook_that_needs_nothing_writes_no_bundle(tmp_path):
    nb = write_notebook(tmp_path / "plain.ipynb", "import json\nprint(json.dumps(1))")
    result = promote(nb, dags_dir=tmp_path / "d").write()
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"plain.py", "plain.ipynb"}
    assert "bundle" not in result.notebook.metadata.airgpu


# -- running ------------------------------------------------------------------------------------

def test_airgpu_run_of_the_source_notebook_finds_its_files_in_a_fresh_directory(project,
                                                                               tmp_path):
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    out = tmp_path / "out" / "reads_data.ipynb"
    prepared = promote(project / "reads_data.ipynb", dags_dir=tmp_path / "dags").write()
    # the source seeds from its folder, the prepared copy from its bundle; the second run must
    # not see the first one's result.txt
    for notebook in (project / "reads_data.ipynb", prepared.notebook_file):
        assert main(["run", str(notebook), "--output", str(out), "--allow-cpu",
                     "--no-progress"]) == 0
    assert (out.parent / "result.txt").read_text() == "13.0"
    assert json.loads((out.parent / "artifacts" / "total.json").read_text()) == {"total": 13.0}
    assert not (out.parent / "data").exists() and not (out.parent / "features.py").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".airgpu-cwd")]
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # untouched
    assert first_error(nbformat.read(out, as_version=4)) is None


@pytest.mark.e2e
def test_the_local_dag_runs_under_airflow_dags_test(airflow_home, project):
    result = promote(project / "reads_data.ipynb", dags_dir=airflow_home.dags,
                     allow_cpu=True).write()
    shutil.rmtree(project)  # the DAG must not need the source folder any more
    airflow_home.airflow("dags", "test", result.spec.dag_id)
    [executed] = sorted((airflow_home.outputs / "reads_data").glob("*/reads_data.ipynb"))
    assert (executed.parent / "result.txt").read_text() == "13.0"
    report = gpu_report(nbformat.read(executed, as_version=4))
    assert report["ok"] is True and report["packages"]["checked"] == 2


def test_a_missing_package_fails_in_the_verification_cell_naming_it(project, tmp_path, capsys):
    out = tmp_path / "out" / "needs_missing.ipynb"
    assert main(["run", str(project / "needs_missing.ipynb"), "--output", str(out),
                 "--allow-cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "MissingPackageError" in err and "the worker lacks sklearn" in err, err
    nb = nbformat.read(out, as_version=4)
    index, error = check_cell_error(nb)
    assert error["ename"] == "MissingPackageError"
    assert all(c.get("execution_count") is None for c in nb.cells[index + 1:])
    assert gpu_report(nb)["packages"]["missing"][0]["module"] == "sklearn"
    assert not (out.parent / "trained.txt").exists()


def test_allow_missing_packages_from_pyproject_reports_and_goes_on(project, tmp_path, capsys):
    (project / "pyproject.toml").write_text("[tool.airgpu]\nallow_missing_packages = true\n")
    out = tmp_path / "out" / "needs_missing.ipynb"
    assert main(["run", str(project / "needs_missing.ipynb"), "--output", str(out),
                 "--allow-cpu", "--no-progress"]) == 1
    assert "ModuleNotFoundError" in capsys.readouterr().err  # the notebook's own import now
    nb = nbformat.read(out, as_version=4)
    assert check_cell_error(nb)[1] == {}
    report = gpu_report(nb)
    assert report["ok"] is True and report["packages"]["allow_missing"] is True
    assert "running anyway" in report["packages"]["message"]


def test_the_check_names_the_distribution_and_the_version_it_was_prototyped_with():
    missing = check_packages([["airgpu_test_absent_module", "scikit-learn", "1.7.2"]])
    assert missing["ok"] is False
    assert missing["message"] == ("the worker lacks scikit-learn; prototyped with 1.7.2: add it "
                                  "to the runtime image or promote with --allow-missing-packages")
    numpy = importlib.metadata.version("numpy")
    older = f"{int(numpy.split('.')[0]) - 1}.0.0"
    drift = check_packages([["numpy", "numpy", older], ["json", None, None]])
    assert drift["ok"] is True and drift["missing"] == []
    assert drift["different"] == [{"distribution": "numpy", "prototyped": older, "found": numpy}]


def test_a_run_fails_clearly_when_the_bundle_beside_the_prepared_notebook_is_gone(
        project, tmp_path, capsys):
    from airgpu_nb.run import execute

    dags = tmp_path / "dags"
    promote(project / "reads_data.ipynb", dags_dir=dags).write()
    shutil.rmtree(dags / "reads_data.files")
    with pytest.raises(SpecError, match=r"needs its files in .*reads_data\.files"):
        execute(dags / "reads_data.ipynb", tmp_path / "o" / "x.ipynb", {})
    assert not (tmp_path / "o").exists()  # refused before any kernel started


def test_a_hostile_bundle_name_in_a_prepared_notebook_is_refused(tmp_path):
    from airgpu_nb.workdir import seed_files

    nb = write_notebook(tmp_path / "p.ipynb", "pass")
    data = json.loads(nb.read_text())
    for name in ("../../etc", "/etc", "x/../../y.files", ".."):
        data["metadata"]["airgpu"] = {"bundle": name}
        nb.write_text(json.dumps(data))
        with pytest.raises(SpecError, match="invalid bundle folder"):
            seed_files(nb)
    os.remove(nb)
