"""The files a promoted notebook carries (each run's working directory is seeded from them by
:mod:`airgpu_nb.workdir`).

A notebook reads ``data/train.csv`` and imports ``features`` relative to its own folder; a
scheduled run starts elsewhere. Promotion copies what :mod:`airgpu_nb.needs` finds (plus
``--include``, minus ``--exclude``) into ``DAGS_DIR/<dag_id>.files/``::

    <dag_id>.files/.airflowignore   the DAG processor never imports the helper modules
    <dag_id>.files/manifest.json    relative path, size and sha256 of every file
    <dag_id>.files/files/...        the files, as they lie beside the notebook

The prepared notebook records the folder's name (``metadata.airgpu.bundle``), so every runner
(the DAG task, ``airgpu run``, a container) finds it beside the notebook. Each run copies it into
a fresh working directory; what the notebook writes there is moved beside the executed notebook.

Nothing outside the notebook's folder is ever carried: no ``..``, no symlink leaving it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nbformat import NotebookNode

from . import __version__
from .errors import AirgpuError, SpecError, WriteError
from .needs import Needs, find_needs
from .writes import stage_file

log = logging.getLogger(__name__)

DEFAULT_LIMIT_MB = 100
MAX_FILES = 10_000
MANIFEST = "manifest.json"
FILES = "files"
SUFFIX = ".files"
#: Valid in both of Airflow's .airflowignore syntaxes (glob and regexp); together they match
#: every name, so nothing in the bundle is ever parsed as a DAG file.
AIRFLOWIGNORE = ("# airgpu-nb: data and helper modules of a promoted notebook, not DAG files\n"
                 "[!.]*\n.*\n")
_SKIP_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints", ".git", ".venv", "node_modules"})
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_ADVICE = "read it from a mounted volume or an object-store URL (s3://, gs://) instead"


class BundleError(AirgpuError):
    """The files a notebook needs cannot be carried as asked (too big, too many)."""


def bundle_name(dag_id: str) -> str:
    return f"{dag_id}{SUFFIX}"


def check_relative(path: str) -> str:
    """A path given for ``--include``/``--exclude``: relative, inside the notebook's folder."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if path.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:", path) or ".." in parts:
        raise SpecError(f"{path!r} must be a path relative to the notebook's folder, without "
                        "'..'; nothing outside that folder is carried")
    return path


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative to the notebook's folder, POSIX
    source: Path  # the real file (symlinks inside the folder resolved)
    size: int


@dataclass(frozen=True)
class Bundle:
    """What a promotion carries beside the DAG (computed in memory; nothing written yet)."""

    name: str
    needs: Needs
    files: tuple[BundleFile, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why it is not carried)
    requirements: bool = False  # also write <dag_id>.requirements.txt
    limit_mb: int = DEFAULT_LIMIT_MB

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def recorded_name(self) -> str | None:
        """What the prepared notebook records: the folder name, or None when nothing is carried."""
        return self.name if self.files else None

    def seed(self) -> list[tuple[str, Path]]:
        """(relative path, source) of every file: what a run's working directory starts with."""
        return [(f.path, f.source) for f in self.files]

    def pins(self) -> list[str]:
        return sorted({f"{p.distribution}=={p.version}" for p in self.needs.packages
                       if p.distribution and p.version})

    def notes(self) -> list[str]:
        """One line each: what is carried, what is checked, what is left behind and why."""
        notes = []
        if self.files:
            notes.append(f"carries {len(self.files)} file(s), {_mb(self.total)}, in "
                         f"{self.name}/ beside the DAG: {_listed(f.path for f in self.files)}")
        installed = [p for p in self.needs.packages if p.installed]
        if installed:
            notes.append("the verification cell checks the worker has: "
                         + _listed((p.label for p in installed), 12)
                         + ("" if self.requirements else " (--requirements writes the pins)"))
        if self.needs.missing_here:
            notes.append(f"imports {_listed(self.needs.missing_here)}, not installed here: the "
                         "run fails in the verification cell unless the worker has it "
                         "(--allow-missing-packages to run anyway)")
        if self.skipped:
            notes.append("not carried: " + _listed((f"{p} ({why})" for p, why in self.skipped), 6)
                         + f"; if the run needs it, {_ADVICE}")
        if self.needs.written:
            notes.append("left behind, the notebook writes them: "
                         + _listed(self.needs.written))
        return notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.recorded_name,
            "files": [{"path": f.path, "size": f.size} for f in self.files],
            "total_bytes": self.total,
            "skipped": [{"path": p, "why": why} for p, why in self.skipped],
            "requirements": self.requirements,
        }


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 10**5 else f"{size / 1e3:.1f} kB"


