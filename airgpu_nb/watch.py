"""Trigger and watch runs of a promoted DAG on an Airflow 3 deployment, through its REST API.

    trigger()  one run with typed params (the trigger's ``conf``)
    watch()    queued -> running -> success/failed, with durations and try numbers; at the end
               the XCom the task returned (executed notebook, telemetry summary) or, for a
               failed run, the failing cell from the task log, and the run's URL in the UI

Progress goes to ``echo`` (one line per change); nothing here knows about screens.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .airflow_api import AirflowClient, ApiError
from .deploy import DEFAULT_PARSE_TIMEOUT_S, DeployTimeout, Echo, deploy, timestamp
from .errors import RunError

ENDED = frozenset({"success", "failed"})
#: airgpu's RunError lines (airgpu_nb.run.execute): what failed, then where the notebook is.
_CELL_FAILED = re.compile(r"(cell \d+ raised [^\n]*?) \(executed notebook: [^)\n]*\.ipynb\)"
                          r"|(notebook run failed \([^\n]*?\)); executed notebook: ")
_EXECUTED = re.compile(r"executed notebook: ([^\s;()]+\.ipynb)")
_RUNNING_TO = re.compile(r"airgpu: running \S+ -> ([^\s]+\.ipynb)")


@dataclass
class RunResult:
    """A run as it ended (or as far as it got)."""

    dag_id: str
    run_id: str
    state: str
    url: str
    duration_s: float | None = None
    queued_s: float | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None  # what the notebook task returned (its XCom)
    executed_notebook: str | None = None
    failure: str | None = None
    conf: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "success"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- trigger and watch ----------------------------------------------------------------------------

def ensure_registered(client: AirflowClient, dag_id: str, echo: Echo | None = None) -> None:
    """For a DAG without a file here: it must exist on the deployment; unpause it (a triggered
    run of a paused DAG stays queued forever)."""
    dag = client.dag(dag_id)
    if dag is None:
        raise ApiError(f"the deployment at {client.config.shown_url} has no DAG {dag_id!r} "
                       "(promote it, wait for its dag-processor, check the DAG id)", 404)
    if dag.get("is_paused"):
        client.set_paused(dag_id, False)
        if echo:
            echo(f"unpaused {dag_id} (a run of a paused DAG would stay queued)")


def trigger(client: AirflowClient, dag_id: str, params: Mapping[str, Any] | None = None,
            run_id: str | None = None) -> dict[str, Any]:
    """Start a run with ``params`` as its ``conf`` (checked like every run's parameters: names
    are identifiers, values JSON-typed literals); the DAG run as the API answered it."""
    from .run import check_run_parameters
    from .spec import validate_dag_id

    validate_dag_id(dag_id)
    conf = check_run_parameters(params or {}, "trigger parameters")
    if client.dag(dag_id) is None:
        raise ApiError(f"the deployment at {client.config.shown_url} has no DAG {dag_id!r}",
                       404)
    return client.trigger(dag_id, conf, run_id)


def start_run(client: AirflowClient, dag_id: str, params: Mapping[str, Any] | None = None, *,
              dag_file: str | os.PathLike[str] | None = None,
              timeout: float = DEFAULT_PARSE_TIMEOUT_S, run_id: str | None = None,
              echo: Echo | None = None) -> dict[str, Any]:
    """`airgpu trigger`: deploy ``dag_file`` when it exists here (else the DAG must already be
    on the deployment), unpause, then start a run with ``params``; the run as the API answered.
    """
    from .run import check_run_parameters

    say = echo or (lambda _line: None)
    check_run_parameters(params or {}, "trigger parameters")  # before waiting for anything
    if dag_file is not None and Path(dag_file).is_file():
        done = deploy(client, dag_id, dag_file, timeout=timeout, echo=say)
        if done.paused:
            client.set_paused(dag_id, False)
            say(f"unpaused {dag_id} (a run of a paused DAG would stay queued)")
    else:
        ensure_registered(client, dag_id, say)
    run = trigger(client, dag_id, params, run_id)
    say(f"triggered {run['dag_run_id']}: {client.ui_url(dag_id, str(run['dag_run_id']))}")
    return run


def start_and_follow(client: AirflowClient, dag_id: str, params: Mapping[str, Any] | None, *,
                     dags_dir: str | os.PathLike[str] | None = None,
                     timeout: float | None = None, run_id: str | None = None,
                     wait: bool = False, echo: Echo | None = None
                     ) -> tuple[dict[str, Any], RunResult | None]:
    """`airgpu trigger` and `%airgpu trigger`: :func:`start_run` for ``DAGS_DIR/<dag_id>.py``,
    then, with ``wait``, :func:`watch` the run. The run as the API answered, and how it ended
    (None without ``wait``)."""
    from .deploy import dag_file_for

    run = start_run(client, dag_id, params, dag_file=dag_file_for(dag_id, dags_dir),
                    timeout=timeout or DEFAULT_PARSE_TIMEOUT_S, run_id=run_id, echo=echo)
    if not wait:
        return run, None
    return run, watch(client, dag_id, str(run["dag_run_id"]), echo=echo)


def watch(client: AirflowClient, dag_id: str, run_id: str, *, poll: float = 1.0,
          timeout: float | None = None, echo: Echo | None = None) -> RunResult:
    """Follow a run until it ends; one line per change of the run's or a task's state."""
    say = echo or (lambda _line: None)
    started = time.monotonic()
    seen: dict[str, tuple[Any, ...]] = {}
    while True:
        run = client.dag_run(dag_id, run_id)
        tasks = client.task_instances(dag_id, run_id)
        state = str(run.get("state"))
        if seen.get("") != (state,):
            seen[""] = (state,)
            say(f"run {run_id}: {state}{_run_timing(run)}")
        for ti in tasks:
            key = (ti.get("state"), ti.get("try_number"))
            if seen.get(ti["task_id"]) != key:
                seen[ti["task_id"]] = key
                say(f"  task {ti['task_id']}: {ti.get('state') or 'none'}{_task_detail(ti)}")
        if state in ENDED:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            raise DeployTimeout(f"run {run_id} of {dag_id} is still {state} after "
                                f"{timeout:.0f} s; it goes on in Airflow: airgpu runs {dag_id}")
        time.sleep(poll)
    return _result(client, dag_id, run, tasks)


def _result(client: AirflowClient, dag_id: str, run: Mapping[str, Any],
            tasks: list[dict[str, Any]]) -> RunResult:
    run_id = str(run["dag_run_id"])
    result = RunResult(
        dag_id=dag_id, run_id=run_id, state=str(run.get("state")),
        url=client.ui_url(dag_id, run_id), duration_s=_number(run.get("duration")),
        queued_s=_seconds_between(run.get("queued_at"), run.get("start_date")),
        tasks=[{k: ti.get(k) for k in ("task_id", "state", "try_number", "max_tries",
                                       "duration", "hostname")} for ti in tasks],
        conf=dict(run.get("conf") or {}))
    for ti in tasks:
        if ti.get("state") == "success":
            value = client.xcom(dag_id, run_id, ti["task_id"])
            if value is not None and result.result is None:
                result.result = value
                if isinstance(value, dict) and value.get("executed_notebook"):
                    result.executed_notebook = str(value["executed_notebook"])
    if not result.ok:
        for ti in tasks:
            if ti.get("state") in ("failed", "upstream_failed") and ti.get("try_number"):
                log = client.task_log(dag_id, run_id, ti["task_id"], int(ti["try_number"]))
                failure, executed = failure_from_log(log)
                result.failure = result.failure or (f"task {ti['task_id']}: {failure}"
                                                    if failure else None)
                result.executed_notebook = result.executed_notebook or executed
        if result.failure is None:
            failed = [ti["task_id"] for ti in tasks if ti.get("state") == "failed"]
            result.failure = (f"task {', '.join(failed)} failed (see its log)" if failed
                              else f"the run ended {result.state}")
    return result


def failure_from_log(log: str) -> tuple[str | None, str | None]:
    """The failing cell (airgpu's ``RunError`` line) and the executed notebook's path, from a
    task log."""
    failure = None
    for match in _CELL_FAILED.finditer(log):
        failure = (match.group(1) or match.group(2)).strip()
    executed = None
    for pattern in (_EXECUTED, _RUNNING_TO):
        for match in pattern.finditer(log):
            executed = match.group(1)
        if executed:
            break
    if failure is None:
        refused = re.findall(r"airgpu: refusing to run the notebook: ([^\n]+)", log)
        failure = refused[-1].strip() if refused else None
    return failure, executed


def raise_for(result: RunResult) -> RunResult:
    """A failed run is a ``RunError`` (exit 1) naming the failing cell and the notebook."""
    if result.ok:
        return result
    where = f" (executed notebook: {result.executed_notebook})" if result.executed_notebook else ""
    raise RunError(f"run {result.run_id} of {result.dag_id} {result.state}: {result.failure}"
                   f"{where}; {result.url}", result.executed_notebook)


def render_result(result: RunResult) -> list[str]:
    """The end of a watched run, as lines for a terminal."""
    lines = [f"{result.state}: run {result.run_id} of {result.dag_id}"
             + (f" in {result.duration_s:.1f} s" if result.duration_s is not None else "")
             + (f" (queued {result.queued_s:.1f} s)" if result.queued_s is not None else "")]
    if result.executed_notebook:
        lines.append(f"executed notebook: {result.executed_notebook}")
    telemetry = result.result.get("telemetry") if isinstance(result.result, dict) else None
    if isinstance(telemetry, dict):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(telemetry.items())
                          if v is not None and not isinstance(v, (dict, list)))
        lines.append(f"telemetry: {shown or 'no samples'}")
    if result.failure and not result.ok:
        lines.append(f"failure: {result.failure}")
    lines.append(f"in the Airflow UI: {result.url}")
    return lines


def _run_timing(run: Mapping[str, Any]) -> str:
    state = run.get("state")
    if state == "running":
        queued = _seconds_between(run.get("queued_at"), run.get("start_date"))
        return f" (after {queued:.1f} s queued)" if queued is not None else ""
    if state in ENDED and _number(run.get("duration")) is not None:
        return f" in {float(run['duration']):.1f} s"
    return ""


def _task_detail(ti: Mapping[str, Any]) -> str:
    parts = []
    if ti.get("try_number"):
        parts.append(f"try {ti['try_number']} of {int(ti.get('max_tries') or 0) + 1}")
    if ti.get("state") in ("success", "failed", "up_for_retry") and _number(ti.get("duration")):
        parts.append(f"{float(ti['duration']):.1f} s")
    if ti.get("hostname") and ti.get("state") == "running":
        parts.append(f"on {ti['hostname']}")
    return f" ({', '.join(parts)})" if parts else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _seconds_between(start: Any, end: Any) -> float | None:
    a, b = timestamp(start), timestamp(end)
    return round(b - a, 3) if a is not None and b is not None else None


# -- runs -----------------------------------------------------------------------------------------

def list_runs(client: AirflowClient, dag_id: str, limit: int = 10) -> list[dict[str, Any]]:
    """The DAG's latest runs, newest first, each with its UI URL."""
    from .spec import validate_dag_id

    validate_dag_id(dag_id)
    if client.dag(dag_id) is None:
        raise ApiError(f"the deployment at {client.config.shown_url} has no DAG {dag_id!r}",
                       404)
    runs = []
    for run in client.dag_runs(dag_id, limit):
        run_id = str(run.get("dag_run_id"))
        runs.append({"run_id": run_id, "state": run.get("state"),
                     "run_type": run.get("run_type"), "queued_at": run.get("queued_at"),
                     "start_date": run.get("start_date"), "end_date": run.get("end_date"),
                     "duration_s": _number(run.get("duration")),
                     "conf": run.get("conf") or {}, "url": client.ui_url(dag_id, run_id)})
    return runs


def render_runs(dag_id: str, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return f"{dag_id}: no runs yet (airgpu trigger {dag_id})"
    rows = [("RUN ID", "STATE", "STARTED", "DURATION")]
    for run in runs:
        started = str(run.get("start_date") or "-")[:19].replace("T", " ")
        duration = f"{run['duration_s']:.1f} s" if run.get("duration_s") is not None else "-"
        rows.append((run["run_id"], str(run.get("state")), started, duration))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                                row[3]]) for row in rows)
