"""A real distributed run: Airflow 3 with CeleryExecutor on PostgreSQL and Redis, a CPU worker on
queue `default` and a GPU worker on queue `gpu`, all started here on loopback ports.

A `compose`-target DAG is triggered twice at once. Its task must run on the `gpu` worker (the
task instance's hostname comes from each worker's own `hostname_callable`, and the notebook
records the worker it ran in), leave its executed notebook where the local naming says, and the
`gpu` pool with one slot must keep the two runs apart even though the GPU worker could run two
tasks at a time. Then the user's path through the CLI: promote, `airgpu trigger --wait` with
typed parameters as the deployment's simple-auth user, `airgpu runs --json`. The stack
(`tests/celery_stack.py`) starts once for the module; everything started is stopped at the end,
also on failure.
"""

from __future__ import annotations

import json
import time
import urllib.error
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery_stack import CeleryDeployment, StackUnavailable, celery_deployment, wait_for
from deployment import use_deployment

from airgpu_nb import cli
from airgpu_nb.keys import INJECTED_PARAMETERS_TAG, cell_tags
from airgpu_nb.run import executed_path
from conftest import write_notebook

pytestmark = [pytest.mark.celery, pytest.mark.timeout(420)]

DAG_ID = "celery_gpu_check"
NOTEBOOK = "celery_nb.ipynb"


@pytest.fixture(scope="module")
def celery_stack() -> Iterator[CeleryDeployment]:
    """One deployment for the module (`tests/celery_stack.py`), stopped at its end."""
    try:
        with celery_deployment() as deployment:
            yield deployment
    except StackUnavailable as exc:
        pytest.fail(str(exc))


def test_compose_dag_runs_on_the_gpu_worker_and_the_gpu_pool_serialises_runs(celery_stack):
    deployment = celery_stack
    stack, root = deployment.stack, deployment.root
    started = time.monotonic()
    nb = write_notebook(
        root / NOTEBOOK,
        "import os, pathlib, time\n"
        "pathlib.Path('worker.txt').write_text(os.environ.get('AIRGPU_TEST_WORKER', '?'))\n"
        "time.sleep(seconds)",
        parameters="seconds = 1")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", DAG_ID,
                     "--dags-dir", str(root / "dags"), "--allow-cpu", "--no-telemetry",
                     "-p", "seconds", "3"]) == 0

    def dag_parsed() -> bool:
        try:
            return deployment.api("GET", f"/dags/{DAG_ID}")["dag_id"] == DAG_ID
        except urllib.error.HTTPError:
            return False

    wait_for("the dag-processor to parse the DAG", dag_parsed, stack, 120)
    deployment.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    run_ids = [deployment.api("POST", f"/dags/{DAG_ID}/dagRuns",
                              {"logical_date": None,
                               "dag_run_id": f"manual__gpu_{i}"})["dag_run_id"]
               for i in range(2)]

    def finished() -> list[dict[str, Any]] | None:
        runs = [deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}") for run_id in run_ids]
        if all(run["state"] in ("success", "failed") for run in runs):
            return runs
        return None

    runs = wait_for("both DAG runs to finish", finished, stack, 300)
    tis = [deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/run_notebook")
           for run_id in run_ids]
    assert [run["state"] for run in runs] == ["success", "success"], (
        stack.tail("worker-gpu"), tis)
    for ti, run_id in zip(tis, run_ids, strict=True):
        assert ti["state"] == "success"
        assert ti["queue"] == "gpu" and ti["pool"] == "gpu" and ti["pool_slots"] == 1
        assert ti["hostname"] == "gpu-worker.airgpu-test"
        executed = executed_path(root / "outputs", DAG_ID, run_id, NOTEBOOK)
        assert executed.is_file(), sorted(str(p) for p in (root / "outputs").rglob("*"))
        assert (executed.parent / "worker.txt").read_text() == "gpu"
        cells = json.loads(executed.read_text())["cells"]
        assert any("airgpu-gpu-check" in c["metadata"].get("tags", []) for c in cells)
    first, second = sorted(
        (datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
         for ti in tis)
    assert first[1] <= second[0], f"GPU runs overlapped: {first} and {second}"
    assert "airgpu-test" in stack.tail("worker-gpu", 200_000)
    print(f"celery run: {time.monotonic() - started:.1f}s after the stack started")


PARAMS_CELL = ("import json, os, pathlib\n"
               "pathlib.Path('worker.txt').write_text(os.environ.get('AIRGPU_TEST_WORKER', '?'))\n"
               "pathlib.Path('params.json').write_text(json.dumps("
               "{'count': count, 'ratio': ratio, 'name': name, 'flag': flag}))")


def test_cli_trigger_wait_runs_on_the_gpu_worker_and_params_round_trip(
        celery_stack, tmp_path, monkeypatch, capsys):
    deployment = celery_stack
    use_deployment(monkeypatch, deployment.client_env(), tmp_path)
    dag_id = "celery_cli_params"
    nb = write_notebook(tmp_path / "cli_nb.ipynb", PARAMS_CELL,
                        parameters="count = 1\nratio = 0.5\nname = 'x'\nflag = False")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", dag_id,
                     "--dags-dir", str(deployment.dags), "--allow-cpu", "--retries", "0"]) == 0
    capsys.readouterr()
    started = time.monotonic()
    name = "it's \"quoted\" ü"
    code = cli.main(["trigger", dag_id, "--dags-dir", str(deployment.dags),
                     "-p", "count", "7", "-p", "ratio", "0.25", "-r", "name", name,
                     "-p", "flag", "True", "--wait", "--json"])
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"\ncelery trigger --wait: {time.monotonic() - started:.1f}s\n{err}")
    assert code == 0, (err, deployment.stack.tail("worker-gpu"))
    assert deployment.password not in out + err
    result = json.loads(out)
    assert result["state"] == "success" and result["failure"] is None
    assert "parsed: the deployment runs this version" in err
    [task] = result["tasks"]
    assert task["state"] == "success" and task["hostname"] == "gpu-worker.airgpu-test"
    executed = Path(result["executed_notebook"])
    assert executed == executed_path(deployment.outputs, dag_id, result["run_id"], nb.name)
    assert (executed.parent / "worker.txt").read_text() == "gpu"
    assert json.loads((executed.parent / "params.json").read_text()) == {
        "count": 7, "ratio": 0.25, "name": name, "flag": True}
    cells = json.loads(executed.read_text())["cells"]
    injected = [c for c in cells if INJECTED_PARAMETERS_TAG in cell_tags(c)]
    assert len(injected) == 1 and "count = 7" in "".join(injected[0]["source"])
    assert result["conf"] == {"count": 7, "ratio": 0.25, "name": name, "flag": True}

    assert cli.main(["runs", dag_id, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["state"]) for r in runs] == [(result["run_id"], "success")]
    assert runs[0]["conf"]["name"] == name
    assert runs[0]["url"] == result["url"]