def _listed(items: Iterator[str] | Sequence[str], most: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


# -- planning (at promotion, in memory) ----------------------------------------------------------

def plan(nb: NotebookNode, notebook_path: str | os.PathLike[str], dag_id: str,
         options: Mapping[str, Any], dags_dir: str | os.PathLike[str] | None = None,
         requirements: bool = False) -> Bundle:
    """What promoting ``nb`` carries. ``options``: ``include``, ``exclude``, ``bundle_limit_mb``.
    A bundle over the limit is a ``BundleError`` naming the biggest files."""
    needs = find_needs(nb, notebook_path)
    limit = options.get("bundle_limit_mb") or DEFAULT_LIMIT_MB
    walker = _Walker(needs.root, [check_relative(p) for p in options.get("exclude") or ()],
                     dags_dir)
    for rel in needs.outside:
        walker.skip(rel, "outside the notebook's folder")
    for rel in (*needs.modules, *needs.files):
        walker.add(rel, explicit=False)
    for rel in options.get("include") or ():
        walker.add(check_relative(rel).strip("/"), explicit=True)
    files = tuple(sorted(walker.files.values(), key=lambda f: f.path))
    bundle = Bundle(bundle_name(dag_id), needs, files, tuple(walker.skipped.items()),
                    requirements, limit)
    if bundle.total > limit * 10**6:
        biggest = sorted(files, key=lambda f: -f.size)[:3]
        raise BundleError(
            f"the files {Path(notebook_path).name} needs come to {_mb(bundle.total)}, over the "
            f"{limit} MB bundle limit (--bundle-limit MB); biggest: "
            + ", ".join(f"{f.path} ({_mb(f.size)})" for f in biggest)
            + f"; {_ADVICE}, and leave it out with --exclude PATH")
    return bundle


class _Walker:
    """Collects regular files under the notebook's folder, refusing every way out of it."""

    def __init__(self, root: Path, exclude: list[str], dags_dir: str | os.PathLike[str] | None):
        self.root = root
        self.exclude = [p.strip("/").removeprefix("./") for p in exclude if p.strip("/")]
        self.never = Path(dags_dir).resolve() if dags_dir is not None else None
        self.files: dict[str, BundleFile] = {}
        self.skipped: dict[str, str] = {}
        self.visited: set[Path] = set()

    def skip(self, rel: str, why: str) -> None:
        self.skipped.setdefault(rel, why)

    def add(self, rel: str, explicit: bool) -> None:
        rel = PurePosixPath(rel).as_posix()
        if rel in (".", ""):
            if explicit:  # --include . : the whole folder
                self._folder(self.root, "")
            return
        if rel in self.files:
            return
        if self._excluded(rel):
            self.skip(rel, "--exclude")
            return
        if not explicit and any(part.startswith(".") for part in rel.split("/")):
            self.skip(rel, "hidden; --include it if the run needs it, never a secret")
            return
        path = self.root / rel
        if not os.path.lexists(path):
            if explicit:
                raise SpecError(f"--include {rel}: no such file or folder beside the notebook")
            return
        self._visit(path, rel)

    def _excluded(self, rel: str) -> bool:
        return any(rel == pat or rel.startswith(pat + "/") or fnmatch.fnmatch(rel, pat)
                   for pat in self.exclude)

    def _visit(self, path: Path, rel: str) -> None:
        try:
            real = path.resolve(strict=True)
            info = real.stat()
        except (OSError, RuntimeError):
            self.skip(rel, "a broken symlink or unreadable")
            return
        if real != self.root and self.root not in real.parents:
            self.skip(rel, "a symlink leaving the notebook's folder")
            return
        if self.never is not None and (real == self.never or self.never in real.parents):
            return  # the DAG folder itself (and earlier bundles) inside the project
        if stat.S_ISDIR(info.st_mode):
            self._folder(real, rel)
        elif stat.S_ISREG(info.st_mode):
            self.files[rel] = BundleFile(rel, real, info.st_size)
            if len(self.files) > MAX_FILES:
                raise BundleError(f"more than {MAX_FILES} files to carry (under {rel}); "
                                  f"{_ADVICE}, and leave it out with --exclude PATH")
        else:
            self.skip(rel, "not a regular file")

    def _folder(self, real: Path, rel: str) -> None:
        if real in self.visited:
            return
        self.visited.add(real)
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except OSError as exc:
            self.skip(rel, f"unreadable: {exc.strerror or exc}")
            return
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith(".") or entry.name in _SKIP_DIRS:
                continue
            if self._excluded(child):
                self.skip(child, "--exclude")
                continue
            self._visit(Path(entry.path), child)


# -- writing (inside PromotionResult.write, under its lock) --------------------------------------

@contextlib.contextmanager
def installing(bundle: Bundle | None, dags_dir: Path, dag_id: str) -> Iterator[Callable[[], None]]:
    """Stage the bundle (and requirements) beside the DAG; the caller calls the function it gets
    when its own files are staged, then renames them into place. A failure before that leaves
    the previous bundle untouched; one after it puts the previous bundle back."""
    dest = dags_dir / bundle_name(dag_id)
    _refuse_foreign(dest)
    staged: Path | None = None
    pins: str | None = None
    aside: Path | None = None
    done = False
    try:
        if bundle is not None and bundle.files:
            staged = _stage(bundle, dags_dir, dest.name)
        if bundle is not None and bundle.requirements:
            pins = stage_file(dags_dir / f"{dag_id}.requirements.txt",
                              _requirements(bundle).encode("utf-8"))

        def install() -> None:
            nonlocal aside, staged, pins, done
            if os.path.lexists(dest):
                aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old",
                                              dir=dags_dir))
                os.replace(dest, aside / "bundle")
            if staged is not None:
                os.replace(staged, dest)
                staged = None
            done = True
            if pins is not None:
                os.replace(pins, dags_dir / f"{dag_id}.requirements.txt")
                pins = None

        yield install
    except BaseException:
        if done:  # the caller failed after the swap: put the previous bundle back
            with contextlib.suppress(OSError):
                if bundle is not None and bundle.files and dest.is_dir():
                    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp",
                                                   dir=dags_dir))
                    os.replace(dest, staged / "bundle")
                if aside is not None:
                    os.replace(aside / "bundle", dest)
        raise
    finally:
        for leftover in (staged, aside):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        if pins is not None:
            with contextlib.suppress(OSError):
                os.unlink(pins)


