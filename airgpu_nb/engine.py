"""The ``airgpu`` papermill engine: papermill's own nbclient engine, plus

- the run's GPU/CPU timeline, attributed to cells (:mod:`airgpu_nb.telemetry`), and the idle-GPU
  note (:mod:`airgpu_nb.idle`), also when the run fails;
- the cell that was running when the kernel died or timed out marked failed, with an error output
  naming what happened (papermill would record it ``completed``);
- executed notebooks written atomically on local paths, so a killed run leaves the previous
  complete version or none, never torn JSON.

It adds to papermill through its public seams only: nbclient's hooks and ``kernel_manager_class``
(passed on by papermill's ``NBClientEngine``), the ``NotebookExecutionManager`` it hands us, and
papermill's I/O handler registry. It copies none of papermill's argument handling.

papermill loads every ``papermill.engine`` entry point while ``papermill.engines`` itself is
still being imported, so this module imports nothing heavy and builds ``AirgpuEngine`` on first
attribute access (PEP 562). Importing it first, or from papermill, can never fail or cycle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from .keys import first_line as first_line  # re-exported: report.py still imports it from here

log = logging.getLogger(__name__)

#: papermill passes unknown ``execute_notebook`` keywords to the engine; ``run.execute`` hands
#: a dict under this name and gets the run's telemetry back in it (no second read of the file).
SINK_KWARG = "airgpu_telemetry"


def atomic_local_writes() -> None:
    """From now on in this process, papermill writes local notebooks through a temporary file in
    the same folder, fsync and ``os.replace``. Remote paths (s3://, gs://...) keep their own
    writers; a custom local handler someone registered is left alone."""
    from papermill.iorw import LocalHandler, papermill_io
    from papermill.utils import chdir

    class AtomicLocalHandler(LocalHandler):
        """papermill's local handler with an atomic ``write``. Its working directory is the
        wrapped handler's, which ``papermill.iorw.local_file_io_cwd`` may be holding now."""

        def __init__(self, inner: Any) -> None:  # no super().__init__: _cwd is inner's
            self._inner = inner

        @property
        def _cwd(self) -> str | None:
            return self._inner._cwd

        def cwd(self, new_path: str | None) -> str | None:
            return self._inner.cwd(new_path)

        def write(self, buf: str, path: str) -> None:
            with chdir(self._cwd):
                if not _replaceable(path):  # a FIFO, a device, a missing folder: papermill's way
                    return super().write(buf, path)
                _write_atomically(os.path.realpath(path), buf)

    # papermill's registry has no replace, and register() would not do: get_handler falls back
    # to the *last* "local" handler in its list, papermill's own. So swap that entry; ours
    # already, or one someone else registered, is left as it is.
    handlers = papermill_io._handlers
    for position, (scheme, handler) in enumerate(handlers):
        if scheme == "local" and type(handler) is LocalHandler:
            handlers[position] = (scheme, AtomicLocalHandler(handler))


def _replaceable(path: str) -> bool:
    folder = os.path.dirname(path) or "."
    return os.path.isdir(folder) and (not os.path.lexists(path) or os.path.isfile(path))


def _write_atomically(path: str, text: str) -> None:
    from .notebook import atomic_write

    try:
        mode = os.stat(path).st_mode & 0o777  # keep a file's permissions across runs
    except OSError:
        mode = 0o666 & ~_umask()
    atomic_write(path, text, mode=mode)


def _umask() -> int:
    """The process umask, read without changing it (os.umask is not thread-safe to probe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


class _Run:
    """One execution: nbclient's hooks start the sampler once the kernel is up, give each cell
    its span and say which cell the kernel was running when something stopped the run."""

    def __init__(self, nb_man: Any, sink: MutableMapping[str, Any] | None) -> None:
        self.nb_man = nb_man
        self.sink = sink
        self.km: Any = None
        self.process: Any = None  # the kernel's Popen, for its exit code
        self.recorder: Any = None
        self.running: int | None = None

    def client_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` plus our hooks; papermill passes them on to nbclient's NotebookClient."""
        kwargs = dict(kwargs)
        if kwargs.get("km") is not None:
            self.km = kwargs["km"]
        else:
            from jupyter_client import AsyncKernelManager  # nbclient's default

            base = kwargs.get("kernel_manager_class") or AsyncKernelManager
            if isinstance(base, str):  # traitlets' Type takes a dotted name too
                from traitlets.utils.importstring import import_item

                base = import_item(base)
            kwargs["kernel_manager_class"] = _recording_manager(base, self)
        for name, ours in (("on_notebook_start", self.kernel_ready),
                           ("on_cell_execute", self.cell_sent),
                           ("on_cell_executed", self.cell_replied)):
            kwargs[name] = _chain(ours, kwargs.get(name))
        return kwargs

    def kernel_ready(self, **_: Any) -> None:
        from .telemetry import interval_from_env
        from .timeline import RunRecorder

        provisioner = getattr(self.km, "provisioner", None)
        self.process = getattr(provisioner, "process", None)
        pid = getattr(provisioner, "pid", None)
        try:
            # Sample the kernel's process tree, not papermill's.
            recorder = RunRecorder(interval_from_env(), pid=pid if isinstance(pid, int) else None)
            recorder.start()
        except Exception as exc:
            log.warning("airgpu: telemetry off for this run: %s", exc)
            return
        self.recorder = recorder

    def cell_sent(self, cell_index: int, **_: Any) -> None:
        self.running = cell_index
        if self.recorder is not None:
            self.recorder.cell_started(cell_index)

    def cell_replied(self, cell_index: int, **_: Any) -> None:
        self.running = None
        if self.recorder is not None:
            self.recorder.cell_finished(cell_index)

    def stopped(self, exc: BaseException) -> BaseException | None:
        """Mark the cell that was running as failed, the way papermill marks a cell that raised,
        with an error output saying why. Returns a clearer exception for a dead kernel."""
        index, self.running = self.running, None
        if index is None:
            return None  # not during a cell: kernel start-up, or after the last one
        try:
            return self._mark_failed(index, exc)
        except Exception as problem:  # never hide the run's own exception behind ours
            log.warning("airgpu: could not mark cell %s failed: %s", index, problem,
                        exc_info=True)
            return None

    def _mark_failed(self, index: int, exc: BaseException) -> BaseException | None:
        if self.recorder is not None:
            self.recorder.cell_finished(index)
        import nbformat
        from nbclient.exceptions import DeadKernelError

        cell = self.nb_man.nb.cells[index]
        dead = isinstance(exc, DeadKernelError)
        ename = type(exc).__name__
        if dead:
            how = _exit_status(self.process)
            evalue = "the kernel died while this cell ran" + (f" ({how})" if how else "")
        else:
            evalue = _first(str(exc)) or "the run stopped while this cell ran"
        cell.setdefault("outputs", []).append(nbformat.v4.new_output(
            "error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"]))
        self.nb_man.cell_exception(cell, cell_index=index, exception=exc)
        if not dead:
            return None
        count = cell.get("execution_count")
        name = f"In [{count}]" if count else f"cell {index}"
        return DeadKernelError(evalue.replace("this cell", name, 1))

    def finish(self) -> None:
        """Write the timeline and the idle note. Never raises: losing the timeline must not
        fail a run that otherwise worked."""
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        from .idle import settings, warn_if_idle

        nb = self.nb_man.nb
        try:
            telemetry = recorder.finish(nb)
        except Exception as exc:
            log.warning("airgpu: telemetry could not be recorded: %s", exc, exc_info=True)
            return
        try:
            warn_if_idle(nb, telemetry)
        except Exception as exc:
            log.warning("airgpu: the idle-GPU check failed: %s", exc, exc_info=True)
        if self.sink is not None:
            self.sink.update(telemetry=telemetry, settings=settings(nb))


