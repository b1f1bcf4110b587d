"""The body of every generated DAG's notebook task (imported lazily, inside the task).

Keeping it here rather than in the DAG file keeps DAG files small and cheap to parse, and lets
``airgpu run`` share the exact output naming."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import SpecError
from .run import check_run_parameters, execute, executed_path, resolve_output_dir

log = logging.getLogger(__name__)


def default_output_dir() -> Path:
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "airgpu-outputs"


def run_notebook_task(dag_file: str, config: dict[str, Any], context: dict[str, Any]) -> dict:
    """Run the prepared notebook beside ``dag_file`` for this task instance.

    The task's params (the DAG's, overridden by the trigger's ``conf``) are checked before any
    kernel starts; a bad one fails the task for good (no retry runs a hostile conf again).
    """
    parameters = _checked_params(context.get("params"))
    dag_dir = Path(dag_file).resolve().parent
    ti = context["ti"]
    output_dir = resolve_output_dir(config.get("output_dir"), dag_dir, default_output_dir())
    output = executed_path(output_dir, config["dag_id"], context["run_id"], config["name"],
                           getattr(ti, "try_number", 1) or 1)
    log.info("airgpu: running %s -> %s with %s", config["prepared"], output, parameters)
    labels = {"dag": config["dag_id"], "task": str(getattr(ti, "task_id", "run_notebook")),
              "run": str(context["run_id"])}
    outcome = execute(dag_dir / config["prepared"], output, parameters, kernel=config["kernel"],
                      log_output=True, telemetry=config.get("telemetry", True), labels=labels)
    # The XCom stays small: the run's summary, not its timeline (that is in the notebook).
    return {"executed_notebook": str(outcome.output_path), "ok": True,
            "telemetry": outcome.telemetry}


def _checked_params(params: Any) -> dict[str, Any]:
    """Plain, checked parameter values; ``AirflowFailException`` naming the bad key if not."""
    if params is not None and hasattr(params, "dump"):  # an Airflow ParamsDict
        params = params.dump()
    try:
        return check_run_parameters(params, "DAG params / trigger conf")
    except SpecError as exc:
        try:
            from airflow.sdk.exceptions import AirflowFailException
        except ImportError:  # pragma: no cover - Airflow 2
            from airflow.exceptions import AirflowFailException
        log.error("airgpu: refusing to run the notebook: %s", exc)
        raise AirflowFailException(f"airgpu: {exc}") from None