def _refuse_foreign(dest: Path) -> None:
    """Only a folder airgpu-nb wrote is ever replaced."""
    if not os.path.lexists(dest):
        return
    try:
        ours = (not dest.is_symlink() and dest.is_dir()
                and json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
                .get("generated_by", "").startswith("airgpu-nb"))
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise WriteError(f"{dest} exists and was not written by airgpu-nb; remove it or choose "
                         "another --dag-id")


def _stage(bundle: Bundle, dags_dir: Path, name: str) -> Path:
    """A hidden sibling folder holding the whole bundle (its .airflowignore written first)."""
    try:
        staged = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dags_dir))
    except OSError as exc:
        raise WriteError(f"cannot write to {dags_dir}: {exc.strerror or exc}") from None
    try:
        (staged / ".airflowignore").write_text(AIRFLOWIGNORE, encoding="utf-8")
        listed = []
        for item in bundle.files:
            target = staged / FILES / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = _copy(item.source, target)
            listed.append({"path": item.path, "size": size, "sha256": digest})
        manifest = {"generated_by": f"airgpu-nb {__version__}", "files": listed,
                    "total_bytes": sum(f["size"] for f in listed)}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                       encoding="utf-8")
        staged.chmod(0o755)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise WriteError(f"cannot carry the notebook's files into {dags_dir}: "
                         f"{exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _copy(source: Path, target: Path) -> tuple[int, str]:
    """Copy and hash in one pass."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(2**20):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _requirements(bundle: Bundle) -> str:
    head = (f"# Packages {bundle.name.removesuffix(SUFFIX)} imports, as installed where it was "
            f"promoted (airgpu-nb {__version__}).\n")
    return head + "".join(pin + "\n" for pin in bundle.pins())
