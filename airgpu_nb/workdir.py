"""The working directory each run starts in: fresh, seeded from the notebook's bundle (see
:mod:`airgpu_nb.bundle`), so runs never see each other's writes; what the notebook writes there
is moved beside the executed notebook afterwards, inputs it left unchanged are not."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from .bundle import FILES, MANIFEST, NAME_RE, SUFFIX
from .errors import SpecError
from .keys import METADATA_KEY

log = logging.getLogger(__name__)


def recorded_bundle(prepared: str | os.PathLike[str]) -> str | None:
    """The bundle folder a prepared notebook names (one path component), or None."""
    from .notebook import MAX_NOTEBOOK_BYTES, read_text_file

    try:
        data = json.loads(read_text_file(prepared, "notebook", MAX_NOTEBOOK_BYTES, SpecError))
        name = data["metadata"][METADATA_KEY]["bundle"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if name is None:
        return None
    if (not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", "..")
            or not name.endswith(SUFFIX)):
        raise SpecError(f"{Path(prepared).name} names an invalid bundle folder {name!r}; "
                        "re-promote the notebook")
    return name


def seed_files(prepared: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(relative path, file) pairs of the bundle beside ``prepared``, from its manifest, each
    checked to be a regular file inside the bundle. Empty when the notebook carries nothing."""
    if "://" in os.fspath(prepared):
        return []
    name = recorded_bundle(prepared)
    if name is None:
        return []
    folder = Path(prepared).parent / name
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = [item["path"] for item in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{Path(prepared).name} needs its files in {folder}, which is missing or "
                        f"damaged ({type(exc).__name__}); re-promote the notebook, and make the "
                        "DAG folder with it visible where the task runs") from None
    pairs = []
    for rel in listed:
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ("..",)
        source = folder / FILES / rel if parts and ".." not in parts else None
        if (source is None or PurePosixPath(rel).is_absolute()
                or not stat.S_ISREG(_lstat_mode(source))):
            raise SpecError(f"{folder / MANIFEST} lists {rel!r}, which is not a regular file "
                            "in the bundle; re-promote the notebook")
        pairs.append((rel, source))
    return pairs


def _lstat_mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


@contextlib.contextmanager
def working_directory(output_dir: Path, seed: Sequence[tuple[str, Path]]) -> Iterator[Path]:
    """The kernel's working directory: ``output_dir`` itself when nothing is carried; else a
    fresh folder inside it seeded with ``seed``, whose new and changed files are moved into
    ``output_dir`` when the run ends (failed runs too). Runs never see each other's writes, and
    the carried inputs are not copied into every run's outputs."""
    if not seed:
        yield output_dir
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    cwd = Path(tempfile.mkdtemp(prefix=".airgpu-cwd-", dir=output_dir))
    try:
        seeded = _seed(cwd, seed)
        try:
            yield cwd
        finally:
            _harvest(cwd, output_dir, seeded)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def _seed(cwd: Path, seed: Sequence[tuple[str, Path]]) -> dict[str, tuple[int, int, int]]:
    seeded = {}
    for rel, source in seed:
        target = cwd / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except OSError as exc:
            raise SpecError(f"cannot seed the run's working directory with {rel}: "
                            f"{exc.strerror or exc}") from None
        info = target.stat()
        seeded[rel] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return seeded


def _harvest(cwd: Path, output_dir: Path, seeded: Mapping[str, tuple[int, int, int]]) -> None:
    """Move what the run created or changed beside the executed notebook; never raises."""
    seeded_dirs = {parent.as_posix() for rel in seeded for parent in PurePosixPath(rel).parents}
    for folder, dirs, files in os.walk(cwd):
        here = Path(folder)
        rel_dir = here.relative_to(cwd)
        for name in dirs:
            if (here / name).is_symlink():
                files.append(name)
            elif (rel_dir / name).as_posix() not in seeded_dirs:  # a folder the run made
                with contextlib.suppress(OSError):
                    (output_dir / rel_dir / name).mkdir(parents=True, exist_ok=True)
        for name in files:
            rel = (rel_dir / name).as_posix()
            path = here / name
            try:
                info = path.lstat()
                if seeded.get(rel) == (info.st_ino, info.st_size, info.st_mtime_ns):
                    continue
                target = output_dir / rel
                if target.is_dir() and not target.is_symlink():
                    log.warning("airgpu: %s is a folder beside the executed notebook; the "
                                "run's file %s is dropped", target, rel)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
            except OSError as exc:
                log.warning("airgpu: could not keep the run's file %s: %s", rel, exc)
