"""``%airgpu`` line magic and ``%%airgpu profile`` cell magic: parse, dispatch to the core API
(GPU probe and selection in ``gpu``, the profiler in ``profile``), show the result, load and
unload. An ``AirgpuError`` becomes a one-line ``UsageError`` here and nowhere else.

Importing this module imports neither TensorFlow nor Airflow: ``%airgpu use`` must run before
TensorFlow initialises, and loading the extension should be instant.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from .cli import _gpus, _Parser, add_promote_options, add_run_options, promote_options
from .errors import AirgpuError
from .magics_deploy import INTRO as DEPLOY_INTRO
from .magics_deploy import SUBCOMMANDS as DEPLOY_SUBCOMMANDS
from .options import split_parameters

SUBCOMMANDS = ("status", "use", "verify", "promote", "run", "panel", *DEPLOY_SUBCOMMANDS)
CELL_SUBCOMMANDS = ("profile",)

_INTRO = """airgpu: see and pick GPUs, profile a cell, and promote this notebook to an Airflow DAG.

Line magic  %airgpu SUBCOMMAND [options]   subcommands: status, use, verify, promote, run, panel,
            trigger, runs
Cell magic  %%airgpu profile [--interval S]

  %airgpu status                  GPUs as NVML and TensorFlow see them, and CUDA_VISIBLE_DEVICES
  %airgpu use 0 --memory-growth   pick GPUs before TensorFlow initialises them
  %airgpu verify --gpus 1         the GPU check that promoted runs start with
  %airgpu promote --schedule @daily   write DAGS_DIR/<dag_id>.py and the prepared notebook
  %airgpu run -p epochs 2         run the notebook with papermill, exactly as the DAG task would
  %airgpu panel                   GPU dashboard and a one-click promotion form
  %%airgpu profile                run a cell while sampling GPU and CPU use
{deploy}
promote, run and panel act on the notebook this kernel belongs to (VS Code's
__vsc_ipynb_file__, then JupyterLab's __session__ / $JPY_SESSION_NAME); --notebook PATH names
another one. `%airgpu SUBCOMMAND --help` shows one subcommand's options. Every subcommand:
"""


class _HelpShown(Exception):
    """argparse printed help (or --help was asked for): stop quietly, without SystemExit."""


class _MagicParser(_Parser):
    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stdout.write(message)
        raise _HelpShown


def build_parser() -> argparse.ArgumentParser:
    """One parser for every subcommand; promote/panel take exactly the CLI's promote options."""
    parser = _MagicParser(prog="%airgpu", add_help=False)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_MagicParser)

    s = sub.add_parser("status", help="GPUs (index, name, UUID, memory, utilisation, MIG) "
                       "beside TensorFlow's view and CUDA_VISIBLE_DEVICES",
                       description="Changes nothing: TensorFlow lists devices but does not "
                       "initialise them, so `use` still works afterwards.")
    s.add_argument("--no-tensorflow", dest="tensorflow", action="store_false",
                   help="skip importing TensorFlow (faster)")

    u = sub.add_parser("use", help="pick GPUs and TensorFlow's memory options before "
                       "TensorFlow initialises its GPUs",
                       description="Sets CUDA_VISIBLE_DEVICES and TensorFlow's visible devices. "
                       "Run it before anything that uses TensorFlow; once TensorFlow has "
                       "initialised its GPUs, restart the kernel to change them.")
    u.add_argument("ids", metavar="IDS", help="comma-separated GPU indices or UUIDs "
                   "(GPU-..., MIG-...), or 'none' to hide every GPU")
    limits = u.add_mutually_exclusive_group()
    limits.add_argument("--memory-growth", action="store_true",
                        help="allocate GPU memory as needed instead of all at once")
    limits.add_argument("--memory-limit", type=int, metavar="MB",
                        help="cap TensorFlow's memory on each GPU at MB MiB")

    v = sub.add_parser("verify", help="run the GPU check the promoted notebook starts with",
                       description="Shows the same report as the injected cell; a failed check "
                       "is a one-line error after the report.")
    v.add_argument("--gpus", type=_gpus, default=1, metavar="N|all",
                   help="GPUs required (default: 1)")
    v.add_argument("--allow-cpu", action="store_true",
                   help="pass on CPU when the GPUs are missing")

    p = sub.add_parser("promote", help="write the Airflow DAG and the prepared notebook",
                       description="Same options as `airgpu promote`. Promotion reads the "
                       "notebook file on disk: save it first.")
    p.add_argument("--notebook", metavar="PATH", help="notebook to promote (default: the one "
                   "this kernel belongs to)")
    add_promote_options(p)

    r = sub.add_parser("run", help="run the notebook with papermill exactly as its DAG task "
                       "would, and link the executed notebook")
    r.add_argument("--notebook", metavar="PATH", help="notebook to run (default: this one)")
    add_run_options(r)

    w = sub.add_parser("panel", help="GPU dashboard and one-click promotion form; options "
                       "pre-fill the form", description="Takes the promote options.")
    w.add_argument("--notebook", metavar="PATH", help="notebook to promote (default: this one)")
    add_promote_options(w)

    from .magics_deploy import add_parsers

    add_parsers(sub)

    c = sub.add_parser("profile", help="(cell magic) %%airgpu profile [--interval S]: run the "
                       "cell while sampling GPU utilisation and memory and the kernel's CPU and "
                       "memory")
    c.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between samples (default: 0.5)")
    return parser


