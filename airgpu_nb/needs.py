"""What a notebook needs besides itself, found statically at promotion: files it reads beside
it, helper modules it imports from beside it, and the third-party packages it imports.

A notebook that runs in Jupyter reads ``data/train.csv`` relative to its own folder; a scheduled
run starts elsewhere. Finding these up front lets promotion carry them (:mod:`airgpu_nb.bundle`)
and lets the verification cell check the packages before any GPU work.

Cells are turned into Python with IPython's own transformer (``%magic`` and ``!shell`` lines
are tolerated), then read with ``ast``; nothing is imported or executed. Helper modules found
beside the notebook are read the same way, since their imports and files are needed too.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nbformat import NotebookNode

from .keys import CHECK_TAG, cell_tags
from .notebook import python_source
from .packages import Package, is_stdlib, package_of

#: Helper modules read at most (a notebook beside a huge source tree is not scanned forever).
MAX_MODULE_FILES = 500
MAX_MODULE_BYTES = 2 * 2**20
_MAX_LITERAL = 1024

# Calls whose string arguments name files the notebook writes (not inputs to carry).
_WRITERS = frozenset({
    "save", "save_weights", "save_model", "savefig", "savez", "savez_compressed", "savetxt",
    "dump", "to_csv", "to_json", "to_parquet", "to_pickle", "to_excel", "to_feather", "to_hdf",
    "to_netcdf", "to_zarr", "write_text", "write_bytes", "imwrite", "imsave", "mkdir",
    "makedirs", "touch", "rmtree", "remove", "unlink", "export",
})
# Cell magics whose body is not Python (the rest are read as Python when they parse).
_NOT_PYTHON_MAGICS = frozenset({
    "bash", "sh", "script", "html", "HTML", "javascript", "js", "latex", "markdown", "svg",
    "perl", "ruby", "sql", "writefile", "file", "capture_output",
})
_PYTHON_LINE_MAGICS = frozenset({"time", "timeit", "prun"})
_PATH_CALLS = frozenset({"Path", "PurePath", "PosixPath", "PurePosixPath", "join"})
_GLOB = re.compile(r"[*?\[]")
_IMPORT = re.compile(r"\bimport\b")
_MAGIC = re.compile(r"^\s*%", re.MULTILINE)
_STRING = re.compile(r"'([^'\\\n]{1,1024})'" r'|"([^"\\\n]{1,1024})"')


@dataclass(frozen=True)
class Needs:
    """What the notebook in ``root`` reads and imports. Paths are relative to ``root``, POSIX."""

    root: Path
    files: tuple[str, ...] = ()  # files and folders named by string literals that exist
    modules: tuple[str, ...] = ()  # helper modules/packages imported from beside the notebook
    packages: tuple[Package, ...] = ()  # third-party imports
    outside: tuple[str, ...] = ()  # existing paths outside the notebook's folder ('../data')
    written: tuple[str, ...] = ()  # existing paths the notebook only writes (left behind)
    optional: tuple[str, ...] = ()  # imports guarded by `except ImportError` (not required)

    @property
    def missing_here(self) -> tuple[str, ...]:
        """Imports that are not installed where the notebook is promoted."""
        return tuple(p.module for p in self.packages if not p.installed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "modules": list(self.modules),
            "packages": [p.as_dict() for p in self.packages],
            "outside": list(self.outside),
            "written": list(self.written),
            "optional": list(self.optional),
        }


def find_needs(nb: NotebookNode, notebook_path: str | os.PathLike[str]) -> Needs:
    """Read ``nb``'s code cells (and the helper modules they import from beside it)."""
    root = Path(os.path.abspath(notebook_path)).parent.resolve()
    scan = _Scan(root, Path(notebook_path).name)
    for cell in nb.cells:
        if cell.get("cell_type") == "code" and CHECK_TAG not in cell_tags(cell):
            source = cell.get("source", "")
            text = "".join(source) if isinstance(source, list) else str(source)
            if scan.worth_reading(text):
                scan.read(text)
    scan.read_modules()
    return scan.result()


# -- reading code ---------------------------------------------------------------------------------

