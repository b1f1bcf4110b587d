"""The body of every generated DAG's notebook task (imported lazily, inside the task).

Keeping it here rather than in the DAG file keeps DAG files small and cheap to parse, and lets
``airgpu run`` share the exact output naming."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .run import execute, executed_path, resolve_output_dir

log = logging.getLogger(__name__)


def default_output_dir() -> Path:
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "airgpu-outputs"


def run_notebook_task(dag_file: str, config: dict[str, Any], context: dict[str, Any]) -> dict:
    """Run the prepared notebook beside ``dag_file`` for this task instance."""
    dag_dir = Path(dag_file).resolve().parent
    ti = context["ti"]
    output_dir = resolve_output_dir(config.get("output_dir"), dag_dir, default_output_dir())
    output = executed_path(output_dir, config["dag_id"], context["run_id"], config["name"],
                           getattr(ti, "try_number", 1) or 1)
    parameters = dict(context.get("params") or {})
    log.info("airgpu: running %s -> %s with %s", config["prepared"], output, parameters)
    labels = {"dag": config["dag_id"], "task": str(getattr(ti, "task_id", "run_notebook")),
              "run": str(context["run_id"])}
    outcome = execute(dag_dir / config["prepared"], output, parameters, kernel=config["kernel"],
                      log_output=True, telemetry=config.get("telemetry", True), labels=labels)
    # The XCom stays small: the run's summary, not its timeline (that is in the notebook).
    return {"executed_notebook": str(outcome.output_path), "ok": True,
            "telemetry": outcome.telemetry}