def help_text() -> str:
    """The docstring `%airgpu?` shows: an overview, then every subcommand's own help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = [_INTRO.format(deploy=DEPLOY_INTRO)]
    for name, child in sub.choices.items():
        prog = "%%airgpu profile" if name == "profile" else f"%airgpu {name}"
        child.prog = prog
        sections.append(f"--- {prog} ---\n{child.format_help()}")
    return "\n".join(sections)


def _unknown(word: str) -> UsageError:
    return UsageError(f"unknown subcommand {word!r}; valid: {', '.join(SUBCOMMANDS)} "
                      "(and the cell magic %%airgpu profile). Try %airgpu?")


@magics_class
class AirgpuMagics(Magics):
    """The magics; state here is only what the kernel session knows (execution times)."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._current_start: float | None = None
        self._previous_start: float | None = None
        self.panels: list[Any] = []
        self.last_profile: dict[str, Any] | None = None

    def _on_pre_run_cell(self, info: Any = None) -> None:
        self._previous_start, self._current_start = self._current_start, time.time()

    @line_cell_magic
    def airgpu(self, line: str, cell: str | None = None) -> None:
        """Replaced by :func:`help_text` when the extension loads."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot parse the options: {exc}") from None
        if not words:
            raise UsageError(f"give a subcommand: {', '.join(SUBCOMMANDS)} (or %%airgpu profile "
                             "as a cell magic). Try %airgpu?")
        command = words[0]
        if command in ("-h", "--help", "help"):
            print(help_text())
            return
        if cell is None and command in CELL_SUBCOMMANDS:
            raise UsageError(f"{command} is a cell magic: put %%airgpu {command} on the first "
                             "line of the cell to profile")
        if cell is not None and command not in CELL_SUBCOMMANDS:
            if command in SUBCOMMANDS:
                raise UsageError(f"{command} is a line magic: use %airgpu {command} (one %)")
            raise _unknown(command)
        if command not in SUBCOMMANDS + CELL_SUBCOMMANDS:
            raise _unknown(command)
        try:
            words, parameters = split_parameters(words)
            args = build_parser().parse_args(words)
            if parameters is not None:
                args.parameters = parameters
        except _HelpShown:
            return
        except AirgpuError as exc:
            raise UsageError(str(exc)) from None
        try:
            if command == "profile":
                self._profile(args, cell or "")
            else:
                getattr(self, f"_{command}")(args)
        except AirgpuError as exc:
            raise UsageError(str(exc)) from None
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:  # never a traceback from %airgpu: one line, as in the CLI
            first = " ".join(str(exc).split()) or "(no message)"
            raise UsageError(f"unexpected {type(exc).__name__}: {first} (a bug in airgpu-nb; "
                             "please report it)") from None

    # -- subcommands -------------------------------------------------------------------------

    def _status(self, args: argparse.Namespace) -> None:
        from .gpu import render_status, status, status_html

        info = status(include_tensorflow=args.tensorflow)
        display({"text/html": status_html(info), "text/plain": render_status(info)}, raw=True)

    def _use(self, args: argparse.Namespace) -> None:
        from .gpu import use_gpus

        message = use_gpus(args.ids, args.memory_growth, args.memory_limit)
        print(message)

    def _verify(self, args: argparse.Namespace) -> None:
        from .gpu import verify
        from .gpu_check import REPORT_MIME, render_text

        report = verify(args.gpus, args.allow_cpu)
        display({REPORT_MIME: report, "text/plain": render_text(report)}, raw=True)
        if not report["ok"]:
            raise UsageError(report["message"])

    def _promote(self, args: argparse.Namespace) -> None:
        from .dagbag import check_dag_import
        from .display import render_promotion
        from .promote import promote

        notebook = self.notebook_path(args.notebook)
        result = promote(notebook, **promote_options(args))
        result.write(force=args.force)
        check = check_dag_import(result.dag_file, result.spec.dag_id)
        display(render_promotion(result, check, self.stale_warning(notebook)), raw=True)

    def _run(self, args: argparse.Namespace) -> None:
        from .errors import RunError
        from .run import run_notebook

        notebook = self.notebook_path(args.notebook)
        warning = self.stale_warning(notebook)
        if warning:
            print(f"warning: {warning}")
        try:
            output = run_notebook(notebook, dict(args.parameters or []), output=args.output,
                                  allow_cpu=args.allow_cpu, progress_bar=args.progress)
        except RunError as exc:
            if exc.output_path:
                display(_link(Path(exc.output_path), "failed run"), raw=True)
            raise
        display(_link(output, "executed notebook"), raw=True)

    def _panel(self, args: argparse.Namespace) -> None:
        from .widgets import PromotionPanel

        notebook = self.notebook_path(args.notebook)
        options = promote_options(args)
        panel = PromotionPanel(notebook, dags_dir=options.pop("dags_dir", None), options=options,
                               force=args.force, warning_for=self.stale_warning)
        self.panels.append(panel)
        display(panel.widget)
        panel.dashboard.start_if_gpus()

    def _trigger(self, args: argparse.Namespace) -> None:
        from .magics_deploy import trigger

        trigger(args)

    def _runs(self, args: argparse.Namespace) -> None:
        from .magics_deploy import runs

        runs(args)

    def _profile(self, args: argparse.Namespace, cell: str) -> None:
        if args.interval <= 0:
            raise UsageError("--interval must be a positive number of seconds")
        from .profile import profile_cell

        self.last_profile = profile_cell(self.shell, cell, args.interval)

    # -- the notebook this kernel belongs to -------------------------------------------------

    def kernel_notebook(self) -> Path | None:
        """The notebook file this kernel was started for, if a front end said so."""
        ns = self.shell.user_ns
        for candidate in (ns.get("__vsc_ipynb_file__"), ns.get("__session__"),
                          os.environ.get("JPY_SESSION_NAME")):
            path = _as_notebook_file(candidate)
            if path is not None:
                return path
        return None

    def notebook_path(self, given: str | None) -> Path:
        if given:
            return Path(given).expanduser()
        found = self.kernel_notebook()
        if found is None:
            raise UsageError("cannot tell which notebook this kernel belongs to; pass "
                             "--notebook PATH")
        return found

    def stale_warning(self, notebook: Path) -> str | None:
        """Promotion reads the saved file: say so when this kernel's own notebook was last
        saved before the latest cell ran (its unsaved edits would be left out)."""
        own = self.kernel_notebook()
        if own is None or self._previous_start is None:
            return None
        try:
            if own.resolve() != notebook.resolve():
                return None
            saved = notebook.stat().st_mtime
        except OSError:
            return None
        if saved < self._previous_start:
            return (f"{notebook.name} was saved before the latest cell ran; unsaved edits are "
                    "not included. Save the notebook and promote again to include them.")
        return None


def _as_notebook_file(candidate: object) -> Path | None:
    if not isinstance(candidate, str) or not candidate.endswith(".ipynb"):
        return None
    path = Path(candidate).expanduser()
    for option in (path, Path.cwd() / path, Path.cwd() / path.name):
        if option.is_file():
            return option
    return None


def _link(path: Path, label: str) -> dict[str, str]:
    """A clickable link when the file is under the kernel's folder (what Jupyter can serve)."""
    text = f"{label}: {path}"
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return {"text/plain": text, "text/html": f"<p>{html.escape(text)}</p>"}
    href = html.escape(relative, quote=True)
    return {"text/plain": text, "text/html": f"<p>{html.escape(label)}: <a href='{href}' "
            f"target='_blank'>{html.escape(str(path))}</a></p>"}


# -- extension entry points ---------------------------------------------------------------------

def load(ipython: Any) -> None:
    """Register the magics (idempotent: a second load replaces the first)."""
    unload(ipython)
    AirgpuMagics.airgpu.__doc__ = help_text()
    magics = AirgpuMagics(ipython)
    ipython.register_magics(magics)
    ipython.events.register("pre_run_cell", magics._on_pre_run_cell)


def unload(ipython: Any) -> None:
    """Remove the magics, the execution-time hook and stop any dashboard threads."""
    manager = ipython.magics_manager
    old = manager.registry.pop("AirgpuMagics", None)
    for kind in ("line", "cell"):
        manager.magics[kind].pop("airgpu", None)
    if old is not None:
        for panel in old.panels:
            panel.close()
        with contextlib.suppress(ValueError):
            ipython.events.unregister("pre_run_cell", old._on_pre_run_cell)
