"""``%airgpu`` line magic and ``%%airgpu profile`` cell magic: parse, dispatch to the core API,
show the result. An ``AirgpuError`` becomes a one-line ``UsageError`` here and nowhere else.

Importing this module imports neither TensorFlow nor Airflow: ``%airgpu use`` must run before
TensorFlow initialises, and loading the extension should be instant.
"""

from __future__ import annotations

import argparse
import base64
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

SUBCOMMANDS = ("status", "use", "verify", "promote", "run", "panel")
CELL_SUBCOMMANDS = ("profile",)

_INTRO = """airgpu: see and pick GPUs, profile a cell, and promote this notebook to an Airflow DAG.

Line magic  %airgpu SUBCOMMAND [options]   subcommands: status, use, verify, promote, run, panel
Cell magic  %%airgpu profile [--interval S]

  %airgpu status                  GPUs as NVML and TensorFlow see them, and CUDA_VISIBLE_DEVICES
  %airgpu use 0 --memory-growth   pick GPUs before TensorFlow initialises them
  %airgpu verify --gpus 1         the GPU check that promoted runs start with
  %airgpu promote --schedule @daily   write DAGS_DIR/<dag_id>.py and the prepared notebook
  %airgpu run -p epochs 2         run the notebook with papermill, exactly as the DAG task would
  %airgpu panel                   GPU dashboard and a one-click promotion form
  %%airgpu profile                run a cell while sampling GPU and CPU use

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
    sections = [_INTRO]
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
            args = build_parser().parse_args(words)
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

    # -- subcommands -------------------------------------------------------------------------

    def _status(self, args: argparse.Namespace) -> None:
        from .gpu import render_status, status

        info = status(include_tensorflow=args.tensorflow)
        display({"text/html": status_html(info), "text/plain": render_status(info)}, raw=True)

    def _use(self, args: argparse.Namespace) -> None:
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
        from .api import check_dag_import, render_promotion
        from .promote import promote

        notebook = self.notebook_path(args.notebook)
        result = promote(notebook, dags_dir=args.dags_dir, **promote_options(args))
        result.write(force=args.force)
        check = check_dag_import(result.dag_file, result.spec.dag_id)
        display(render_promotion(result, check, self.stale_warning(notebook)), raw=True)

    def _run(self, args: argparse.Namespace) -> None:
        from .api import run_notebook
        from .errors import RunError

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
        panel = PromotionPanel(notebook, dags_dir=args.dags_dir, options=promote_options(args),
                               force=args.force, warning_for=self.stale_warning)
        self.panels.append(panel)
        display(panel.widget)
        panel.dashboard.start_if_gpus()

    def _profile(self, args: argparse.Namespace, cell: str) -> None:
        if args.interval <= 0:
            raise UsageError("--interval must be a positive number of seconds")
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


# -- status and use, kept here because only the magics need them ------------------------------

def status_html(info: dict[str, Any]) -> str:
    """``gpu.status()`` as tables; every absent piece is said in words, not left blank."""
    e = html.escape
    nvml = info["nvml"]
    out = ["<div class='airgpu-status'>"]
    if nvml is None:
        out.append("<p><b>No NVIDIA GPU visible:</b> NVML is not available (no NVIDIA driver "
                   "here, or nvidia-ml-py is missing).</p>")
    else:
        out.append(f"<p>NVIDIA driver {e(str(nvml['driver_version']))} (CUDA "
                   f"{e(str(nvml['cuda_driver_version']))}), {len(nvml['devices'])} GPU(s)</p>")
        rows = []
        for d in nvml["devices"]:
            util = "n/a" if d["utilization_pct"] is None else f"{d['utilization_pct']}%"
            mig = {True: "on", False: "off", None: "n/a"}[d["mig_mode"]]
            rows.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                d["index"], d["name"], d["uuid"],
                f"{d['memory_used_mb']} / {d['memory_total_mb']} MiB", util, mig)) + "</tr>")
            rows.extend(f"<tr><td></td><td>MIG slice</td><td>{e(m['uuid'])}</td>"
                        f"<td>{m['memory_total_mb']} MiB</td><td></td><td></td></tr>"
                        for m in d["mig_devices"])
        out.append("<table><thead><tr><th>index</th><th>name</th><th>UUID</th><th>memory used"
                   "/total</th><th>utilisation</th><th>MIG mode</th></tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table>")
    tf_view = info.get("tensorflow")
    if tf_view is None:
        out.append("<p>TensorFlow: not checked.</p>")
    elif tf_view["version"] is None:
        out.append("<p>TensorFlow: not installed in this kernel's environment.</p>")
    else:
        gpus = ", ".join(tf_view["gpus"]) or "none"
        out.append("<table><tbody>" + "".join(
            f"<tr><th style='text-align:left'>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in (
                ("TensorFlow", tf_view["version"]),
                ("built with CUDA", tf_view["built_with_cuda"]),
                ("CUDA / cuDNN", f"{tf_view.get('cuda_version') or 'n/a'} / "
                                 f"{tf_view.get('cudnn_version') or 'n/a'}"),
                ("GPUs TensorFlow sees", gpus))) + "</tbody></table>")
    visible = info["cuda_visible_devices"]
    out.append(f"<p>CUDA_VISIBLE_DEVICES: <code>{e(visible)}</code></p>" if visible is not None
               else "<p>CUDA_VISIBLE_DEVICES: not set (every GPU is visible)</p>")
    out.append("</div>")
    return "".join(out)


def tensorflow_initialised() -> bool:
    """Whether TensorFlow in this process has created its runtime context (devices fixed).

    ``list_physical_devices`` does not count: visible devices can still change after it.
    """
    if "tensorflow" not in sys.modules:
        return False
    try:
        from tensorflow.python.eager import context
    except ImportError:  # pragma: no cover - a TensorFlow without the eager module
        return False
    ctx = context.context()
    flag = getattr(ctx, "_initialized", None)
    return bool(flag) if flag is not None else getattr(ctx, "_context_handle", None) is not None


def use_gpus(ids: str, memory_growth: bool = False, memory_limit_mb: int | None = None) -> str:
    """Pick GPUs for this kernel. Only the environment changes unless TensorFlow is already
    imported or a memory limit needs its API, so TensorFlow is not imported needlessly."""
    wanted = [part.strip() for part in ids.split(",") if part.strip()]
    hide = [w.lower() for w in wanted] in (["none"], ["-1"])
    for part in [] if hide else wanted:
        if not (part.isdigit() or part.startswith(("GPU-", "MIG-"))):
            raise AirgpuError(f"invalid GPU id {part!r}: use indices (0,1), UUIDs (GPU-..., "
                              "MIG-...) or 'none'")
    if not wanted:
        raise AirgpuError("give GPU ids, e.g. %airgpu use 0 or %airgpu use 0,1")
    if memory_limit_mb is not None and memory_limit_mb <= 0:
        raise AirgpuError("--memory-limit takes a positive number of MiB")
    if tensorflow_initialised():
        raise AirgpuError("TensorFlow has already initialised its GPUs in this kernel; restart "
                          "the kernel and run %airgpu use before anything that uses TensorFlow")
    visible = "-1" if hide else ",".join(wanted)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if memory_growth:
        os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    else:
        os.environ.pop("TF_FORCE_GPU_ALLOW_GROWTH", None)
    said = f"CUDA_VISIBLE_DEVICES={visible}"
    if "tensorflow" not in sys.modules and memory_limit_mb is None:
        growth = "; memory growth on" if memory_growth else ""
        return f"{said}{growth} (TensorFlow not imported yet: it will start with these GPUs)"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    chosen = gpus
    if hide:
        chosen = []
    elif len(gpus) > len(wanted) and all(w.isdigit() for w in wanted):
        # CUDA was initialised before the variable changed, so it still lists every GPU.
        chosen = [gpus[int(w)] for w in wanted if int(w) < len(gpus)]
    tf.config.set_visible_devices(chosen, "GPU")
    for gpu in chosen:
        if memory_growth:
            tf.config.experimental.set_memory_growth(gpu, True)
        elif memory_limit_mb is not None:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=memory_limit_mb)])
    names = ", ".join(g.name for g in chosen) or "none (TensorFlow sees no GPU here)"
    extra = ("; memory growth on" if memory_growth else
             f"; memory limit {memory_limit_mb} MiB per GPU" if memory_limit_mb else "")
    return f"{said}; TensorFlow GPUs: {names}{extra}"


# -- %%airgpu profile --------------------------------------------------------------------------

def profile_cell(shell: Any, cell: str, interval_s: float) -> dict[str, Any]:
    """Run ``cell`` in the user's namespace while the shared telemetry sampler watches this
    kernel and the GPUs; show the summary and a small timeline, return the summary."""
    try:
        from .telemetry import Sampler, summarise
    except ImportError:
        raise AirgpuError("the sampler (airgpu_nb.telemetry) is not available in this "
                          "installation") from None
    sampler = Sampler(interval_s=interval_s, pid=os.getpid())
    sampler.start()
    start = time.perf_counter()
    try:
        outcome = shell.run_cell(cell, store_history=False)
    finally:
        samples = sampler.stop()
    wall = time.perf_counter() - start
    summary = dict(summarise(samples, interval_s, duration_s=wall))
    summary["wall_s"] = round(wall, 3)
    summary["gpu_available"] = bool(sampler.gpu_available)
    summary["gpu_util_peak"] = max((g["util_pct"] for s in samples for g in s.get("gpus") or []
                                    if g.get("util_pct") is not None), default=None)
    summary["cell_failed"] = not outcome.success
    bundle = profile_bundle(summary)
    png = profile_plot(samples)
    if png is not None:
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
    display(bundle, raw=True)
    return summary


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def profile_bundle(summary: dict[str, Any]) -> dict[str, str]:
    """The profile summary as text and HTML; without a GPU it says so instead of zeros."""
    rows = [("wall time", _fmt(summary["wall_s"], " s", 2))]
    if summary["gpu_available"]:
        rows += [("GPU utilisation mean / p95 / peak",
                  f"{_fmt(summary.get('gpu_util_mean'), '%')} / "
                  f"{_fmt(summary.get('gpu_util_p95'), '%')} / "
                  f"{_fmt(summary.get('gpu_util_peak'), '%')}"),
                 ("GPU memory peak", _fmt(summary.get("gpu_mem_peak_mb"), " MiB", 0)),
                 ("GPU-seconds held", _fmt(summary.get("gpu_seconds"), " s", 2)),
                 ("GPU idle fraction", _fmt(summary.get("idle_fraction"), "", 2))]
    else:
        rows.append(("GPU", "no GPU: NVML sees no NVIDIA GPU here, so only CPU and memory "
                            "were sampled"))
    rows += [("kernel CPU mean / peak", f"{_fmt(summary.get('cpu_pct_mean'), '%')} / "
                                        f"{_fmt(summary.get('cpu_pct_peak'), '%')}"),
             ("kernel memory peak (RSS)", _fmt(summary.get("rss_peak_mb"), " MiB", 0))]
    if summary.get("cell_failed"):
        rows.append(("cell", "raised an error (shown above); the profile covers the run up to it"))
    text = "airgpu profile\n" + "\n".join(f"  {k:<34} {v}" for k, v in rows)
    table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
    return {"text/plain": text, "text/html": f"<div class='airgpu-profile'><b>airgpu profile"
            f"</b><table><tbody>{table}</tbody></table></div>"}


def profile_plot(samples: list[dict[str, Any]]) -> bytes | None:
    """A small PNG timeline (GPU utilisation and memory, kernel CPU), or None when there are
    too few samples to draw a line. Uses Figure directly: no pyplot state in the user's kernel."""
    if len(samples) < 2:
        return None
    import io

    from matplotlib.figure import Figure

    t0 = samples[0]["t"]
    times = [s["t"] - t0 for s in samples]
    fig = Figure(figsize=(6, 2.2), dpi=80)
    ax = fig.add_subplot()
    ax.plot(times, [s.get("cpu_pct") or 0 for s in samples], label="kernel CPU %", color="grey")
    indices = sorted({g["index"] for s in samples for g in s.get("gpus") or []})
    for index in indices:
        util = [next((g.get("util_pct") or 0 for g in s.get("gpus") or []
                      if g["index"] == index), 0) for s in samples]
        ax.plot(times, util, label=f"GPU {index} util %")
    ax.set_xlabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


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
