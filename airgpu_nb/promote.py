"""The promotion core: notebook in, (prepared notebook, DAG source) out, then one atomic write.

    notebook --read--> NotebookNode --layers (settings table)--> PromotionSpec
    (nb, spec) --prepare--> prepared notebook     spec --render--> DAG source
    promote() = all of that in memory -> PromotionResult -> write() to disk

The CLI, the magics and the panel call :func:`promote` and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

from . import settings as table
from .bundle import Bundle, installing, plan
from .errors import SpecError, WriteError
from .inject import prepare
from .keys import DEPLOYMENT_FILE_KEYS, DEPLOYMENT_SECRET_KEYS, METADATA_KEY
from .notebook import (
    kernel_name,
    notebook_bytes,
    parameters_cell,
    read_notebook,
    read_text_file,
)
from .render import prepared_name, render_dag
from .spec import GpuRequest, PromotionSpec, safe_dag_id
from .writes import (
    dags_dir_lock,
    ensure_writable_dir,
    notebook_checksum,
    refuse_foreign_dag,
    refuse_foreign_notebook,
    stage_file,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DAGS_DIR_ENV = "AIRGPU_DAGS_DIR"
#: Keys a notebook's ``metadata.airgpu`` holds besides settings (written by promote and runs).
_NOT_SETTINGS = frozenset({"generated_by", "source_notebook", "telemetry", "checksum",
                           "settings", "notes", "packages", "bundle"})
_CONTAINER_TARGETS = frozenset({"docker", "kubernetes"})


# -- layers ---------------------------------------------------------------------------------------

def find_pyproject_settings(start: Path) -> dict[str, Any]:
    """``[tool.airgpu]`` of the nearest pyproject.toml at or above ``start``, type-checked."""
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            shown = _display_path(candidate)
            text = read_text_file(candidate, "pyproject.toml", 4 * 2**20, SpecError)
            try:
                data = tomllib.loads(text)
            except (tomllib.TOMLDecodeError, RecursionError) as exc:
                raise SpecError(f"cannot read {shown}: {_one_line(exc)}") from None
            tool = data.get("tool", {})
            if not isinstance(tool, Mapping):
                raise SpecError(f"{shown} [tool]: expected a table, got {tool!r}"[:200])
            own = tool.get("airgpu", {})
            if isinstance(own, Mapping):  # the deployment's keys are the API client's
                own = {k: v for k, v in own.items()
                       if k not in DEPLOYMENT_FILE_KEYS | DEPLOYMENT_SECRET_KEYS}
            return table.parse_layer(own, f"{shown} [tool.airgpu]")
    return {}


def notebook_settings(nb: NotebookNode, path: Path) -> dict[str, Any]:
    """The settings a notebook's ``metadata.airgpu`` records (a prepared copy records those it
    was made with), type-checked. A notebook never chooses where files are written."""
    namespace = nb.metadata.get(METADATA_KEY)
    if namespace is None:
        return {}
    layer = f"{path.name} metadata.{METADATA_KEY}"
    if not isinstance(namespace, Mapping):
        raise SpecError(f"{layer}: expected a table of settings, got {namespace!r}"[:200])
    if "settings" in namespace:
        return table.parse_layer(namespace["settings"], f"{layer}.settings", from_notebook=True)
    own = {k: v for k, v in namespace.items() if k not in _NOT_SETTINGS}
    return table.parse_layer(own, layer, from_notebook=True)


def layered_settings(nb: NotebookNode, path: Path,
                     explicit: Mapping[str, Any]) -> dict[str, Any]:
    """defaults < [tool.airgpu] < the notebook's metadata.airgpu < explicit options.

    A file layer is shared by many notebooks, so what it says that the chosen target cannot use
    is left out; an explicit option the target cannot use is an error.
    """
    given = table.parse_layer({k: v for k, v in explicit.items() if v is not None}, "option")
    files = [find_pyproject_settings(path.resolve().parent), notebook_settings(nb, path)]
    target = table.merge(*files, given).get("target", "local")
    table.row("target").parse(target, "target")
    table.check_targets(given, target)
    return table.merge(*(table.applicable(layer, target) for layer in files), given)


def spec_from_settings(nb: NotebookNode, path: Path, s: Mapping[str, Any]) -> PromotionSpec:
    """A validated spec from layered settings (and the parameters cell's literal defaults)."""
    defaults = {k: v for k, v in parameters_cell(nb).defaults.items()
                if v is None or isinstance(v, (str, int, float, bool))}
    fields: dict[str, Any] = {
        "dag_id": s.get("dag_id") or safe_dag_id(path.stem),
        "notebook_name": path.name,
        "source": _display_path(path),
        "parameters": tuple({**defaults, **s.get("parameters", {})}.items()),
        "gpu": GpuRequest(count=s.get("gpus", 1), mig=s.get("mig")),
        "kernel": s.get("kernel") or kernel_name(nb),
        "options": tuple(sorted((k, _frozen(v)) for k, v in s.items()
                                if k in table.OPTION_NAMES)),
    }
    for row in table.SETTINGS:
        if row.in_spec and not row.option and row.name not in fields and row.name not in (
                "gpus", "mig") and row.name in s:
            fields[row.name] = tuple(s[row.name]) if row.repeat else s[row.name]
    return PromotionSpec(**fields)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# -- checks that need the notebook and this machine -----------------------------------------------

def check_parameters(nb: NotebookNode, path: Path, given: Mapping[str, Any],
                     allow_new: bool) -> None:
    """Parameters must land somewhere: a ``parameters`` cell that parses and sets each name
    (papermill would otherwise inject them and warn only at run time)."""
    cell = parameters_cell(nb)
    if cell.error is not None:
        raise SpecError(f"the parameters cell of {path.name} (cell {cell.index + 1}) does not "
                        f"parse ({cell.error}); fix it so papermill can override it")
    if not given or allow_new:
        return
    names = ", ".join(f"-p {n}" for n in given)
    if cell.index is None:
        raise SpecError(f"{path.name} has no cell tagged 'parameters', so {names} has nowhere "
                        "to go: tag the cell that sets the defaults 'parameters' (Jupyter: "
                        "Property Inspector > Cell Tags), or pass --allow-new-parameters")
    missing = [n for n in given if n not in cell.names]
    if missing:
        sets = ", ".join(cell.names) or "nothing"
        raise SpecError(f"parameter {missing[0]!r} is not set in the parameters cell of "
                        f"{path.name} (it sets: {sets}); add `{missing[0]} = ...` there, or "
                        "pass --allow-new-parameters")


def resolve_kernel(nb: NotebookNode, spec: PromotionSpec, explicit: bool) -> tuple[str, str | None]:
    """The kernel the run will use, and a note when it is not the notebook's own.

    Container images ship ``python3``. Elsewhere, a kernel that is not installed here is an
    error when the user named it, and a Python notebook's conda/venv kernel runs as ``python3``.
    """
    wanted = spec.kernel
    if spec.target in _CONTAINER_TARGETS:
        if explicit or wanted == "python3":
            return wanted, None
        return "python3", (f"the notebook's kernel {wanted!r} is replaced by python3, the "
                           "runtime image's kernel (choose another with --kernel NAME)")
    installed = installed_kernels()
    if installed is None or wanted in installed:
        return wanted, None
    choices = ", ".join(sorted(installed)) or "none"
    if explicit:
        raise SpecError(f"kernel {wanted!r} is not installed here; installed kernels: {choices} "
                        "(`jupyter kernelspec list`)")
    if "python3" in installed:
        return "python3", (f"the notebook's kernel {wanted!r} is not installed here; it will "
                           "run with python3 (choose another with --kernel NAME)")
    raise SpecError(f"the notebook's kernel {wanted!r} is not installed here and neither is "
                    f"python3; installed kernels: {choices}; pass --kernel NAME")


def installed_kernels() -> dict[str, str] | None:
    """Kernelspec names here (None when jupyter_client cannot tell)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return dict(KernelSpecManager().find_kernel_specs())
    except Exception:
        return None


# -- the result and its atomic write -------------------------------------------------------------

@dataclass(frozen=True)
class PromotionResult:
    """A promotion computed in memory; :meth:`write` puts it on disk."""

    spec: PromotionSpec
    source_path: Path
    dags_dir: Path
    notebook: NotebookNode
    dag_source: str
    notes: tuple[str, ...] = field(default=())
    bundle: Bundle | None = None  # the files and packages the notebook needs

    @property
    def dag_file(self) -> Path:
        return self.dags_dir / f"{self.spec.dag_id}.py"

    @property
    def notebook_file(self) -> Path:
        return self.dags_dir / prepared_name(self.spec)

    def written_paths(self) -> list[Path]:
        """What ``write()`` puts in the dags dir: DAG, prepared notebook, bundle, pins."""
        paths = [self.dag_file, self.notebook_file]
        if self.bundle is not None and self.bundle.recorded_name:
            paths.append(self.dags_dir / self.bundle.recorded_name)
        if self.bundle is not None and self.bundle.requirements:
            paths.append(self.dags_dir / f"{self.spec.dag_id}.requirements.txt")
        return paths

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
            "kernel": self.spec.kernel,
            "parameters": self.spec.params,
            "advisories": list(self.notes),
            "trigger": f"airflow dags trigger {self.spec.dag_id}",
            "test": f"airflow dags test {self.spec.dag_id}",
            "needs": self.bundle.needs.as_dict() if self.bundle else None,
            "bundle": self.bundle.as_dict() if self.bundle else None,
        }

    def write(self, force: bool = False) -> PromotionResult:
        """Write the prepared notebook and the DAG, all or nothing, under a lock on the dags dir.

        Both files are staged first (a full disk or a failed write leaves nothing visible), then
        renamed into place, the notebook first so the scheduler never sees a DAG whose notebook
        is missing. Files airgpu-nb did not write, or that were edited since, are kept unless
        ``force``.
        """
        ensure_writable_dir(self.dags_dir)
        for path in (self.notebook_file, self.dag_file):
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise WriteError(f"{path} exists and is not a regular file; remove it or choose "
                                 "another --dag-id")
        if self.notebook_file.resolve() == self.source_path.resolve():
            raise WriteError(f"the prepared copy would overwrite the source notebook "
                             f"{self.source_path}; choose another --dag-id or --dags-dir")
        with dags_dir_lock(self.dags_dir):
            if not force:
                refuse_foreign_dag(self.dag_file)
                refuse_foreign_notebook(self.notebook_file)
            staged = []
            try:
                with installing(self.bundle, self.dags_dir, self.spec.dag_id) as install:
                    staged.append(stage_file(self.notebook_file, notebook_bytes(self.notebook)))
                    staged.append(stage_file(self.dag_file, self.dag_source.encode("utf-8")))
                    install()  # the bundle first: a notebook never lacks its files
                    os.replace(staged[0], self.notebook_file)
                    os.replace(staged[1], self.dag_file)
            except OSError as exc:
                raise WriteError(f"cannot write to {self.dags_dir}: "
                                 f"{exc.strerror or exc}") from None
            finally:
                for tmp in staged:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        return self


def default_dags_dir() -> Path:
    """``$AIRGPU_DAGS_DIR`` (checked like any other input), else ``./dags``."""
    value = os.environ.get(DAGS_DIR_ENV)
    if not value:
        return Path("dags")
    return Path(table.row("dags_dir").parse(value, f"environment {DAGS_DIR_ENV}"))


def promote(notebook_path: str | os.PathLike[str], *,
            dags_dir: str | os.PathLike[str] | None = None, **options: Any) -> PromotionResult:
    """Promote a notebook in memory. ``options`` are explicit settings (rows of
    :data:`airgpu_nb.settings.SETTINGS`; ``None`` means "not given"). Call ``.write()`` on the
    result to put it on disk.

    Where files go is the caller's choice, never the notebook's: ``dags_dir`` (or the
    ``dags_dir`` option), else ``$AIRGPU_DAGS_DIR``, else ``[tool.airgpu]``, else ``./dags``.
    """
    from .advice import advisories

    path = Path(notebook_path)
    nb = read_notebook(path)
    if dags_dir is not None:
        options = {**options, "dags_dir": os.fspath(dags_dir)}
    settings = layered_settings(nb, path, options)
    check_parameters(nb, path, settings.get("parameters") or {},
                     bool(settings.get("allow_new_parameters")))
    spec = spec_from_settings(nb, path, settings)
    kernel, kernel_note = resolve_kernel(nb, spec, explicit="kernel" in settings)
    if kernel != spec.kernel:
        spec = spec.replace(kernel=kernel)
    folder = _choose_dags_dir(options, settings)
    carried = plan(nb, path, spec.dag_id, spec.option_map, folder,
                   bool(settings.get("requirements")))
    notes = tuple(n for n in (kernel_note, *carried.notes(), *advisories(nb)) if n)
    prepared = prepare(nb, spec, packages=[p.as_dict() for p in carried.needs.packages],
                       bundle=carried.recorded_name)
    _record_checksum(prepared)
    return PromotionResult(spec, path, folder, prepared, render_dag(spec), notes, carried)


def _choose_dags_dir(explicit: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    if explicit.get("dags_dir"):
        return Path(settings["dags_dir"])
    if os.environ.get(DAGS_DIR_ENV):
        return default_dags_dir()
    return Path(settings.get("dags_dir") or "dags")


def _record_checksum(nb: NotebookNode) -> None:
    """Stamp the prepared copy so a later promotion can tell it was not edited since."""
    data = json.loads(notebook_bytes(nb))
    data["metadata"][METADATA_KEY].pop("checksum", None)
    nb.metadata[METADATA_KEY]["checksum"] = notebook_checksum(data)


def _display_path(path: Path) -> str:
    """A path for documentation: relative to the working directory when inside it, so
    generated files carry no machine-specific paths."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

