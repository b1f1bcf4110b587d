"""Execute a prepared notebook with papermill: one place for `airgpu run`, `%airgpu run` and
every DAG task, so all of them name and keep executed notebooks the same way."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError

OUTPUT_ENV = "AIRGPU_OUTPUT_DIR"


def safe_name(text: str) -> str:
    """A run id made safe as one path component ('manual__2026-01-01T00:00:00+00:00' ...)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip(".")
    return cleaned[:200] or "run"


def resolve_output_dir(configured: str | None, base_dir: str | os.PathLike[str],
                       default: str | os.PathLike[str]) -> Path:
    """Where executed notebooks go: $AIRGPU_OUTPUT_DIR, else the promoted setting (relative to
    ``base_dir``), else ``default``. Operators of a deployment set the variable; it wins."""
    chosen = os.environ.get(OUTPUT_ENV) or configured
    if not chosen:
        return Path(default)
    path = Path(chosen).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def executed_path(output_dir: Path, dag_id: str, run_id: str, notebook_name: str,
                  try_number: int = 1) -> Path:
    """OUTPUT_DIR/<dag_id>/<run id>/<notebook>.ipynb; a retry gets <notebook>.try-N.ipynb so the
    failed attempt's notebook is never overwritten."""
    stem = Path(notebook_name).stem
    name = f"{stem}.ipynb" if try_number <= 1 else f"{stem}.try-{try_number}.ipynb"
    return output_dir / safe_name(dag_id) / safe_name(run_id) / name


def local_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return "local__" + now.strftime("%Y-%m-%dT%H-%M-%S.%fZ")


@dataclass(frozen=True)
class RunOutcome:
    """A finished run (a failed one raises ``RunError`` instead)."""

    output_path: Path
    #: The run's telemetry summary (small: fit for an XCom), None when telemetry was off.
    telemetry: dict | None = None


def execute(prepared: str | os.PathLike[str], output_path: str | os.PathLike[str],
            parameters: Mapping[str, Any] | None = None, *, kernel: str | None = None,
            progress_bar: bool = False, log_output: bool = False, telemetry: bool = True,
            cell_timeout: int | None = None,
            labels: Mapping[str, str] | None = None) -> RunOutcome:
    """Run ``prepared`` into ``output_path``; its folder becomes the kernel's working directory so
    files the notebook writes (models, metrics) land beside the executed notebook.

    A failing cell, a dead kernel or a timeout raises ``RunError`` after papermill has saved the
    executed notebook with the error marked.

    With telemetry, ``<notebook>.prom`` is written beside the executed notebook (and pushed
    when $AIRGPU_PUSHGATEWAY_URL is set), failed runs included; ``labels`` (dag, task, run)
    default to the promoted DAG id, ``run_notebook`` and the output folder's name.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine_name(telemetry)
    sink: dict[str, Any] = {}
    engine_kwargs = {"airgpu_telemetry": sink} if engine == "airgpu" else {}
    try:
        papermill.execute_notebook(
            str(prepared), str(output_path), parameters=dict(parameters or {}),
            kernel_name=kernel, progress_bar=progress_bar, log_output=log_output,
            cwd=str(output_path.parent), execution_timeout=cell_timeout,
            engine_name=engine, **engine_kwargs,
        )
    except PapermillExecutionError as exc:
        raise RunError(
            f"cell {exc.exec_count} raised {exc.ename}: {_first(exc.evalue)} "
            f"(executed notebook: {output_path})", str(output_path)) from None
    except Exception as exc:  # dead kernel, timeout, kernel not found...
        kind = type(exc).__name__
        raise RunError(f"notebook run failed ({kind}: {_first(str(exc))}); executed notebook: "
                       f"{output_path}", str(output_path)) from exc
    finally:
        summary = _publish_telemetry(sink, output_path, labels)
    return RunOutcome(output_path, telemetry=summary)


def _publish_telemetry(sink: Mapping[str, Any], output_path: Path,
                       labels: Mapping[str, str] | None) -> dict | None:
    """Metrics for the run the engine recorded into ``sink``; its summary for the XCom."""
    telemetry = sink.get("telemetry")
    if not telemetry:
        return None
    from .metrics import publish

    dag_id = (sink.get("settings") or {}).get("dag_id") or output_path.stem
    publish(telemetry, output_path, {"dag": str(dag_id), "task": "run_notebook",
                                     "run": output_path.parent.name, **dict(labels or {})})
    return dict(telemetry["summary"])


def _engine_name(telemetry: bool) -> str | None:
    """The telemetry engine when it is installed and wanted; papermill's default otherwise."""
    if not telemetry:
        return None
    from papermill.engines import papermill_engines

    return "airgpu" if "airgpu" in papermill_engines._engines else None


def _first(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
