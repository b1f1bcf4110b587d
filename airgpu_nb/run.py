"""Execute a prepared notebook with papermill: one place for `airgpu run`, `%airgpu run` and
every DAG task, so all of them name and keep executed notebooks the same way."""

from __future__ import annotations

import datetime as dt
import keyword
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError, SpecError
from .spec import validate_parameter

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


# Deeper lists/dicts than this are refused rather than walked (no RecursionError traceback).
_MAX_DEPTH = 32


def check_run_parameters(params: Mapping[str, Any] | None,
                         where: str | None = None) -> dict[str, Any]:
    """The run's parameters as a plain dict, refused before any kernel starts unless each name is
    a plain identifier and each value has a Python literal.

    papermill pastes every NAME verbatim into the injected-parameters cell, so a name such as
    ``x=2;os.system(...);y`` (a trigger conf key, a ``-p`` name) would run as code. Values are
    rendered by papermill; only exact str/int/float/bool/None and lists/dicts of them render
    as literals that round-trip. The GPU check's own ``gpus_requested`` / ``allow_cpu`` may be
    overridden by a run, with the check's types. ``where`` names the input layer in the error.
    """
    if params is None:
        return {}
    prefix = f"{where}: " if where else ""
    if not isinstance(params, Mapping):
        raise SpecError(f"{prefix}parameters must be a mapping of names to values, not "
                        f"{type(params).__name__}")
    checked: dict[str, Any] = {}
    for name, value in params.items():
        try:
            _check_name(name)
            if name == "gpus_requested":
                if not (type(value) is int and value >= 0) and value != "all":
                    raise SpecError(f"parameter 'gpus_requested' must be a whole number >= 0 "
                                    f"or 'all', not {value!r}")
            elif name == "allow_cpu":
                if type(value) is not bool:
                    raise SpecError(f"parameter 'allow_cpu' must be True or False, not "
                                    f"{value!r}")
            else:
                _check_value(name, value, 0)
        except SpecError as exc:
            raise SpecError(f"{prefix}{exc}") from None
        checked[name] = value
    return checked


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"invalid parameter name {name!r}: it must be a Python identifier")
    if keyword.iskeyword(name):
        raise SpecError(f"invalid parameter name {name!r}: it is a Python keyword")
    if name.startswith("__"):
        raise SpecError(f"invalid parameter name {name!r}: names starting with '__' "
                        "belong to Python")


