"""The promotion core: notebook in, (prepared notebook, DAG source) out, then one atomic write.

    notebook --read--> NotebookNode --build_spec--> PromotionSpec
    (nb, spec) --prepare--> prepared notebook     spec --render--> DAG source
    promote() = all of that in memory -> PromotionResult -> write() to disk

The CLI, the magics and the panel call :func:`promote` and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

from .errors import SpecError, WriteError
from .inject import METADATA_KEY, prepare
from .notebook import atomic_write, kernel_name, notebook_bytes, parameter_defaults, read_notebook
from .render import checksum_status, prepared_name, render_dag
from .spec import (
    GpuRequest,
    PromotionSpec,
    normalise_schedule,
    parse_gpus,
    safe_dag_id,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Settings a user may give in [tool.airgpu], in notebook metadata or as explicit options.
SETTING_NAMES = frozenset({
    "dag_id", "target", "schedule", "start_date", "catchup", "retries", "retry_delay_s",
    "execution_timeout_s", "tags", "parameters", "gpus", "mig", "allow_cpu", "kernel",
    "output_dir", "image", "telemetry", "options", "dags_dir",
})


def find_pyproject_settings(start: Path) -> dict[str, Any]:
    """``[tool.airgpu]`` of the nearest pyproject.toml at or above ``start``."""
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SpecError(f"cannot read {candidate}: {exc}") from None
            settings = data.get("tool", {}).get("airgpu", {})
            _check_names(settings, f"[tool.airgpu] in {candidate}")
            return dict(settings)
    return {}


def _check_names(settings: Mapping[str, Any], where: str) -> None:
    unknown = set(settings) - SETTING_NAMES
    if unknown:
        raise SpecError(f"unknown setting(s) {', '.join(sorted(unknown))} in {where}; valid: "
                        f"{', '.join(sorted(SETTING_NAMES))}")


def merged_settings(nb: NotebookNode, notebook_path: Path,
                    explicit: Mapping[str, Any]) -> dict[str, Any]:
    """defaults < [tool.airgpu] < the notebook's metadata.airgpu < explicit options."""
    _check_names(explicit, "options")
    recorded = nb.metadata.get(METADATA_KEY, {})
    recorded = recorded.get("settings", recorded) if isinstance(recorded, Mapping) else {}
    _check_names(recorded, f"metadata.{METADATA_KEY} of {notebook_path.name}")
    layers = [find_pyproject_settings(notebook_path.resolve().parent), dict(recorded),
              {k: v for k, v in explicit.items() if v is not None}]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("parameters", "options"):
                merged[key] = {**merged.get(key, {}), **dict(value or {})}
            else:
                merged[key] = value
    return merged


def build_spec(nb: NotebookNode, notebook_path: str | os.PathLike[str],
               explicit: Mapping[str, Any] | None = None) -> PromotionSpec:
    """A validated spec from the notebook and the layered settings."""
    path = Path(notebook_path)
    return spec_from_settings(nb, path, merged_settings(nb, path, explicit or {}))


def spec_from_settings(nb: NotebookNode, path: Path, s: Mapping[str, Any]) -> PromotionSpec:
    parameters = {k: v for k, v in parameter_defaults(nb).items()
                  if v is None or isinstance(v, (str, int, float, bool))}
    parameters.update(s.get("parameters", {}))
    tags = s.get("tags", ["airgpu"])
    if isinstance(tags, str):
        tags = [tags]
    gpu = GpuRequest(count=parse_gpus(s.get("gpus", 1)), mig=s.get("mig"))
    fields: dict[str, Any] = {
        "dag_id": s.get("dag_id") or safe_dag_id(path.stem),
        "notebook_name": path.name,
        "source": _display_path(path),
        "target": s.get("target", "local"),
        "schedule": normalise_schedule(s.get("schedule")),
        "tags": tuple(tags),
        "parameters": tuple(parameters.items()),
        "gpu": gpu,
        "allow_cpu": bool(s.get("allow_cpu", False)),
        "kernel": s.get("kernel") or kernel_name(nb),
        "output_dir": s.get("output_dir"),
        "image": s.get("image"),
        "telemetry": bool(s.get("telemetry", True)),
        "options": tuple(sorted((s.get("options") or {}).items())),
    }
    for name in ("start_date", "catchup", "retries", "retry_delay_s", "execution_timeout_s"):
        if name in s:
            fields[name] = s[name]
    spec = PromotionSpec(**fields)
    from .targets import get_target

    get_target(spec.target).validate(spec)
    return spec


