"""The notebook run inside a container (docker and kubernetes targets).

    python -m airgpu_nb.container_run --config-json JSON --params-json JSON \\
        --run-id RUN_ID --try-number N

Every value is one argv element and parameters arrive as JSON, so strings with quotes, newlines
or unicode reach the notebook exactly (papermill's ``-p`` would re-type them). The executed
notebook is named as for the local target (``run.executed_path``); with an object-store output
it is executed locally, then uploaded, also when the run fails.
Exit codes: 0 done, 1 the notebook failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import AirgpuError, SpecError
from .run import check_run_parameters, execute, executed_path, safe_name


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
    if "://" not in target:
        return str(execute(notebook, target, params, **kwargs).output_path)
    with tempfile.TemporaryDirectory(prefix="airgpu-") as tmp:
        local = Path(tmp) / safe_name(run_id) / Path(target).name
        try:
            execute(notebook, local, params, **kwargs)
        finally:
            if local.is_file():
                _upload(local, target)
    return target


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
    try:
        args = parser.parse_args(argv)
        config = _json_object(args.config_json, "--config-json")
        params = _json_object(args.params_json, "--params-json")
        print(run(config, params, args.run_id, args.try_number))
        return 0
    except AirgpuError as exc:
        print(f"airgpu: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
