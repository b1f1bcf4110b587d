"""An adversarial walk over every input layer, on the real CLI (in process, no mocks).

Families, as a hostile user would try them:

- **values become code?** every text-like row of the settings table, with injection payloads,
  on a target that takes it: the DAG's syntax tree must be the one a benign value gives, with
  only constants different (the value stayed a literal), or the command is exit 2, one line;
- **typed layers**: a wrong-typed value for every row in ``[tool.airgpu]`` and in notebook
  metadata: exit 2, one line naming the layer and the key;
- **file system states**: the notebook as a folder, a FIFO, ``/dev/zero``, non-UTF-8 or empty,
  the DAG's path a folder, a dags dir that is a file;
- **argv encoding**: non-UTF-8 bytes in values and file names;
- **damaged telemetry** under ``airgpu report``, and ``--png`` into a folder or another format.

Every refusal is exit 2 with exactly one line on stderr and nothing written; nothing ever prints
a traceback. The number of cases is asserted, so a family cannot shrink by accident.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pytest

from airgpu_nb import settings as table
from airgpu_nb.cli import main
from airgpu_nb.kinds import Boolean, Pairs, Text, TextList
from airgpu_nb.promote import _NOT_SETTINGS
from conftest import write_notebook

PAYLOADS = (
    "x'''\nimport os\n'''",
    'x"\nimport os  #',
    "x\\",
    "{{ 7 * 7 }}{% if 1 %}",
    "$(touch pwned)`id`",
    "x\x00y",
    "x\ry",
    "x\u2028import os",
    "é漢字 🚀",
    "--dag-id=owned",
)

#: A value each text-like row accepts; a new text row must add one (see the test below).
BENIGN = {
    "dag_id": "benign", "kernel": "python3", "image": "registry.local/img:1",
    "output_dir": "out", "tags": "team", "cpu": "2", "memory": "16g", "shm_size": "2g",
    "user": "1000", "notebooks_volume": "nbvol", "outputs_volume": "outvol",
    "outputs_url": "s3://bucket/runs", "device_ids": "0", "namespace": "ml",
    "service_account": "runner", "node_selector": "gpu",
    "tolerations": "nvidia.com/gpu", "gpu_product": "A100", "kueue_queue": "team-q",
    "priority_class": "batch", "include": "data", "exclude": "data/big.bin",
}
#: How a payload rides inside a value that has a shape (KEY=VALUE, KEY:EFFECT).
SHAPED = {"node_selector": "pool={}", "tolerations": "{}:NoSchedule"}
_TEXTUAL = (Text, TextList, Pairs)


def _text_rows() -> list[table.Setting]:
    return [row for row in table.SETTINGS
            if isinstance(row.kind, _TEXTUAL) and row.in_spec and row.name != "parameters"]


def _target_for(row: table.Setting) -> str:
    return "local" if row.targets is None else sorted(row.targets)[0]


def _skeleton(source: str) -> str:
    """The DAG's syntax tree with every constant blanked: equal skeletons mean a value changed
    only constants, never code."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            node.value = None
    return ast.dump(tree)


