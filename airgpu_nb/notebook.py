"""Reading, checking and atomically writing notebooks (nbformat does the format work)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

from .errors import AirgpuError, NotebookError, WriteError
from .keys import PARAMETERS_TAG, cell_tags

PYTHON_LANGUAGES = frozenset({"python", "python3", "ipython", "ipython3"})


#: Largest notebook file read (outputs included): beyond this, reading is refused, not attempted.
MAX_NOTEBOOK_BYTES = 256 * 2**20


def read_text_file(path: str | os.PathLike[str], what: str, limit: int,
                   error: type[AirgpuError] = NotebookError) -> str:
    """A regular file's UTF-8 text, or one clear error: missing, a directory, a device or FIFO
    (which would block or never end), too large, unreadable or not UTF-8."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file (a device, FIFO or socket), not a {what}")
    if info.st_size > limit:
        raise error(f"{path} is {info.st_size / 2**20:.0f} MiB; a {what} over "
                    f"{limit // 2**20} MiB is refused")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{path} grew past {limit // 2**20} MiB while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start})") from None


def read_notebook(path: str | os.PathLike[str]) -> NotebookNode:
    """Read a Python notebook as nbformat 4, or raise a ``NotebookError`` that says why not.

    nbformat 4.0-4.5 keep their minor version (the prepared copy is written in it); nbformat 3 is
    upgraded to 4 by nbformat's own converter, in memory: the source file is never touched.
    """
    path = Path(path)
    raw = read_text_file(path, "notebook", MAX_NOTEBOOK_BYTES)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NotebookError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise NotebookError(f"{path} is JSON nested too deeply to be a notebook") from None
    if not isinstance(data, dict) or ("cells" not in data and "worksheets" not in data):
        raise NotebookError(f"{path} is JSON but not a Jupyter notebook")
    major = data.get("nbformat")
    if isinstance(major, bool) or major not in (3, 4):
        raise NotebookError(f"{path} has unsupported nbformat {major!r} (3 and 4 are read)")
    try:
        nb = nbformat.reads(raw, as_version=4)  # joins list sources; upgrades 3 to 4
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise NotebookError(f"{path} is not a valid notebook: {_first_line(exc.message)}") from None
    except RecursionError:
        raise NotebookError(f"{path} is nested too deeply to be a notebook") from None
    except Exception as exc:  # nbformat raises assorted errors for malformed documents
        raise NotebookError(f"{path} is not a valid notebook: {_first_line(str(exc))}") from None
    check_python(nb, path)
    return nb


def check_python(nb: NotebookNode, path: str | os.PathLike[str] = "notebook") -> None:
    meta = nb.get("metadata", {})
    language = (meta.get("kernelspec", {}).get("language")
                or meta.get("language_info", {}).get("name")
                or "python")
    if str(language).lower() not in PYTHON_LANGUAGES:
        kernel = meta.get("kernelspec", {}).get("name", language)
        raise NotebookError(
            f"{path} uses the {language} kernel ({kernel}); airgpu-nb runs Python notebooks only"
        )


def kernel_name(nb: NotebookNode) -> str:
    return nb.get("metadata", {}).get("kernelspec", {}).get("name") or "python3"


def find_tagged(nb: NotebookNode, tag: str) -> int | None:
    for index, cell in enumerate(nb.cells):
        if tag in cell_tags(cell):
            return index
    return None


@dataclass(frozen=True)
class ParametersCell:
    """What the ``parameters`` cell defines. ``index`` is None when no cell has the tag;
    ``error`` says why the cell does not parse (then ``names`` is empty)."""

    index: int | None
    names: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parameters_cell(nb: NotebookNode) -> ParametersCell:
    """The names the ``parameters`` cell assigns, and the literal ones' values (what the panel
    pre-fills and the DAG's params start from). IPython syntax (magics, ``!`` lines) is
    turned into Python first, as the kernel would."""
    index = find_tagged(nb, PARAMETERS_TAG)
    if index is None:
        return ParametersCell(None)
    source = nb.cells[index].get("source", "")
    try:
        tree = ast.parse(python_source(source))
    except SyntaxError as exc:
        return ParametersCell(index, error=f"line {exc.lineno}: {exc.msg}")
    except (ValueError, RecursionError, MemoryError) as exc:
        return ParametersCell(index, error=str(exc) or type(exc).__name__)
    names: list[str] = []
    defaults: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets, value = [node.target], getattr(node, "value", None)
        else:
            continue
        for target in targets:
            for name in _assigned_names(target):
                if name not in names:
                    names.append(name)
            if isinstance(target, ast.Name) and value is not None \
                    and not isinstance(node, ast.AugAssign):
                try:
                    defaults[target.id] = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    defaults.pop(target.id, None)
    return ParametersCell(index, tuple(names), defaults)


def _assigned_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for element in target.elts for n in _assigned_names(element)]
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    return []


def python_source(source: str | list[str]) -> str:
    """A cell's source as plain Python: IPython's own transformer rewrites ``%magic`` and
    ``!shell`` lines into calls, so ``ast`` can read cells the kernel would run."""
    text = "".join(source) if isinstance(source, list) else str(source)
    if "%" not in text and "!" not in text and "?" not in text:
        return text
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return text
    try:
        return TransformerManager().transform_cell(text)
    except Exception:  # a cell IPython itself cannot read: let ast report it
        return text


def parameter_defaults(nb: NotebookNode) -> dict[str, object]:
    """Literal assignments in the ``parameters`` cell (what the panel pre-fills)."""
    return dict(parameters_cell(nb).defaults)


def notebook_bytes(nb: NotebookNode) -> bytes:
    return (nbformat.writes(nb) + "\n").encode("utf-8")


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The temp file lives in the same directory (same filesystem, so ``os.replace`` is atomic) and
    its name does not end in ``.py``, so Airflow's DAG processor never picks it up.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
