"""The settings table: one row per setting, every layer parsed by it, and a regenerate command
that really reproduces the DAG."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airgpu_nb import settings as table
from airgpu_nb.cli import build_parser, main
from conftest import BIN, write_notebook

AWKWARD_ARGS = [
    "--schedule", "0 2 * * *", "--tag", "team's", "--tag", "ü", "--retries", "3",
    "--retry-delay", "60", "--timeout", "7200", "--start-date", "2025-03-04", "--catchup",
    "--no-telemetry", "--output-dir", "runs", "--allow-cpu", "--gpus", "2",
    "-r", "quote", "it's \"both\"", "-r", "newline", "a\nb\r\n\tc", "-r", "dash", "--x",
    "-p", "lr", "-0.5", "-p", "flag", "False", "-p", "nothing", "None",
    "-r", "uni", "日本 🚀\u2028x",
]


def header_command(dag_file: Path) -> str:
    lines = dag_file.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Regenerate")) + 1
    parts = []
    for line in lines[start:]:
        text = line[len("#   "):]
        parts.append(text[:-2] if text.endswith(" \\") else text)
        if not text.endswith(" \\"):
            break
    return " ".join(parts)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_notebook(tmp_path / "train.ipynb", "print(quote)",
                   parameters="quote = 'q'\nnewline = ''\ndash = ''\nlr = 0.1\nflag = True\n"
                              "nothing = 1\nuni = ''")
    return tmp_path


@pytest.mark.parametrize("args", [
    AWKWARD_ARGS,
    ["--target", "kubernetes", "--mig", "1g.10gb", "--namespace", "ml", "--cpu", "4",
     "--memory", "16Gi", "--node-selector", "pool=gpu", "--toleration", "dedicated=gpu:NoSchedule",
     "--image", "registry.example/train:1"],
    ["--target", "docker", "--gpus", "2", "--device-id", "0", "--device-id", "GPU-abc",
     "--shm-size", "4g"],
], ids=["awkward-local", "kubernetes", "docker"])
def test_the_regenerate_command_in_the_header_reproduces_the_dag_byte_for_byte(project, args):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # A pyproject that disagrees with the command line: the command must not depend on it.
    (project / "pyproject.toml").write_text('[tool.airgpu]\nretries = 9\ngpus = 4\n'
                                            'tags = ["from-file"]\n')
    first = subprocess.run([str(BIN / "airgpu"), "promote", "train.ipynb", "--dags-dir", "a",
                            "--retries", "1", "--gpus", "1", "--tag", "x", *args], cwd=project,
                           env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    command = header_command(project / "a" / "train.py")
    again = subprocess.run(["bash", "-c", command + " --dags-dir b"], cwd=project, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, (command, again.stderr)
    assert (project / "b" / "train.py").read_bytes() == (project / "a" / "train.py").read_bytes()
    recorded = nbformat.read(project / "b" / "train.ipynb", as_version=4).metadata.airgpu
    assert recorded.settings == nbformat.read(project / "a" / "train.ipynb",
                                              as_version=4).metadata.airgpu.settings


def test_every_row_is_a_promote_option_a_pyproject_key_and_a_recorded_setting(tmp_path):
    help_text = build_parser()._subparsers._group_actions[0].choices["promote"].format_help()
    nb = write_notebook(tmp_path / "n.ipynb", "pass")
    assert main(["promote", str(nb), "--dags-dir", str(tmp_path / "d")]) == 0
    recorded = nbformat.read(tmp_path / "d" / "n.ipynb", as_version=4).metadata.airgpu.settings
    for row in table.SETTINGS:
        assert row.cli_flag in help_text, row.name
        if row.in_spec:
            assert row.name in recorded, row.name


def promote_with(tmp_path: Path, pyproject: str | None = None, metadata: dict | None = None,
                 args: list[str] | None = None, env: dict | None = None):
    nb_path = write_notebook(tmp_path / "nb.ipynb", "pass", parameters="x = 1")
    if metadata is not None:
        nb = nbformat.read(nb_path, as_version=4)
        nb.metadata["airgpu"] = metadata
        nbformat.write(nb, nb_path)
    if pyproject is not None:
        (tmp_path / "pyproject.toml").write_bytes(pyproject.encode("utf-8", "surrogateescape")
                                                  if isinstance(pyproject, str) else pyproject)
    return nb_path


BAD_FILE_VALUES = [
    ("tags = 5", "tags: expected a list of strings, got 5"),
    ('gpus = "2"', "gpus: expected a whole number of GPUs"),
    ("gpus = 1.5", "gpus: expected a whole number of GPUs"),
    ('parameters = "x"', "parameters: expected a table"),
    ("schedule = 5", "schedule: expected"),
    ("mig = [1]", "mig: unknown MIG profile"),
    ('allow_cpu = "false"', "allow_cpu: expected true or false, got 'false'"),
    ('telemetry = "no"', "telemetry: expected true or false"),
    ('catchup = "yes"', "catchup: expected true or false"),
    ("tags = {a = 1}", "tags: expected a list of strings"),
    ("output_dir = 5", "output_dir: expected"),
    ("retries = -1", "retries: expected a whole number from 0 to 100"),
    ("execution_timeout_s = 99999999999999999999", "execution_timeout_s: expected"),
    ('dag_id = "abc\\n"', "dag_id: invalid DAG id"),
    ("bogus = 1", "unknown setting 'bogus'"),
]


@pytest.mark.parametrize("line,message", BAD_FILE_VALUES)
def test_wrong_types_in_pyproject_are_one_line_naming_layer_key_and_value(tmp_path, capsys,
                                                                          line, message):
    nb = promote_with(tmp_path, pyproject=f"[tool.airgpu]\n{line}\n")
    assert main(["promote", str(nb), "--dags-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pyproject.toml [tool.airgpu]" in err and message in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("pyproject,message", [
    ("tool = 5\n", "[tool]: expected a table"),
    (b"[tool.airgpu]\ntags = ['\xff']\n", "not UTF-8"),
    ("[tool.airgpu\n", "cannot read"),
])
def test_a_broken_pyproject_is_one_line(tmp_path, capsys, pyproject, message):
    nb = promote_with(tmp_path)
    (tmp_path / "pyproject.toml").write_bytes(pyproject if isinstance(pyproject, bytes)
                                              else pyproject.encode())
    assert main(["promote", str(nb), "--dags-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("metadata,message", [
    ({"tags": 5}, "tags: expected a list of strings"),
    ({"gpus": 1.5}, "gpus: expected"),
    ({"allow_cpu": "false"}, "allow_cpu: expected true or false"),
    ({"settings": {"telemetry": "no"}}, "telemetry: expected true or false"),
    ({"settings": {"catchup": [1]}}, "catchup: expected true or false"),
    ({"output_dir": "../../elsewhere"}, "only name a relative folder inside the output root"),
    ({"output_dir": "/etc"}, "only name a relative folder"),
    ({"settings": {"options": 5}}, "options: expected a table"),
    ({"settings": 5}, "expected a table of settings"),
    (["not", "a", "table"], "expected a table of settings"),
])
def test_wrong_notebook_metadata_is_one_line_naming_the_notebook_and_key(tmp_path, capsys,
                                                                         metadata, message):
    nb = promote_with(tmp_path, metadata=metadata)
    assert main(["promote", str(nb), "--dags-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nb.ipynb metadata.airgpu" in err and message in err, err
    assert not (tmp_path / "d").exists()


def test_a_notebook_never_chooses_where_the_dag_is_written(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    nb = promote_with(tmp_path / "p", metadata={"dags_dir": str(elsewhere)}) if (
        tmp_path / "p").mkdir() is None else None
    monkeypatch.chdir(tmp_path)
    assert main(["promote", str(nb), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["dag_file"]) == Path("dags") / "nb.py" and not elsewhere.exists()
    monkeypatch.setenv("AIRGPU_DAGS_DIR", str(tmp_path / "from-env"))
    (tmp_path / "p" / "pyproject.toml").write_text(f'[tool.airgpu]\ndags_dir = "{tmp_path}/f"\n')
    assert main(["promote", str(nb), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dag_file"] == str(tmp_path / "from-env" / "nb.py")
    assert main(["promote", str(nb), "--json", "--dags-dir", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["dag_file"] == str(tmp_path / "cli" / "nb.py")
    assert not elsewhere.exists()


@pytest.mark.parametrize("args,message", [
    (["--dag-id", "abc\n"], "invalid DAG id"),
    (["--timeout", "99999999999999999999"], "--timeout: expected a whole number"),
    (["--retry-delay", "99999999999999999999"], "--retry-delay: expected a whole number"),
    (["--target", "docker", "--image", "img\x00x"], "invalid image reference"),
    (["--target", "kubernetes", "--namespace", "ml\n"], "namespace"),
    (["--start-date", "20250101"], "invalid start date"),
    (["--start-date", "2025-W01-1"], "invalid start date"),
    (["--tag", "a\nb"], "--tag: expected"),
    (["--image", "x"], "target 'local' does not take --image"),
])
def test_values_with_trailing_newlines_overflows_or_control_characters_are_refused(
        tmp_path, capsys, args, message):
    nb = promote_with(tmp_path)
    assert main(["promote", str(nb), "--dags-dir", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "d").exists()


# -- properties: every row, every layer --------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
ANY_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                         | st.floats(allow_nan=True) | TEXT,
                         lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([r.name for r in table.SETTINGS]), value=ANY_VALUE,
       layer=st.sampled_from(["pyproject.toml [tool.airgpu]", "nb.ipynb metadata.airgpu"]))
def test_any_value_in_any_layer_is_accepted_typed_or_refused_in_one_line(name, value, layer):
    try:
        checked = table.parse_layer({name: value}, layer,
                                    from_notebook=layer.startswith("nb"))
    except table.SpecError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(layer), message
        return
    if value is None or (layer.startswith("nb") and not table.row(name).from_notebook):
        assert name not in checked
        return
    row = table.row(name)
    again = table.parse_layer({name: checked[name]}, layer)  # a checked value checks again
    assert again[name] == checked[name]
    if isinstance(row.kind, table.Boolean):
        assert isinstance(checked[name], bool)
    if isinstance(row.kind, table.Integer):
        assert type(checked[name]) is int and row.kind.low <= checked[name] <= row.kind.high


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=8), value=st.one_of(st.integers(-10**6, 10**6), TEXT,
                                                 st.booleans(), st.none()))
def test_any_parameter_on_the_command_line_promotes_literally_or_exits_2(tmp_path_factory, name,
                                                                        value):
    tmp = tmp_path_factory.mktemp("prop")
    nb = write_notebook(tmp / "nb.ipynb", "pass", parameters=f"{name} = 1"
                        if name.isidentifier() else "x = 1")
    dags = tmp / "d"
    code = main(["promote", str(nb), "--dags-dir", str(dags), "--allow-cpu",
                 "-r" if isinstance(value, str) else "-p", name, str(value)])
    if code == 0:
        nbformat.validate(nbformat.read(dags / "nb.ipynb", as_version=4))
        prepared = nbformat.read(dags / "nb.ipynb", as_version=4)
        assert prepared.metadata.airgpu.settings["parameters"][name] == value
        assert {p.name for p in dags.iterdir()} == {"nb.py", "nb.ipynb"}
    else:
        assert code == 2 and not dags.exists()
