"""Real public notebooks nobody here wrote (tests/corpus, see SOURCES.md): every one promotes
with exit 0 or a one-line exit 2, never a traceback; the DAGs import in Airflow's DagBag; and
the ones that need no download run under `airgpu run` as they do under plain papermill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.cli import main
from airgpu_nb.dagbag import check_dag_import
from airgpu_nb.keys import CHECK_TAG
from airgpu_nb.spec import safe_dag_id

CORPUS = Path(__file__).parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
#: What promotion must refuse (one line, exit 2), and why.
REFUSED = {
    **{e["path"]: "Python notebooks only" for e in MANIFEST
       if e["language"] not in ("python", None)},
    "papermill/complex_parameters.ipynb": "does not parse",
}
#: Runnable notebooks that `make test` runs (the slow TensorFlow guides beyond these are
#: covered by promotion; `pytest --corpus-all` is not needed: edit this list to run more).
RUN = [e["path"] for e in MANIFEST if e["runnable"] and (
    (e["run_seconds"] or 99) < 11 or "device-config" in e["features"])]


def entry_id(entry: dict) -> str:
    return entry["path"]


def test_the_corpus_is_what_its_manifest_says():
    on_disk = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.ipynb")}
    assert on_disk == {e["path"] for e in MANIFEST}
    assert {"nbformat3", "conda-kernel", "device-config", "pip", "colab", "tensorboard",
            "non-python", "parameters"} <= {f for e in MANIFEST for f in e["features"]}
    assert {e["nbformat"] for e in MANIFEST} >= {"3.0", "4.0", "4.1", "4.2", "4.4", "4.5"}
    assert all(e["license"] in {"Apache-2.0", "BSD-3-Clause", "MIT"} for e in MANIFEST)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Every corpus notebook promoted once (into one dags folder, for one DagBag)."""
    dags = tmp_path_factory.mktemp("corpus-dags")
    outcomes = {}
    for entry in MANIFEST:
        source = CORPUS / entry["path"]
        dag_id = safe_dag_id(f"{Path(entry['path']).parent.name}_{source.stem}")
        with pytest.MonkeyPatch.context() as mp:
            import io
            import sys

            err = io.StringIO()
            mp.setattr(sys, "stderr", err)
            mp.setattr(sys, "stdout", io.StringIO())
            code = main(["promote", str(source), "--dags-dir", str(dags), "--dag-id", dag_id,
                         "--allow-cpu"])
        outcomes[entry["path"]] = (code, err.getvalue(), dags / f"{dag_id}.ipynb")
    return outcomes


@pytest.mark.parametrize("entry", MANIFEST, ids=entry_id)
def test_every_public_notebook_promotes_or_is_refused_in_one_line(promoted, entry):
    code, err, prepared = promoted[entry["path"]]
    source = CORPUS / entry["path"]
    if entry["path"] in REFUSED:
        assert code == 2 and REFUSED[entry["path"]] in err, err
        assert err.count("airgpu: error:") == 1 and "Traceback" not in err
        assert not prepared.exists()
        return
    assert code == 0, err
    assert "Traceback" not in err
    nb = nbformat.read(prepared, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    original = json.loads(source.read_text(encoding="utf-8"))
    if original["nbformat"] == 4:  # the copy keeps the source's format; 3 is upgraded
        assert (nb.nbformat, nb.nbformat_minor) == (4, original["nbformat_minor"])
    checks = [c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", [])]
    assert len(checks) == 1
    assert ("id" in checks[0]) == (nb.nbformat_minor >= 5)
    if "conda-kernel" in entry["features"] or entry["kernel"] not in (None, "python3"):
        assert nb.metadata.airgpu.settings["kernel"] in ("python3", entry["kernel"])
    if {"pip", "colab"} & set(entry["features"]):
        assert "airgpu: note:" in err  # an advisory, not an error


def test_the_dags_of_all_promoted_notebooks_import_in_airflows_dagbag(promoted):
    folder = next(iter(promoted.values()))[2].parent
    written = sorted(p.stem for p in folder.glob("*.py"))
    assert len(written) == len(MANIFEST) - len(REFUSED)
    check = check_dag_import(folder)
    assert check.ok is True, check.message
    assert sorted(check.dag_ids) == written


@pytest.mark.e2e
@pytest.mark.parametrize("path", RUN)
def test_runnable_public_notebooks_run_under_airgpu_run(tmp_path, capsys, path):
    source = tmp_path / Path(path).name
    shutil.copy(CORPUS / path, source)  # a run writes beside it; keep the corpus clean
    output = tmp_path / "out" / "executed.ipynb"
    code = main(["run", str(source), "--allow-cpu", "--output", str(output), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    nb = nbformat.read(output, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    assert nb.metadata.papermill.exception in (None, False)
