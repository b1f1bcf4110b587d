"""docker/docker-compose.yml brought up for real: `docker compose up --wait` with the test-only
override tests/compose/compose.test.yml (CPU only, no GPU reservation; PostgreSQL and Redis from
Debian's packages, Airflow and the GPU worker built from docker/ on the local Debian base, the
DAG folder the test's own).

A notebook promoted with `--target compose` is deployed, unpaused and triggered through the
api-server's REST API (`airgpu trigger --wait`, as the simple-auth admin whose password the
api-server generated); it must run on `airflow-worker-gpu`, not the CPU worker, with its typed
parameters, and leave its executed notebook, verification report included, in the
`airgpu-outputs` volume. Then the README's walkthrough as written: promote, and
`docker compose exec airflow-apiserver airflow dags trigger DAG_ID` must lead to a successful run.
`down -v` removes the stack, its volumes and its network in `finally`.

The Airflow services run as AIRFLOW_UID=1000, a uid the image does not know (as when a user sets
`$(id -u)`, which the README asks for).

Cost on the 2-core machine, measured: images from nothing about 3.5 minutes (Debian base 42 s,
Airflow 79 s, the GPU worker's TensorFlow layer 62 s, PostgreSQL 17 s and Redis 3 s stand-ins;
about a second each when cached), `up --wait` about 21 s, then each test 13-20 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from compose_stack import ComposeError, ComposeStack
from compose_stack import compose_stack as start_stack
from deployment import use_deployment
from docker_daemon import build_images

from airgpu_nb import cli
from airgpu_nb.airflow_api import AirflowClient, ApiError, load_config
from airgpu_nb.findings import gpu_report
from airgpu_nb.keys import INJECTED_PARAMETERS_TAG, cell_tags
from airgpu_nb.run import executed_path
from airgpu_nb.watch import list_runs, watch
from conftest import write_notebook

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

OUTPUTS = Path("/opt/airflow/outputs")
CELL = ("import json, os, pathlib\n"
        "pathlib.Path('worker.txt').write_text(os.environ.get('AIRGPU_TEST_WORKER', '?'))\n"
        "pathlib.Path('params.json').write_text(json.dumps({'count': count, 'name': name}))\n"
        "print('ran on', os.environ.get('AIRGPU_TEST_WORKER'))")


@pytest.fixture(scope="module")
def compose_stack(docker_daemon, tmp_path_factory) -> Iterator[ComposeStack]:
    """The images (cached layers make this seconds after the first build), then one stack for
    the module (tests/compose_stack.py), removed with its volumes at the end."""
    built = build_images(["airflow", "gpu-worker"], services=True)
    home = tmp_path_factory.mktemp("compose")
    (home / "dags").mkdir()
    try:
        with start_stack(home, home / "dags") as stack:
            print(f"\ncompose stack: images {built}, up --wait {stack.up_seconds:.0f} s")
            yield stack
    except ComposeError as exc:
        pytest.fail(str(exc))


def test_a_promoted_notebook_runs_on_the_gpu_worker_into_the_outputs_volume(
        compose_stack, tmp_path, monkeypatch, capsys):
    stack = compose_stack
    use_deployment(monkeypatch, stack.client_env(), tmp_path)
    dag_id = "compose_stack_params"
    nb = write_notebook(tmp_path / "compose_nb.ipynb", CELL, parameters="count = 1\nname = 'x'")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", dag_id,
                     "--dags-dir", str(stack.dags), "--allow-cpu", "--retries", "0"]) == 0
    capsys.readouterr()
    name = "it's \"quoted\" ü {{ x }}"
    started = time.monotonic()
    code = cli.main(["trigger", dag_id, "--dags-dir", str(stack.dags), "-p", "count", "7",
                     "-r", "name", name, "--wait", "--json", "--timeout", "300"])
    out, err = capsys.readouterr()
    seconds = time.monotonic() - started
    assert code == 0, (err, stack.logs())
    assert stack.password not in out + err
    result = json.loads(out)
    assert result["state"] == "success" and result["failure"] is None, err
    [task] = result["tasks"]
    # The task ran in the GPU worker's container, not the CPU worker's.
    assert task["hostname"] == stack.hostname("airflow-worker-gpu") != stack.hostname(
        "airflow-worker")

    # The executed notebook is in the `airgpu-outputs` volume, where the run's naming says.
    inside = Path(result["executed_notebook"])
    assert inside == executed_path(OUTPUTS, dag_id, result["run_id"], nb.name)
    on_host = stack.volume_path("airgpu-outputs") / inside.relative_to(OUTPUTS)
    assert on_host.stat().st_uid == stack.uid != 50000  # AIRFLOW_UID, not the image's user
    assert (on_host.parent / "worker.txt").read_text() == "gpu"
    assert json.loads((on_host.parent / "params.json").read_text()) == {"count": 7, "name": name}
    executed = nbformat.read(on_host, as_version=4)
    injected = [c for c in executed.cells if INJECTED_PARAMETERS_TAG in cell_tags(c)]
    assert len(injected) == 1 and "count = 7" in injected[0].source
    report = gpu_report(executed)
    assert report is not None and "running on CPU because --allow-cpu" in report["message"]
    with capsys.disabled():
        print(f"\ncompose trigger --wait: {seconds:.1f} s (stack up in {stack.up_seconds:.0f} s)")


def test_the_readme_walkthrough_airflow_dags_trigger_leads_to_a_run(compose_stack, tmp_path):
    """README: promote into dags/, then `docker compose exec airflow-apiserver airflow dags
    trigger DAG_ID`. The DAG is created unpaused and the stack rescans its DAG folder every few
    seconds, so the trigger finds the DAG shortly and its run succeeds without an unpause."""
    stack = compose_stack
    dag_id = "compose_stack_walkthrough"
    nb = write_notebook(tmp_path / "walkthrough.ipynb", CELL, parameters="count = 2\nname = 'w'")
    assert cli.main(["promote", str(nb), "--target", "compose", "--dag-id", dag_id,
                     "--dags-dir", str(stack.dags), "--allow-cpu"]) == 0
    started = time.monotonic()
    refusals: list[str] = []
    while True:
        triggered = stack.compose("exec", "-T", "airflow-apiserver", "airflow", "dags",
                                  "trigger", dag_id, check=False)
        if triggered.returncode == 0 and "queued" in triggered.stdout:
            break
        refusals.append((triggered.stdout + triggered.stderr).strip()[-300:])
        assert time.monotonic() - started < 90, refusals[-1]
        time.sleep(2)
    found = time.monotonic() - started
    client = AirflowClient(load_config(stack.client_env(), start=tmp_path))
    runs = wait_for(lambda: _runs(client, dag_id), 60, "the triggered run in the REST API")
    assert len(runs) == 1
    result = watch(client, dag_id, runs[0]["run_id"], timeout=300)
    assert result.state == "success", (result.as_dict(), stack.logs())
    assert result.tasks[0]["hostname"] == stack.hostname("airflow-worker-gpu")
    print(f"walkthrough: the trigger found the new DAG after {found:.1f} s; before: {refusals}")


def _runs(client: AirflowClient, dag_id: str) -> list[dict] | None:
    try:
        return list_runs(client, dag_id) or None
    except ApiError:  # not yet in the API's view of the DAGs
        return None


def wait_for(probe, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(1)
    return found