@pytest.fixture
def nb(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("a\n1\n")
    return write_notebook(tmp_path / "nb.ipynb", "print(epochs)", parameters="epochs = 1")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, err: str, dags: Path, *, naming: str = "") -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("airgpu: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert naming in lines[0], (naming, lines[0])
    assert not dags.exists() or not any(dags.iterdir()), sorted(p.name for p in dags.iterdir())


# -- values never become code ---------------------------------------------------------------------

def test_every_text_row_has_a_benign_value_so_the_injection_walk_covers_it():
    assert {row.name for row in _text_rows()} <= set(BENIGN) | {"dag_id"}


INJECTION_CASES = [(row.name, payload) for row in _text_rows() for payload in PAYLOADS]


@pytest.mark.parametrize(("name", "payload"), INJECTION_CASES,
                         ids=[f"{n}-{i % len(PAYLOADS)}" for i, (n, _) in
                              enumerate(INJECTION_CASES)])
def test_a_value_stays_a_literal_or_is_refused(name, payload, nb, tmp_path, capsys):
    row = table.row(name)
    target = _target_for(row)
    shape = SHAPED.get(name, "{}")

    def promote(value: str, dags: Path) -> tuple[int, str]:
        argv = ["promote", str(nb), "--dags-dir", str(dags), "--target", target,
                row.cli_flag, shape.format(value)]
        if name != "dag_id":
            argv += ["--dag-id", "d"]
        rc, _, err = _run(argv, capsys)
        return rc, err

    rc, err = promote(BENIGN[name], tmp_path / "benign")
    assert rc == 0, err
    baseline = next((tmp_path / "benign").glob("*.py")).read_text(encoding="utf-8")
    dags = tmp_path / "dags"
    rc, err = promote(payload, dags)
    if rc != 0:
        _refused(rc, err, dags)
        return
    source = next(dags.glob("*.py")).read_text(encoding="utf-8")
    assert _skeleton(source) == _skeleton(baseline), f"{name}={payload!r} changed the code"
    assert not (tmp_path / "pwned").exists()


# -- typed layers ---------------------------------------------------------------------------------

def _wrong_value(row: table.Setting) -> object:
    return "false" if isinstance(row.kind, Boolean) else [[{"x": 1}]]


LAYER_ROWS = [row.name for row in table.SETTINGS]


@pytest.mark.parametrize("name", LAYER_ROWS)
def test_a_wrong_type_in_pyproject_is_one_line_naming_the_key(name, nb, tmp_path, capsys):
    value = json.dumps(_wrong_value(table.row(name)))
    # JSON arrays of objects and strings are TOML too: [[{"x": 1}]] -> [[{x = 1}]]
    toml_value = value.replace('{"x": 1}', "{x = 1}")
    (tmp_path / "pyproject.toml").write_text(f"[tool.airgpu]\n{name} = {toml_value}\n")
    dags = tmp_path / "dags"
    rc, _, err = _run(["promote", str(nb), "--dags-dir", str(dags)], capsys)
    _refused(rc, err, dags, naming=f"[tool.airgpu] {name}")


@pytest.mark.parametrize("name", [n for n in LAYER_ROWS if table.row(n).from_notebook])
def test_a_wrong_type_in_notebook_metadata_is_one_line_naming_the_key(name, nb, tmp_path,
                                                                     capsys):
    data = nbformat.read(nb, as_version=4)
    wrong = {name: _wrong_value(table.row(name))}
    # An executed notebook's own records (its telemetry) sit beside settings; the settings
    # table of a prepared copy is never ambiguous.
    data.metadata["airgpu"] = wrong if name not in _NOT_SETTINGS else {"settings": wrong}
    nbformat.write(data, nb)
    dags = tmp_path / "dags"
    rc, _, err = _run(["promote", str(nb), "--dags-dir", str(dags)], capsys)
    _refused(rc, err, dags, naming=name)
    assert "metadata" in err


# -- file system states ---------------------------------------------------------------------------

def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


FS_CASES = {
    "a folder": _folder,
    "a FIFO": _fifo,
    "/dev/zero": lambda path: Path("/dev/zero"),
    "not UTF-8": lambda path: (path.write_bytes(b'{"cells": "\xff\xfe"}'), path)[1],
    "empty": lambda path: (path.write_bytes(b""), path)[1],
    "a JSON list": lambda path: (path.write_text("[1, 2]"), path)[1],
    "deep JSON": lambda path: (path.write_text("[" * 100_000 + "]" * 100_000), path)[1],
    "missing": lambda path: path,
}


@pytest.mark.parametrize("case", FS_CASES)
def test_a_notebook_path_that_is_not_a_notebook_file(case, tmp_path, capsys):
    notebook = FS_CASES[case](tmp_path / "nb.ipynb")
    dags = tmp_path / "dags"
    rc, _, err = _run(["promote", str(notebook), "--dags-dir", str(dags)], capsys)
    _refused(rc, err, dags)


@pytest.mark.parametrize("suffix", [".py", ".ipynb"])
def test_a_folder_where_the_dag_or_its_notebook_goes(suffix, nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    (dags / f"d{suffix}").mkdir(parents=True)
    rc, _, err = _run(["promote", str(nb), "--dags-dir", str(dags), "--dag-id", "d"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in dags.iterdir()) == [f"d{suffix}"]  # nothing else written


def test_a_dags_dir_that_is_a_file(nb, tmp_path, capsys):
    dags = tmp_path / "dags"
    dags.write_text("not a folder")
    rc, _, err = _run(["promote", str(nb), "--dags-dir", str(dags)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert dags.read_text() == "not a folder"


# -- argv encoding --------------------------------------------------------------------------------

ENCODING_CASES = {
    "file name": lambda nb: ["promote", os.fsdecode(bytes(nb.parent) + b"/\xff.ipynb")],
    "tag": lambda nb: ["promote", str(nb), "--tags", os.fsdecode(b"t\xfe")],
    "parameter value": lambda nb: ["promote", str(nb), "-r", "epochs", os.fsdecode(b"\xff")],
    "dags dir": lambda nb: ["promote", str(nb), "--dags-dir",
                            os.fsdecode(bytes(nb.parent) + b"/d\xff")],
    "run output": lambda nb: ["run", str(nb), "--output", os.fsdecode(b"o\xff.ipynb")],
}


@pytest.mark.parametrize("case", ENCODING_CASES)
def test_bytes_that_are_not_utf8_are_one_line_before_anything_is_written(case, nb, tmp_path,
                                                                         capsys):
    (tmp_path / os.fsdecode(b"\xff.ipynb")).write_bytes(nb.read_bytes())
    dags = tmp_path / "dags"
    argv = ENCODING_CASES[case](nb)
    if "--dags-dir" not in argv and argv[0] == "promote":
        argv += ["--dags-dir", str(dags)]
    before = sorted(os.listdir(tmp_path))
    rc, _, err = _run(argv, capsys)
    _refused(rc, err, dags, naming="not valid UTF-8")
    assert sorted(os.listdir(tmp_path)) == before


# -- damaged telemetry ----------------------------------------------------------------------------

GOOD_TELEMETRY = {"interval_s": 1.0, "gpu_available": False,
                  "summary": {"duration_s": 1.0, "samples": 2},
                  "samples": [{"t": 0.0, "cpu_pct": 1.0, "rss_mb": 10.0, "gpus": []},
                              {"t": 1.0, "cpu_pct": 2.0, "rss_mb": 11.0, "gpus": []}]}
DAMAGE = {
    "telemetry not an object": ([1, 2], None),
    "samples not a list": ({**GOOD_TELEMETRY, "samples": "garbage"}, None),
    "summary not an object": ({**GOOD_TELEMETRY, "summary": 5}, None),
    "a time that is text": ({**GOOD_TELEMETRY, "samples": [{"t": "a"}]}, None),
    "a GPU without index": ({**GOOD_TELEMETRY, "samples": [{"t": 0, "gpus": [{"uuid": "u"}]}]},
                            None),
    "utilisation as text": ({**GOOD_TELEMETRY, "samples": [
        {"t": 0, "gpus": [{"index": 0, "uuid": "u", "util_pct": "high"}]}]}, None),
    "a cell's duration as text": (GOOD_TELEMETRY, {"duration_s": "x", "start_s": 0}),
    "a cell's telemetry a list": (GOOD_TELEMETRY, [1]),
    "an interval of zero": ({**GOOD_TELEMETRY, "interval_s": 0}, None),
}


def _executed(path: Path, run: object, cell: object) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nb.metadata["airgpu"] = {"telemetry": run}
    if cell is not None:
        nb.cells[0].metadata["airgpu"] = {"telemetry": cell}
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("case", DAMAGE)
def test_report_on_damaged_telemetry_is_one_line(case, tmp_path, capsys):
    notebook = _executed(tmp_path / "run.ipynb", *DAMAGE[case])
    for extra in ([], ["--json"], ["--png", str(tmp_path / "t.png")]):
        rc, out, err = _run(["report", str(notebook), *extra], capsys)
        _refused(rc, err, tmp_path / "none", naming="damaged")
        assert out == "" and not (tmp_path / "t.png").exists()


@pytest.mark.parametrize(("png", "naming"), [("folder", "is a folder"),
                                             ("t.svg", "must end in .png"),
                                             ("t", "must end in .png")])
def test_report_png_must_be_a_png_file(png, naming, tmp_path, capsys):
    notebook = _executed(tmp_path / "run.ipynb", GOOD_TELEMETRY, None)
    (tmp_path / "folder").mkdir()
    rc, _, err = _run(["report", str(notebook), "--png", str(tmp_path / png)], capsys)
    _refused(rc, err, tmp_path / "none", naming=naming)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "run.ipynb"]


def test_report_on_good_telemetry_still_works_and_writes_the_png(tmp_path, capsys):
    notebook = _executed(tmp_path / "run.ipynb", GOOD_TELEMETRY, {"duration_s": 1.0,
                                                                  "start_s": 0.0, "end_s": 1.0})
    rc, out, err = _run(["report", str(notebook), "--png", str(tmp_path / "t.png")], capsys)
    assert rc == 0 and "wrote" in out, err
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_walk_keeps_its_size():
    cases = (len(INJECTION_CASES) + 2 * len(LAYER_ROWS) + len(FS_CASES) + 3
             + len(ENCODING_CASES) + len(DAMAGE) * 3 + 3)
    assert cases >= 300, cases


def test_deployment_keys_in_pyproject_do_not_break_promotion(nb, tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.airgpu]\nairflow_url = "http://airflow.local:8080"\n'
        'airflow_username = "me"\ntags = ["team"]\n')
    dags = tmp_path / "dags"
    rc, _, err = _run(["promote", str(nb), "--dags-dir", str(dags)], capsys)
    assert rc == 0, err
    source = next(dags.glob("*.py")).read_text()
    assert "'team'" in source and "airflow.local" not in source
