"""Reading, checking and atomically writing notebooks (nbformat does the format work)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import tempfile
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from .errors import NotebookError, WriteError

PYTHON_LANGUAGES = frozenset({"python", "python3", "ipython", "ipython3"})


def read_notebook(path: str | os.PathLike[str]) -> NotebookNode:
    """Read a Python notebook as nbformat 4, or raise a ``NotebookError`` that says why not.

    nbformat 3 files are refused with the command that upgrades them: silently upgrading would
    promote a notebook the user has never opened in that form.
    """
    path = Path(path)
    if not path.exists():
        raise NotebookError(f"notebook not found: {path}")
    if path.is_dir():
        raise NotebookError(f"{path} is a directory, not a notebook")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotebookError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NotebookError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or ("cells" not in data and "worksheets" not in data):
        raise NotebookError(f"{path} is JSON but not a Jupyter notebook")
    major = data.get("nbformat")
    if major != 4:
        if isinstance(major, int) and major < 4:
            raise NotebookError(
                f"{path} is nbformat {major}; upgrade it first: "
                f"jupyter nbconvert --to notebook --inplace {path.name}"
            )
        raise NotebookError(f"{path} has unsupported nbformat {major!r}")
    try:
        nb = nbformat.reads(raw, as_version=4)
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise NotebookError(f"{path} is not a valid notebook: {_first_line(exc.message)}") from None
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
        if tag in cell.get("metadata", {}).get("tags", []):
            return index
    return None


def parameter_defaults(nb: NotebookNode) -> dict[str, object]:
    """Literal assignments in the ``parameters`` cell (what the panel pre-fills)."""
    index = find_tagged(nb, "parameters")
    if index is None:
        return {}
    try:
        tree = ast.parse(nb.cells[index].source)
    except SyntaxError:
        return {}
    found: dict[str, object] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return found


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
