"""`airgpu deploy` / `trigger` / `runs` against a real Airflow 3 deployment: the LocalExecutor
one of `tests/deployment.py` (fixtures `deployment`, started once for the module, and
`configured`)."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from deployment import USER, Deployment
from deployment import free_port as _free_port

from airgpu_nb import cli
from airgpu_nb.airflow_api import AirflowClient, load_config
from conftest import write_notebook

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _promote(deployment: Deployment, nb: Path, dag_id: str, *extra: str) -> None:
    assert cli.main(["promote", str(nb), "--dag-id", dag_id, "--dags-dir", str(deployment.dags),
                     "--allow-cpu", "--retries", "0", *extra]) == 0


PARAMS_CELL = ("import json, pathlib\n"
               "pathlib.Path('params.json').write_text(json.dumps("
               "{'count': count, 'ratio': ratio, 'name': name, 'flag': flag, 'nothing': nothing}))")


def test_promote_deploy_trigger_succeeds_and_typed_params_round_trip(configured, tmp_path,
                                                                    capsys):
    deployment = configured
    nb = write_notebook(tmp_path / "params_nb.ipynb", PARAMS_CELL,
                        parameters="count = 1\nratio = 0.5\nname = 'x'\nflag = False\n"
                                   "nothing = 1")
    _promote(deployment, nb, "deploy_params")
    capsys.readouterr()
    name = "it's \"quoted\" ü\\n"
    code = cli.main(["trigger", "deploy_params", "--dags-dir", str(deployment.dags),
                     "-p", "count", "7", "-p", "ratio", "0.25", "-r", "name", name,
                     "-p", "flag", "True", "-p", "nothing", "None", "--wait", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, (err, deployment.tail("scheduler"))
    result = json.loads(out)
    assert result["state"] == "success" and result["failure"] is None
    # Created unpaused on a deployment that pauses new DAGs: the generated DAG said so.
    assert "unpaused" not in err and "parsed: the deployment runs this version" in err
    assert "queued" in err and "try 1 of 1" in err
    executed = Path(result["executed_notebook"])
    assert executed.is_file() and executed.is_relative_to(deployment.outputs)
    assert json.loads((executed.parent / "params.json").read_text()) == {
        "count": 7, "ratio": 0.25, "name": name, "flag": True, "nothing": None}
    assert result["result"]["ok"] is True and "duration_s" in result["result"]["telemetry"]
    assert result["url"] == f"{deployment.url}/dags/deploy_params/runs/" + \
        result["run_id"].replace(":", "%3A").replace("+", "%2B")

    assert cli.main(["runs", "deploy_params", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["state"]) for r in runs] == [(result["run_id"], "success")]
    assert runs[0]["conf"]["name"] == name

    # A second promotion changes the file: deploy waits for the new version, not the old one.
    _promote(deployment, nb, "deploy_params", "-p", "count", "9", "--force")
    capsys.readouterr()
    assert cli.main(["deploy", "deploy_params", "--dags-dir", str(deployment.dags),
                     "--json"]) == 0
    out, err = capsys.readouterr()
    assert "asked it to re-parse" in err, err
    assert json.loads(out)["reparse_requested"] is True
    with AirflowClient(load_config()) as client:  # the DAG the scheduler uses, not just source
        assert client.dag("deploy_params")["params"]["count"]["value"] == 9
        assert "params={'count': 9," in client.dag_source("deploy_params")


def test_the_magics_trigger_follow_and_list_runs(configured, tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    deployment = configured
    nb = write_notebook(tmp_path / "magic_nb.ipynb", "print(word * 2)", parameters="word = 'a'")
    _promote(deployment, nb, "deploy_magic")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "airgpu_nb")
    try:
        with capture_output() as captured:
            result = ip.run_cell(f"%airgpu trigger deploy_magic --dags-dir '{deployment.dags}' "
                                 "-r word 'b c' --wait")
        assert result.error_in_exec is None, (result.error_in_exec, captured.stdout)
        assert "success: run manual__" in captured.stdout
        assert "executed notebook: " + str(deployment.outputs) in captured.stdout
        link = captured.outputs[-1].data["text/html"]
        assert f"href='{deployment.url}/dags/deploy_magic/runs/manual__" in link
        with capture_output() as captured:
            result = ip.run_cell("%airgpu runs deploy_magic")
        assert result.error_in_exec is None, result.error_in_exec
        table = captured.outputs[0].data
        assert "success" in table["text/plain"] and "<table>" in table["text/html"]
        with capture_output():
            result = ip.run_cell("%airgpu runs 'bad id!'")
        assert "invalid DAG id" in str(result.error_in_exec)
    finally:
        ip.run_line_magic("unload_ext", "airgpu_nb")


def test_a_failing_notebook_exits_1_naming_the_failing_cell_and_the_executed_notebook(
        configured, tmp_path, capsys):
    deployment = configured
    nb = write_notebook(tmp_path / "fails_nb.ipynb", "x = 1",
                        "raise ValueError('boom from the notebook')")
    _promote(deployment, nb, "deploy_fails")
    capsys.readouterr()
    code = cli.main(["trigger", "deploy_fails", "--dags-dir", str(deployment.dags), "--wait"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "failed: run " in out
    line = err.strip()
    assert "\n" not in line and len(line) < 600, line
    assert "cell 3 raised ValueError: boom from the notebook (executed notebook: " in line
    executed = line.split("executed notebook: ")[1].split(")")[0]
    assert Path(executed).is_file() and Path(executed).is_relative_to(deployment.outputs)
    assert "/dags/deploy_fails/runs/" in line


def test_a_quick_repromotion_waits_for_the_new_dag_then_an_import_error_is_one_line(
        configured, tmp_path, capsys):
    deployment = configured
    nb = write_notebook(tmp_path / "imp_nb.ipynb", "pass", parameters="size = 1")
    _promote(deployment, nb, "deploy_import")
    assert cli.main(["deploy", "deploy_import", "--dags-dir", str(deployment.dags)]) == 0
    # Promoted again at once: the deployment reads the new source before it rewrites the DAG
    # (at most every min_serialized_dag_update_interval); deploy waits for the DAG.
    _promote(deployment, nb, "deploy_import", "-p", "size", "2", "--force")
    capsys.readouterr()
    assert cli.main(["deploy", "deploy_import", "--dags-dir", str(deployment.dags)]) == 0
    capsys.readouterr()
    with AirflowClient(load_config()) as client:
        assert client.dag("deploy_import")["params"]["size"]["value"] == 2
    dag_file = deployment.dags / "deploy_import.py"
    dag_file.write_text(dag_file.read_text() + "\nraise RuntimeError('broken on purpose')\n")
    capsys.readouterr()
    started = time.monotonic()
    code = cli.main(["deploy", "deploy_import", "--dags-dir", str(deployment.dags),
                     "--timeout", "60"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "cannot import deploy_import.py" in err
    assert "RuntimeError: broken on purpose" in err
    assert time.monotonic() - started < 45


def test_a_wrong_password_is_exit_2_and_no_secret_is_printed(configured, monkeypatch, capsys):
    deployment = configured
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("AIRGPU_AIRFLOW_PASSWORD", wrong)
    assert cli.main(["runs", "anything"]) == 2
    out, err = capsys.readouterr()
    assert deployment.url in err and "'airgpu' was refused (401)" in err
    assert err.count("\n") == 1
    # The same with the credentials written into the URL.
    monkeypatch.delenv("AIRGPU_AIRFLOW_USERNAME")
    monkeypatch.delenv("AIRGPU_AIRFLOW_PASSWORD")
    monkeypatch.setenv("AIRGPU_AIRFLOW_URL", deployment.url.replace("//", f"//{USER}:{wrong}@"))
    assert cli.main(["trigger", "anything", "--wait"]) == 2
    out2, err2 = capsys.readouterr()
    assert deployment.url in err2
    for text in (out, err, out2, err2):
        assert wrong not in text and deployment.password not in text
    # And a right one that is not allowed to see a DAG that does not exist: a clean 404.
    monkeypatch.setenv("AIRGPU_AIRFLOW_URL", deployment.url)
    monkeypatch.setenv("AIRGPU_AIRFLOW_USERNAME", USER)
    monkeypatch.setenv("AIRGPU_AIRFLOW_PASSWORD", deployment.password)
    assert cli.main(["runs", "no_such_dag"]) == 2
    assert "has no DAG 'no_such_dag'" in capsys.readouterr().err


# -- no deployment needed ------------------------------------------------------------------------

def test_the_api_down_is_exit_2_at_once_naming_the_url(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("AIRGPU_AIRFLOW_URL", url)
    monkeypatch.setenv("AIRGPU_AIRFLOW_TOKEN", "tok-" + secrets.token_hex(8))
    started = time.monotonic()
    assert cli.main(["runs", "some_dag"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 5
    assert url in err and "unreachable" in err and "tok-" not in err and err.count("\n") == 1


def test_an_api_that_never_answers_is_exit_2_within_the_timeout(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]),
                         daemon=True).start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("AIRGPU_AIRFLOW_URL", url)
        monkeypatch.setenv("AIRGPU_AIRFLOW_TIMEOUT", "1.5")
        started = time.monotonic()
        assert cli.main(["trigger", "some_dag", "--dags-dir", str(tmp_path)]) == 2
        elapsed = time.monotonic() - started
        for conn in accepted:
            conn.close()
    err = capsys.readouterr().err
    assert elapsed < 5, elapsed
    assert url in err and "no answer" in err


def test_no_deployment_configured_is_one_line_saying_what_to_set(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIRGPU_AIRFLOW_URL", raising=False)
    assert cli.main(["runs", "some_dag"]) == 2
    assert "set AIRGPU_AIRFLOW_URL" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text('[tool.airgpu]\nairflow_password = "s3cret-pw"\n')
    assert cli.main(["runs", "some_dag"]) == 2
    err = capsys.readouterr().err
    assert "secrets do not belong in a file" in err and "s3cret-pw" not in err