class _Scan:
    def __init__(self, root: Path, notebook_name: str) -> None:
        self.root = root
        self.notebook_name = notebook_name
        self.imports: dict[str, bool] = {}  # top-level name -> required
        self.read_paths: set[str] = set()
        self.written_paths: set[str] = set()
        self.modules: dict[str, Path] = {}  # relative path -> file or folder
        self.scanned: set[Path] = set()
        self.firsts: dict[str, bool] = {}  # literal -> its first path component exists here

    def worth_reading(self, text: str) -> bool:
        """Whether a cell can say anything: an import, a magic, or a string whose first path
        component exists beside the notebook. Parsing is what promotion of a big notebook
        would spend its time on; these regular expressions rule most cells out in microseconds.
        """
        if ("import" in text and _IMPORT.search(text)) or ("%" in text and _MAGIC.search(text)):
            return True
        for single, double in set(_STRING.findall(text)):
            literal = single or double
            if literal not in self.firsts:
                relative = _relative_candidate(literal)
                self.firsts[literal] = relative is not None and os.path.lexists(
                    self.root / relative.split("/")[0])
            if self.firsts[literal]:
                return True
        return False

    def read(self, source: str | list[str]) -> None:
        text = python_source(source)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return  # a cell the kernel could not run either: nothing to learn from it
        self._visit(tree, optional=False)

    def _visit(self, node: ast.AST, optional: bool) -> None:
        """Walk ``node``; ``optional``: inside a ``try`` that catches ImportError."""
        stack: list[tuple[ast.AST, bool]] = [(node, optional)]
        while stack:
            item, guarded = stack.pop()
            if isinstance(item, ast.Try) or type(item).__name__ == "TryStar":
                catches = any(_catches_import_error(h) for h in item.handlers)  # type: ignore
                for child in item.body:  # type: ignore[attr-defined]
                    stack.append((child, guarded or catches))
                for child in (*item.handlers, *item.orelse, *item.finalbody):  # type: ignore
                    stack.append((child, guarded))
                continue
            if isinstance(item, ast.Import):
                for alias in item.names:
                    self._import(alias.name, guarded)
            elif isinstance(item, ast.ImportFrom):
                if item.level == 0 and item.module:
                    self._import(item.module, guarded)
            elif isinstance(item, ast.Call):
                if self._call(item):
                    continue
            elif isinstance(item, ast.BinOp):
                joined = _static_path(item)
                if joined is not None:
                    self.read_paths.add(joined)
                    continue
            elif isinstance(item, ast.Constant) and isinstance(item.value, str):
                self.read_paths.add(item.value)
            elif isinstance(item, ast.JoinedStr):
                prefix = _fstring_prefix(item)
                if prefix:
                    self.read_paths.add(prefix)
            stack.extend((child, guarded) for child in ast.iter_child_nodes(item))

    def _import(self, dotted: str, optional: bool) -> None:
        top = dotted.split(".")[0]
        self.imports[top] = self.imports.get(top, False) or not optional

    def _call(self, call: ast.Call) -> bool:
        """Handle calls that say more than their arguments; True when fully handled."""
        magic = _ipython_call(call)
        if magic is not None:
            self._magic(*magic)
            return True
        joined = _static_path(call)
        if joined is not None:
            self.read_paths.add(joined)
            return True
        name = _call_name(call)
        written: list[str] = []
        if name in _WRITERS:
            written = [s for s in map(_static_path, call.args) if s is not None]
            if isinstance(call.func, ast.Attribute):  # Path('out.txt').write_text(...)
                target = _static_path(call.func.value)
                if target is not None:
                    written.append(target)
        elif name == "open" and _opens_for_writing(call) and call.args:
            target = _static_path(call.args[0])
            written = [target] if target is not None else []
        if not written:
            return False
        self.written_paths.update(written)
        for child in [*call.args, *(k.value for k in call.keywords)]:  # they may read files
            if _static_path(child) not in written:
                self._visit(child, False)
        if isinstance(call.func, ast.Attribute) and _static_path(call.func.value) is None:
            self._visit(call.func.value, False)
        return True

    def _magic(self, kind: str, name: str, args: list[ast.expr]) -> None:
        text = [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if kind == "run_line_magic" and text:
            line = text[0]
            if name == "matplotlib":
                self._import("matplotlib", False)
            elif name in ("run", "load") and line.split():
                self.read_paths.add(line.split()[-1] if name == "load" else line.split()[0])
            elif name in _PYTHON_LINE_MAGICS:
                self.read(line)
        elif kind == "run_cell_magic" and len(text) >= 2 and name not in _NOT_PYTHON_MAGICS:
            self.read(text[-1])

    # -- helper modules beside the notebook -------------------------------------------------------

    def read_modules(self) -> None:
        """Find imports that resolve beside the notebook and read them, transitively."""
        seen: set[str] = set()
        while True:
            fresh = [name for name in self.imports if name not in seen]
            if not fresh:
                return
            for name in fresh:
                seen.add(name)
                local = self._local_module(name)
                if local is None:
                    continue
                self.modules[local.relative_to(self.root).as_posix()] = local
                for source in _python_files(local):
                    if len(self.scanned) >= MAX_MODULE_FILES:
                        return
                    if source in self.scanned:
                        continue
                    self.scanned.add(source)
                    try:
                        if source.stat().st_size <= MAX_MODULE_BYTES:
                            self.read(source.read_text(encoding="utf-8", errors="replace"))
                    except OSError:
                        continue

    def _local_module(self, name: str) -> Path | None:
        if not name.isidentifier():
            return None
        single = self.root / f"{name}.py"
        if single.is_file():
            return single
        folder = self.root / name
        if folder.is_dir() and (folder / "__init__.py").is_file():
            return folder
        if folder.is_dir() and any(folder.glob("*.py")):
            return folder  # a namespace package
        return None

    # -- the result -------------------------------------------------------------------------------

    def result(self) -> Needs:
        files, outside = self._existing(self.read_paths)
        written, _ = self._existing(self.written_paths - self.read_paths)
        modules = set(self.modules)
        files = sorted(f for f in files if f not in modules and f not in written)
        local = {Path(m).stem if m.endswith(".py") else m for m in modules}
        third = sorted(name for name, required in self.imports.items()
                       if required and name not in local and not is_stdlib(name))
        optional = sorted(name for name, required in self.imports.items()
                          if not required and name not in local and not is_stdlib(name))
        return Needs(self.root, tuple(files), tuple(sorted(modules)),
                     tuple(package_of(name) for name in third), tuple(sorted(outside)),
                     tuple(sorted(written)), tuple(optional))

    def _existing(self, candidates: Iterable[str]) -> tuple[set[str], set[str]]:
        """The candidates that exist: inside the notebook's folder (relative), or outside it."""
        inside: set[str] = set()
        outside: set[str] = set()
        for text in candidates:
            relative = _relative_candidate(text)
            if relative is None:
                continue
            path = self.root / relative
            try:
                if not os.path.lexists(path):
                    continue
                resolved = path.resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            lexical = Path(os.path.normpath(path))
            if not _is_within(lexical, self.root):
                outside.add(relative)
                continue
            rel = lexical.relative_to(self.root).as_posix()
            if rel in (".", self.notebook_name) or rel.startswith(".ipynb_checkpoints"):
                continue
            if not _is_within(resolved, self.root):
                outside.add(rel)  # a symlink leaving the folder
                continue
            inside.add(rel)
        return inside, outside


def _relative_candidate(text: str) -> str | None:
    """``text`` as a relative path worth looking for, or None (URLs, absolute paths, code...)."""
    text = text.strip()
    if (not text or len(text) > _MAX_LITERAL or "\n" in text or "\x00" in text
            or "://" in text or text.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:", text)):
        return None
    glob = _GLOB.search(text)
    if glob is not None:  # data/*.csv: the folder before the first wildcard
        text = text[: glob.start()].rpartition("/")[0]
        if not text:
            return None
    parts = [p for p in PurePosixPath(text.replace("\\", "/")).parts if p not in ("", ".")]
    return "/".join(parts) or None


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _python_files(local: Path) -> Iterator[Path]:
    if local.is_file():
        yield local
        return
    for folder, dirs, files in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


# -- small AST readers ----------------------------------------------------------------------------

def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type
    if kinds is None:
        return True
    names = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return any(isinstance(n, (ast.Name, ast.Attribute)) and _dotted(n).split(".")[-1] in (
        "ImportError", "ModuleNotFoundError", "Exception", "BaseException") for n in names)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _static_path(node: ast.AST) -> str | None:
    """The path an expression names when it is statically visible: a string, ``Path('a')``,
    ``Path('a') / 'b'``, ``os.path.join('a', 'b')``; None otherwise."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        left, right = _static_path(node.left), _static_path(node.right)
        both_text = isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
        if left is not None and right is not None and not both_text:
            return f"{left}/{right}"
        return None
    if isinstance(node, ast.Call) and _call_name(node) in _PATH_CALLS and node.args \
            and not node.keywords:
        if _call_name(node) == "join" and not _dotted(node.func).endswith("path.join"):
            return None  # str.join and friends
        parts = [_static_path(a) for a in node.args]
        if all(p is not None for p in parts):
            return "/".join(p for p in parts if p)  # type: ignore[misc]
    return None


def _fstring_prefix(node: ast.JoinedStr) -> str | None:
    """f'data/{split}.csv' -> 'data': the folder its constant start names."""
    first = node.values[0] if node.values else None
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and "/" in first.value:
        return first.value.rpartition("/")[0] or None
    return None


def _opens_for_writing(call: ast.Call) -> bool:
    mode: ast.AST | None = call.args[1] if len(call.args) > 1 else None
    for keyword in call.keywords:
        if keyword.arg == "mode":
            mode = keyword.value
    return (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
            and any(ch in mode.value for ch in "wax") and "+" not in mode.value)


def _ipython_call(call: ast.Call) -> tuple[str, str, list[ast.expr]] | None:
    """``get_ipython().run_line_magic('name', 'line')`` -> ('run_line_magic', 'name', args)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
            and _call_name(func.value) == "get_ipython"):
        return None
    first = call.args[0] if call.args else None
    name = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
    return func.attr, name, list(call.args[1:])


__all__ = ["Needs", "Package", "find_needs", "package_of"]