def _check_value(name: str, value: object, depth: int) -> None:
    """Exact types only: a subclass could change how papermill formats it into the cell."""
    if depth > _MAX_DEPTH:
        raise SpecError(f"parameter {name!r} is nested deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if kind is list:
        for item in value:  # type: ignore[attr-defined]
            _check_value(name, item, depth + 1)
    elif kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise SpecError(f"parameter {name!r} has a key {key!r}: dict keys must be "
                                "strings")
            _check_value(name, item, depth + 1)
    elif value is None or kind in (str, int, float, bool):
        validate_parameter(name, value)
    else:
        raise SpecError(f"parameter {name!r} must be a string, number, boolean, None, or a "
                        f"list or dict of those, not {kind.__name__}")


def check_output_path(output: str | os.PathLike[str],
                      *sources: str | os.PathLike[str]) -> Path:
    """Refuse, before any kernel starts, an output papermill would write badly: the source
    notebook itself (also through a symlink), a folder, a path under a regular file, or a
    name that is not ``.ipynb``."""
    path = Path(output).expanduser()
    if path.suffix != ".ipynb":
        raise SpecError(f"output {str(output)!r} must be a notebook path ending in .ipynb")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise SpecError(f"output {str(output)!r} cannot be resolved: {exc}") from None
    for source in sources:
        source_path = Path(source).expanduser()
        try:
            same = resolved == source_path.resolve()
        except (OSError, RuntimeError):
            same = False
        if not same and path.exists() and source_path.exists():
            same = os.path.samefile(path, source_path)  # a hard link
        if same:
            raise SpecError(f"output {str(output)!r} is the notebook being run; give another "
                            "path so the source stays untouched")
    if path.is_dir():
        raise SpecError(f"output {str(output)!r} is a directory; give the executed notebook's "
                        "file path (NAME.ipynb)")
    if path.exists() and not path.is_file():
        raise SpecError(f"output {str(output)!r} exists and is not a regular file")
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpecError(f"output {str(output)!r} lies under {str(parent)!r}, which is "
                                "a file, not a directory")
            break
    return path


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
            labels: Mapping[str, str] | None = None,
            seed: Sequence[tuple[str, Path]] | None = None) -> RunOutcome:
    """Run ``prepared`` into ``output_path``; files the notebook writes (models, metrics) land
    beside the executed notebook.

    A notebook that carries files (the bundle its prepared copy names, or ``seed``: relative
    path and source pairs) runs in a fresh working directory seeded with them, and what it
    writes there is moved beside the executed notebook; otherwise the executed notebook's
    folder is the kernel's working directory.

    Bad parameters or a bad output path raise ``SpecError`` before any kernel starts. A failing
    cell, a dead kernel or a timeout raises ``RunError`` after papermill has saved the executed
    notebook with the error marked.

    With telemetry, ``<notebook>.prom`` is written beside the executed notebook (and pushed
    when $AIRGPU_PUSHGATEWAY_URL is set), failed runs included; ``labels`` (dag, task, run)
    default to the promoted DAG id, ``run_notebook`` and the output folder's name.
    """
    parameters = check_run_parameters(parameters)
    output_path = check_output_path(output_path, prepared)
    from .workdir import seed_files, working_directory

    seed = seed_files(prepared) if seed is None else seed

    import papermill

    from .engine import atomic_local_writes

    atomic_local_writes()  # also when telemetry is off: a kill never leaves torn JSON
    from papermill.exceptions import PapermillExecutionError

    output_path.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine_name(telemetry)
    sink: dict[str, Any] = {}
    engine_kwargs = {"airgpu_telemetry": sink} if engine == "airgpu" else {}
    try:
        with working_directory(output_path.parent, seed) as cwd:
            papermill.execute_notebook(
                str(prepared), str(output_path), parameters=parameters,
                kernel_name=kernel, progress_bar=progress_bar, log_output=log_output,
                cwd=str(cwd), execution_timeout=cell_timeout,
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


def run_notebook(notebook: str | os.PathLike[str],
                 parameters: Mapping[str, Any] | None = None, *,
                 output: str | os.PathLike[str] | None = None, allow_cpu: bool | None = None,
                 progress_bar: bool = True) -> Path:
    """Prepare ``notebook`` (GPU check included) and execute it with papermill exactly as its
    DAG task would; return the executed notebook's path. ``RunError`` if a cell fails;
    ``SpecError`` for bad parameters or output, before anything is read or run."""
    parameters = check_run_parameters(parameters)
    if output:
        output = check_output_path(output, notebook)

    from .airflow_task import default_output_dir
    from .notebook import notebook_bytes
    from .promote import promote
    from .workdir import seed_files

    result = promote(notebook, allow_cpu=allow_cpu)
    spec = result.spec
    target = Path(output) if output else executed_path(
        resolve_output_dir(spec.output_dir, Path.cwd(), default_output_dir()), spec.dag_id,
        local_run_id(), spec.notebook_name)
    merged = {**spec.params, **parameters}
    with tempfile.TemporaryDirectory(prefix="airgpu-run-") as tmp:
        prepared = Path(tmp) / result.notebook_file.name
        prepared.write_bytes(notebook_bytes(result.notebook))
        # The source's own files; a prepared copy (promoted earlier) brings its bundle.
        seed = result.bundle.seed() if result.bundle and result.bundle.files else None
        execute(prepared, target, merged, kernel=spec.kernel, progress_bar=progress_bar,
                telemetry=spec.telemetry, seed=seed if seed else seed_files(notebook))
    return target


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
    from papermill.exceptions import PapermillException

    try:
        papermill_engines.get_engine("airgpu")
    except PapermillException:  # airgpu-nb's entry point is not installed
        return None
    return "airgpu"


def _first(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