def _recording_manager(base: type, run: _Run) -> type:
    """``base`` (a kernel manager class) that tells ``run`` about the instance nbclient makes:
    the kernel's pid and exit code are known only to it."""

    class RecordingKernelManager(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            run.km = self

    return RecordingKernelManager


def _chain(ours: Callable[..., None], theirs: Callable[..., Any] | None) -> Callable[..., Any]:
    """Our hook first, then one the caller passed (its result, maybe awaitable, goes back)."""
    if theirs is None:
        return ours

    def both(**kwargs: Any) -> Any:
        ours(**kwargs)
        return theirs(**kwargs)

    return both


def _exit_status(process: Any) -> str:
    """'exit code 3', 'killed by SIGKILL (...)', or '' when unknown."""
    import signal

    try:
        code = process.poll() if process is not None else None
    except Exception:
        code = None
    if code is None:
        return ""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = ", as the out-of-memory killer does" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}"


def _first(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _build_engine() -> type:
    from papermill.engines import NBClientEngine

    class AirgpuEngine(NBClientEngine):
        """papermill's nbclient engine, with telemetry, dead-kernel marking and atomic writes."""

        @classmethod
        def execute_notebook(cls, nb: Any, kernel_name: str, **kwargs: Any) -> Any:
            atomic_local_writes()  # before papermill's first save of this run
            return super().execute_notebook(nb, kernel_name, **kwargs)

        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str,
                                     **kwargs: Any) -> Any:
            run = _Run(nb_man, kwargs.pop(SINK_KWARG, None))
            try:
                return super().execute_managed_notebook(nb_man, kernel_name,
                                                        **run.client_kwargs(kwargs))
            except BaseException as exc:
                clearer = run.stopped(exc)
                if clearer is None:
                    raise
                raise clearer from exc
            finally:
                run.finish()

    AirgpuEngine.__module__ = __name__
    AirgpuEngine.__qualname__ = "AirgpuEngine"
    return AirgpuEngine


def __getattr__(name: str) -> Any:
    if name == "AirgpuEngine":
        engine = _build_engine()
        globals()[name] = engine
        return engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