def _display_path(path: Path) -> str:
    """The notebook path for documentation: relative to the working directory when inside it,
    so generated files carry no machine-specific paths."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


@dataclass(frozen=True)
class PromotionResult:
    """A promotion computed in memory; :meth:`write` puts it on disk."""

    spec: PromotionSpec
    source_path: Path
    dags_dir: Path
    notebook: NotebookNode
    dag_source: str

    @property
    def dag_file(self) -> Path:
        return self.dags_dir / f"{self.spec.dag_id}.py"

    @property
    def notebook_file(self) -> Path:
        return self.dags_dir / prepared_name(self.spec)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dag_id": self.spec.dag_id,
            "dag_file": str(self.dag_file),
            "notebook": str(self.notebook_file),
            "target": self.spec.target,
            "source": str(self.source_path),
            "schedule": self.spec.schedule,
            "gpus": self.spec.gpu.count,
            "mig": self.spec.gpu.mig,
            "allow_cpu": self.spec.allow_cpu,
            "parameters": self.spec.params,
            "trigger": f"airflow dags trigger {self.spec.dag_id}",
            "test": f"airflow dags test {self.spec.dag_id}",
        }

    def write(self, force: bool = False) -> PromotionResult:
        """Write the prepared notebook, then the DAG, each atomically, under a lock on the dags dir.

        The notebook goes first so the scheduler never sees a DAG whose notebook is missing. A
        DAG file that was edited by hand since it was generated is kept unless ``force``.
        """
        _ensure_writable_dir(self.dags_dir)
        if self.notebook_file.resolve() == self.source_path.resolve():
            raise WriteError(f"the prepared copy would overwrite the source notebook "
                             f"{self.source_path}; choose another --dag-id or --dags-dir")
        with _lock(self.dags_dir):
            if self.dag_file.exists() and not force:
                state = checksum_status(self.dag_file.read_text(encoding="utf-8"))
                if state is False:
                    raise WriteError(f"{self.dag_file} was edited by hand since it was "
                                     "generated; use --force to overwrite it")
                if state is None:
                    raise WriteError(f"{self.dag_file} exists and was not generated by "
                                     "airgpu-nb; use --force to overwrite it")
            try:
                atomic_write(self.notebook_file, notebook_bytes(self.notebook))
                atomic_write(self.dag_file, self.dag_source)
            except PermissionError as exc:
                raise WriteError(f"cannot write to {self.dags_dir}: {exc.strerror}") from None
        return self


def _ensure_writable_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"dags dir {folder} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create dags dir {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"dags dir {folder} is not writable")


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Serialise promotions into one dags dir (flock on the directory: no lock file is left
    behind for the DAG processor to see)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise WriteError(f"cannot open dags dir {folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def default_dags_dir() -> Path:
    return Path(os.environ.get("AIRGPU_DAGS_DIR") or "dags")


def promote(notebook_path: str | os.PathLike[str], *,
            dags_dir: str | os.PathLike[str] | None = None, **options: Any) -> PromotionResult:
    """Promote a notebook in memory. ``options`` are explicit settings (see ``SETTING_NAMES``);
    ``None`` values mean "not given". Call ``.write()`` on the result to put it on disk."""
    path = Path(notebook_path)
    nb = read_notebook(path)
    settings = merged_settings(nb, path, options)
    spec = spec_from_settings(nb, path, settings)
    folder = Path(dags_dir or settings.get("dags_dir") or default_dags_dir())
    prepared = prepare(nb, spec)
    return PromotionResult(spec, path, folder, prepared, render_dag(spec))
