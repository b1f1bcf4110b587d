"""Every way into papermill refuses a parameter name that is not a plain identifier, a value
with no Python literal, and an output that would clobber the source, before a kernel starts
(issue 15 items 1 and 6). Real papermill, real Airflow; only the GPU is absent."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nbformat
import pytest

from airgpu_nb import run
from airgpu_nb.cli import main
from airgpu_nb.container_run import main as container_main
from airgpu_nb.errors import SpecError
from airgpu_nb.promote import promote
from airgpu_nb.run import check_run_parameters
from conftest import write_notebook


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hostile_key(marker: Path) -> str:
    return f"x=2;open({str(marker)!r},'w');y"


@pytest.fixture
def outputs(tmp_path, monkeypatch) -> Path:
    """Where a default `airgpu run` would write: must stay absent when input is refused."""
    folder = tmp_path / "outputs"
    monkeypatch.setenv("AIRGPU_OUTPUT_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.fixture
def notebook(tmp_path) -> Path:
    return write_notebook(tmp_path / "nb.ipynb", "print('ran', x)", parameters="x = 1")


# -- the one check ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x=2;y", "a b", "", "1x", "__class__", "__builtins__",
                                  "lambda", "class", "None", 3, None])
def test_names_that_are_not_plain_identifiers_are_refused_naming_the_key(name):
    with pytest.raises(SpecError) as info:
        check_run_parameters({name: 1})
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), (1, 2), {1, 2}, b"bytes", object(), [1, {"a": [float("-inf")]}],
    {1: "int key"}, type("Sneaky", (int,), {"__format__": lambda self, spec: "__import__"})(1),
    type("SneakyStr", (str,), {})("text"),
])
def test_values_without_a_python_literal_are_refused(value):
    with pytest.raises(SpecError, match="'p'"):
        check_run_parameters({"p": value})


def test_literal_values_and_nested_json_pass_unchanged():
    params = {"s": "it's \"q\"\n🚀", "i": -3, "f": 2.5, "b": False, "n": None,
              "nested": {"list": [1, "two", [3.0, None]], "flag": True}, "empty": []}
    assert check_run_parameters(params) == params
    assert check_run_parameters(None) == {}


def test_deeply_nested_values_are_refused_without_a_recursion_error():
    value: list = []
    for _ in range(200):
        value = [value]
    with pytest.raises(SpecError, match="nested deeper"):
        check_run_parameters({"deep": value})


@pytest.mark.parametrize("params", [{"gpus_requested": 0}, {"gpus_requested": 2},
                                    {"gpus_requested": "all"}, {"allow_cpu": True},
                                    {"allow_cpu": False}])
def test_a_run_may_override_the_gpu_check_parameters_with_their_types(params):
    assert check_run_parameters(params) == params


@pytest.mark.parametrize("params", [{"gpus_requested": -1}, {"gpus_requested": True},
                                    {"gpus_requested": "2"}, {"gpus_requested": 1.0},
                                    {"allow_cpu": 1}, {"allow_cpu": "true"},
                                    {"allow_cpu": None}])
def test_gpu_check_parameters_of_the_wrong_type_are_refused(params):
    [name] = params
    with pytest.raises(SpecError, match=repr(name)):
        check_run_parameters(params)


def test_the_error_names_the_layer_it_came_from():
    with pytest.raises(SpecError, match=r"^trigger conf: invalid parameter name 'a b'"):
        check_run_parameters({"a b": 1}, "trigger conf")


def test_execute_itself_refuses_before_writing_anything(tmp_path, notebook):
    """`%airgpu run`, the panel and DAG tasks all reach papermill through execute()."""
    marker = tmp_path / "marker"
    output = tmp_path / "out" / "run.ipynb"
    with pytest.raises(SpecError, match="invalid parameter name"):
        run.execute(notebook, output, {hostile_key(marker): 1}, telemetry=False)
    assert not marker.exists() and not output.parent.exists()
    with pytest.raises(SpecError, match="is the notebook being run"):
        run.execute(notebook, notebook, {"x": 2}, telemetry=False)


def test_the_telemetry_engine_is_found_through_papermills_public_lookup():
    assert run._engine_name(True) == "airgpu"  # the package's own entry point is installed
    assert run._engine_name(False) is None


# -- airgpu run ---------------------------------------------------------------------------------

def test_cli_run_refuses_code_in_a_parameter_name_before_any_kernel(
        tmp_path, notebook, outputs, capsys):
    marker = tmp_path / "marker"
    key = hostile_key(marker)
    start = time.perf_counter()
    code = main(["run", str(notebook), "-p", key, "1", "--allow-cpu", "--no-progress"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and repr(key) in err and "Traceback" not in err
    assert not marker.exists()
    assert not outputs.exists()  # no executed notebook
    assert elapsed < 1.0  # a kernel takes seconds to start; none did


@pytest.mark.parametrize("name", ["a b", "__class__", "lambda"])
def test_cli_run_refuses_bad_parameter_names(notebook, outputs, capsys, name):
    assert main(["run", str(notebook), "-p", name, "1", "--allow-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("airgpu: error:") and repr(name) in err and err.count("\n") == 1
    assert not outputs.exists()


def _output_cases(tmp_path: Path, notebook: Path) -> dict[str, tuple[Path, Path]]:
    """(notebook given, --output given) pairs that must be refused."""
    link_out = tmp_path / "link-out.ipynb"
    link_out.symlink_to(notebook)
    link_in = tmp_path / "link-in.ipynb"
    link_in.symlink_to(notebook)
    hard = tmp_path / "hard.ipynb"
    hard.hardlink_to(notebook)
    folder = tmp_path / "folder.ipynb"
    folder.mkdir()
    (tmp_path / "plain").mkdir()
    return {
        "the source itself": (notebook, notebook),
        "the source, spelled differently": (notebook, tmp_path / "plain" / ".." / "nb.ipynb"),
        "a symlink to the source": (notebook, link_out),
        "the source run through a symlink": (link_in, notebook),
        "a hard link to the source": (notebook, hard),
        "an existing directory": (notebook, folder),
        "an existing directory without a suffix": (notebook, tmp_path / "plain"),
        "under a regular file": (notebook, notebook / "x.ipynb"),
        "deep under a regular file": (notebook, notebook / "a" / "b" / "x.ipynb"),
        "not a notebook name": (notebook, tmp_path / "out.txt"),
    }


def test_cli_run_refuses_outputs_that_would_clobber_or_cannot_hold_a_notebook(
        tmp_path, notebook, outputs, capsys):
    before = digest(notebook)
    for case, (source, output) in _output_cases(tmp_path, notebook).items():
        start = time.perf_counter()
        code = main(["run", str(source), "--output", str(output), "--allow-cpu"])
        err = capsys.readouterr().err
        assert code == 2, case
        assert err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert time.perf_counter() - start < 1.0, case
        assert digest(notebook) == before, case
    assert (tmp_path / "folder.ipynb").is_dir() and not any((tmp_path / "folder.ipynb").iterdir())
    assert not (tmp_path / "out.txt").exists() and not outputs.exists()


def test_cli_run_still_writes_a_fresh_output_and_overwrites_its_own(tmp_path, notebook, outputs,
                                                                    capsys):
    output = tmp_path / "runs" / "new" / "executed.ipynb"
    for value in ("2", "3"):  # the second run overwrites the executed copy, not the source
        assert main(["run", str(notebook), "-p", "x", value, "-p", "allow_cpu", "True",
                     "--output", str(output), "--no-progress"]) == 0, capsys.readouterr().err
    nb = nbformat.read(output, as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "ran 3" in printed


# -- the container entry point ------------------------------------------------------------------

def test_container_run_refuses_a_hostile_params_key_before_any_kernel(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = write_notebook(tmp_path / "c.ipynb", "print(x)", parameters="x = 1")
    result = promote(path, dags_dir=tmp_path / "dags", allow_cpu=True).write()
    config = {"dag_id": "c", "notebook": str(result.notebook_file), "name": "c.ipynb",
              "kernel": "python3", "output_dir": str(tmp_path / "outputs"), "telemetry": False}
    start = time.perf_counter()
    code = container_main(["--config-json", json.dumps(config), "--run-id", "r",
                           "--params-json", json.dumps({hostile_key(marker): 1})])
    assert code == 2 and time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert repr(hostile_key(marker)) in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "outputs").exists()


# -- a real Airflow DAG, triggered with conf ----------------------------------------------------

def test_a_hostile_trigger_conf_key_fails_the_task_without_running_it(airflow_home, tmp_path):
    marker = tmp_path / "MARKER"
    path = write_notebook(tmp_path / "hostile_conf.ipynb", "print('ran', x)", parameters="x = 1")
    result = promote(path, dags_dir=airflow_home.dags, allow_cpu=True, retries=2,
                     retry_delay_s=1).write()
    key = hostile_key(marker)
    proc = airflow_home.airflow("dags", "test", result.spec.dag_id, "--conf",
                                json.dumps({key: 1}), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert not marker.exists()
    assert not (airflow_home.outputs / result.spec.dag_id).exists()  # no executed notebook
    assert repr(key) in log and "AirflowFailException" in log
    # Failed for good: a hostile conf is not tried again.
    assert log.count("refusing to run the notebook") == 1, log[-3000:]
    assert "up_for_retry" not in log.lower()


def test_a_trigger_conf_may_override_allow_cpu_with_a_bool(airflow_home, tmp_path):
    path = write_notebook(tmp_path / "conf_allow_cpu.ipynb", "print('ran with', x)",
                          parameters="x = 1")
    # Promoted to need a GPU (none here): only the conf's allow_cpu lets the check pass.
    result = promote(path, dags_dir=airflow_home.dags, retries=0).write()
    proc = airflow_home.airflow("dags", "test", result.spec.dag_id, "--conf",
                                json.dumps({"allow_cpu": True, "x": 7}), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    [executed] = sorted((airflow_home.outputs / result.spec.dag_id).glob("*/*.ipynb"))
    nb = nbformat.read(executed, as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "ran with 7" in printed


def test_airflow_params_dict_values_are_checked_as_plain_values():
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import AirflowFailException

    from airgpu_nb.airflow_task import _checked_params

    assert _checked_params(ParamsDict({"x": 1, "allow_cpu": True})) == {"x": 1,
                                                                        "allow_cpu": True}
    with pytest.raises(AirflowFailException, match=r"'a b'"):
        _checked_params(ParamsDict({"a b": 1}))
    with pytest.raises(AirflowFailException, match=r"'allow_cpu'"):
        _checked_params({"allow_cpu": "yes"})
