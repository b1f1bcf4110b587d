"""The notebook run inside a container (docker and kubernetes targets).

    python -m airgpu_nb.container_run --config-json JSON --params-json JSON \\
        --run-id RUN_ID --try-number N

Every value is one argv element and parameters arrive as JSON, so strings with quotes, newlines
or unicode reach the notebook exactly (papermill's ``-p`` would re-type them). The executed
notebook is named as for the local target (``run.executed_path``); with an object-store output
it is executed locally, then uploaded, also when the run fails.

Progress goes to stderr as it happens (the DockerOperator and KubernetesPodOperator stream it
into the task log): ``cell 6/11 started`` / ``cell 6/11 done in 2.1 s``, the notebook's own
output, and a final summary line. When the docker target ran the container without its GPU
request (``--allow-cpu`` on a host without a GPU runtime, see ``docker_host``), the executed
notebook says so in a note at the top.
Exit codes: 0 done, 1 the notebook failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .docker_host import CPU_FALLBACK_ENV
from .errors import AirgpuError, SpecError
from .keys import INJECTED_PARAMETERS_TAG, METADATA_KEY, cell_tags, set_cell_id
from .run import check_run_parameters, execute, executed_path, safe_name

log = logging.getLogger("airgpu_nb.container_run")
FALLBACK_TAG = "airgpu-cpu-fallback"
_PAPERMILL_CELL = re.compile(r"^(Executing|Ending) Cell (\d+)-*$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SpecError(message)


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def output_location(output_dir: str, dag_id: str, run_id: str, name: str,
                    try_number: int) -> str:
    """Where the executed notebook goes: a path, or a URL built the same way."""
    if "://" not in output_dir:
        return str(executed_path(Path(output_dir), dag_id, run_id, name, try_number))
    relative = executed_path(Path("."), dag_id, run_id, name, try_number).as_posix()
    return f"{output_dir.rstrip('/')}/{relative}"


def run(config: dict[str, Any], params: dict[str, Any], run_id: str, try_number: int) -> str:
    """Run the prepared notebook; parameters are checked before the notebook is looked for."""
    params = check_run_parameters(params, "--params-json")
    notebook = config["notebook"]
    if "://" not in notebook and not Path(notebook).is_file():
        raise SpecError(f"prepared notebook {notebook} is not in the container: mount the DAG "
                        "folder there (--notebooks-volume) or bake it into the image")
    target = output_location(config["output_dir"], config["dag_id"], run_id, config["name"],
                             try_number)
    kwargs = {"kernel": config.get("kernel"), "log_output": True,
              "telemetry": config.get("telemetry", True)}
    fallback = os.environ.get(CPU_FALLBACK_ENV, "").strip()
    if fallback:
        log.warning("airgpu: %s", fallback)
    local_dir = None if "://" not in target else tempfile.TemporaryDirectory(prefix="airgpu-")
    local = Path(target) if local_dir is None else (
        Path(local_dir.name) / safe_name(run_id) / Path(target).name)
    progress = _CellProgress(_cell_count(notebook, params))
    logging.getLogger("papermill").addFilter(progress)
    started = time.monotonic()
    try:
        written = execute(notebook, local, params, **kwargs).output_path
    except AirgpuError as exc:
        log.error("airgpu: notebook failed after %.1f s: %s", time.monotonic() - started, exc)
        raise
    else:
        log.info("airgpu: notebook done: %d cells in %.1f s; executed notebook: %s",
                 progress.total, time.monotonic() - started,
                 target if local_dir is not None else written)
    finally:
        logging.getLogger("papermill").removeFilter(progress)
        if fallback and local.is_file():
            note_cpu_fallback(local, fallback)
        if local_dir is not None:
            if local.is_file():
                _upload(local, target)
            local_dir.cleanup()
    return target if local_dir is not None else str(written)


class _CellProgress(logging.Filter):
    """Turns papermill's ``Executing Cell 6-----`` / ``Ending Cell 6---`` log records into
    ``cell 6/11 started`` / ``cell 6/11 done in 2.1 s``."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self._started: dict[int, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = _PAPERMILL_CELL.match(str(record.msg))
        if match:
            number = int(match.group(2))
            if match.group(1) == "Executing":
                self._started[number] = time.monotonic()
                record.msg = f"cell {number}/{self.total} started"
            else:
                took = time.monotonic() - self._started.pop(number, time.monotonic())
                record.msg = f"cell {number}/{self.total} done in {took:.1f} s"
            record.args = ()
        return True


def _cell_count(notebook: str, params: dict[str, Any]) -> int:
    """Cells papermill will walk through: the notebook's, plus the parameters it injects."""
    from papermill.iorw import load_notebook_node

    try:
        nb = load_notebook_node(notebook)
    except Exception:  # the run itself reports an unreadable notebook
        return 0
    injected = any(INJECTED_PARAMETERS_TAG in cell_tags(c) for c in nb.cells)
    return len(nb.cells) + (1 if params and not injected else 0)


def note_cpu_fallback(path: Path, note: str) -> None:
    """Say at the top of the executed notebook (and in its metadata) that it ran without the
    GPU it asked for; written atomically, replacing an earlier note."""
    import nbformat

    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nb.cells = [c for c in nb.cells if FALLBACK_TAG not in cell_tags(c)]
    cell = nbformat.v4.new_markdown_cell(f"**airgpu: ran on CPU.** {note}.",
                                         metadata={"tags": [FALLBACK_TAG]})
    set_cell_id(nb, cell, FALLBACK_TAG)
    cell.metadata["papermill"] = {"status": "completed", "exception": None,
                                  "start_time": None, "end_time": None, "duration": None}
    nb.cells.insert(0, cell)
    nb.metadata.setdefault(METADATA_KEY, {})["cpu_fallback"] = note
    tmp = path.with_name(f".{path.name}.airgpu-tmp")
    tmp.write_text(nbformat.writes(nb), encoding="utf-8")
    os.replace(tmp, path)


def _upload(local: Path, url: str) -> None:
    from papermill.iorw import papermill_io

    papermill_io.write(local.read_text(encoding="utf-8"), url)
    print(f"airgpu: executed notebook uploaded to {url}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m airgpu_nb.container_run")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--params-json", default="{}")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--try-number", type=int, default=1)
    _configure_logging()
    try:
        args = parser.parse_args(argv)
        config = _json_object(args.config_json, "--config-json")
        params = _json_object(args.params_json, "--params-json")
        print(run(config, params, args.run_id, args.try_number))
        return 0
    except AirgpuError as exc:
        print(f"airgpu: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _configure_logging() -> None:
    """INFO lines on stderr, one per record, flushed as they come (papermill's cell records,
    the notebook's own output, ours); a handler someone configured already is kept."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
