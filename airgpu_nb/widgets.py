"""``%airgpu panel``: a GPU dashboard and a one-click promotion form (ipywidgets 8).

The logic lives in plain classes (:class:`GpuDashboard`, :class:`PromotionForm`) that tests drive
headless: set widget values, call ``button.click()``, read the result. Display is the magic's job.
The form's settings go through the CLI's own promote parser, so the panel accepts exactly what
``airgpu promote`` accepts, and one click calls ``promote()`` (then the DagBag check).
"""

from __future__ import annotations

import ast
import html
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from .errors import AirgpuError, SpecError
from .spec import (
    KNOWN_MIG_PROFILES,
    SCHEDULE_PRESETS,
    normalise_schedule,
    parse_gpus,
    safe_dag_id,
    validate_dag_id,
    validate_parameter,
    validate_schedule,
)

DASHBOARD_CLASS = "airgpu-gpu-dashboard"
BUTTON_CLASS = "airgpu-promote-button"
RESULT_CLASS = "airgpu-result"

TARGETS = ("local", "compose", "docker", "kubernetes")
# The fields each target can use; the others are hidden so the form asks only what matters.
RELEVANT: Mapping[str, frozenset[str]] = {
    "local": frozenset({"gpus"}),
    "compose": frozenset({"gpus"}),
    "docker": frozenset({"gpus", "image"}),
    "kubernetes": frozenset({"gpus", "mig", "image", "node_selector", "tolerations"}),
}
_NO_SCHEDULE = "none"
_CRON = "cron"
_WHOLE_GPUS = ""

Probe = Callable[[], "dict[str, Any] | None"]


def _nvml_probe() -> dict[str, Any] | None:
    from .gpu_check import nvml_inventory

    return nvml_inventory()


class GpuDashboard:
    """A bar per GPU for utilisation and memory. A background thread only sets values of
    widgets made on the kernel's main thread; it never displays or creates anything."""

    def __init__(self, interval_s: float = 1.0, probe: Probe = _nvml_probe) -> None:
        self.interval_s = interval_s
        self.probe = probe
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = w.HTML()
        self.bars: dict[int, tuple[w.FloatProgress, w.FloatProgress, w.HTML]] = {}
        self.start_button = w.Button(description="Start", icon="play", tooltip="refresh live")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        rows = []
        inventory = self._read()
        for device in (inventory or {}).get("devices", []):
            util = w.FloatProgress(min=0, max=100, description="util %", bar_style="info")
            memory = w.FloatProgress(min=0, max=100, description="memory %", bar_style="warning")
            label = w.HTML(f"<b>GPU {device['index']}</b> {html.escape(device['name'])}")
            self.bars[device["index"]] = (util, memory, label)
            rows.append(w.HBox([label, util, memory]))
        self.widget = w.VBox([w.HTML("<b>GPUs</b>"), *rows, self.status,
                              w.HBox([self.start_button, self.stop_button])])
        self.widget.add_class(DASHBOARD_CLASS)
        self._show(inventory)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.probe()
        except Exception:  # a driver hiccup must not kill the refresh thread
            return None

    def _show(self, inventory: dict[str, Any] | None) -> None:
        if not inventory or not inventory.get("devices"):
            self.status.value = ("No GPU: NVML sees no NVIDIA GPU here (no driver, or "
                                 "nvidia-ml-py missing). Promotion still works.")
            return
        for device in inventory["devices"]:
            bars = self.bars.get(device["index"])
            if bars is None:
                continue
            util, memory, _ = bars
            util.value = float(device.get("utilization_pct") or 0)
            total = device.get("memory_total_mb") or 0
            memory.value = 100.0 * device.get("memory_used_mb", 0) / total if total else 0.0
            util.description = f"util {util.value:.0f}%"
            memory.description = f"mem {device.get('memory_used_mb', 0)} MiB"
        self.status.value = f"{len(inventory['devices'])} GPU(s), driver " \
                            f"{html.escape(str(inventory.get('driver_version')))}"

    def refresh(self) -> None:
        """Read the GPUs once and update the bars (what the thread does every interval)."""
        self._show(self._read())

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="airgpu-dashboard", daemon=True)
        self._thread.start()
        self.start_button.disabled, self.stop_button.disabled = True, False

    def start_if_gpus(self) -> None:
        if self.bars:
            self.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        self._thread = None
        self.start_button.disabled, self.stop_button.disabled = False, True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()


class PromotionForm:
    """The promotion form; ``errors()`` drives the button, ``promote()`` is the one click."""

    def __init__(self, notebook: str | Path, *, dags_dir: str | None = None,
                 options: Mapping[str, Any] | None = None, force: bool = False,
                 warning_for: Callable[[Path], str | None] | None = None) -> None:
        from .notebook import parameter_defaults, read_notebook
        from .promote import default_dags_dir

        self.notebook = Path(notebook)
        self.base = dict(options or {})
        self.warning_for = warning_for
        self.last_result: Any = None
        self._ready = False  # rows added while building must not validate a half-made form
        nb = read_notebook(self.notebook)  # NotebookError: the magic says why, in one line
        o = self.base
        extra = dict(o.get("options") or {})
        self.dag_id = w.Text(value=o.get("dag_id") or safe_dag_id(self.notebook.stem),
                             description="DAG id", continuous_update=True)
        schedule = normalise_schedule(o.get("schedule"))
        presets = sorted(SCHEDULE_PRESETS - {"@continuous"})
        self.schedule = w.Dropdown(
            options=[("none (trigger by hand)", _NO_SCHEDULE), *[(p, p) for p in presets],
                     ("cron expression…", _CRON)],
            value=(_NO_SCHEDULE if schedule is None else
                   schedule if schedule in presets else _CRON), description="schedule")
        self.cron = w.Text(value=schedule if self.schedule.value == _CRON else "",
                           placeholder="0 2 * * *", description="cron")
        from .targets import names

        targets = [*TARGETS, *[t for t in names() if t not in TARGETS]]
        self.target = w.Dropdown(options=targets, value=o.get("target") or "local",
                                 description="target")
        self.image = w.Text(value=o.get("image") or "", description="image",
                            placeholder="default runtime image")
        self.gpus = w.Text(value=str(o.get("gpus") if o.get("gpus") is not None else 1),
                           description="GPUs", placeholder="N or all")
        self.mig = w.Dropdown(options=[("whole GPUs", _WHOLE_GPUS),
                                       *[(p, p) for p in sorted(KNOWN_MIG_PROFILES)]],
                              value=o.get("mig") or _WHOLE_GPUS, description="MIG slice")
        self.node_selector = w.Text(value=_show_pairs(extra.get("node_selector")),
                                    description="node selector", placeholder="key=value, ...")
        self.tolerations = w.Text(value=_show_list(extra.get("tolerations")),
                                  description="tolerations",
                                  placeholder="key=value:NoSchedule, ...")
        self.allow_cpu = w.Checkbox(value=bool(o.get("allow_cpu")),
                                    description="allow CPU when no GPU")
        self.force = w.Checkbox(value=force, description="overwrite a hand-edited DAG")
        self.dags_dir = w.Text(value=str(dags_dir or default_dags_dir()), description="DAGs dir",
                               layout=w.Layout(width="40em"))
        defaults = {**parameter_defaults(nb), **dict(o.get("parameters") or {})}
        self.param_rows: list[tuple[w.Text, w.Text, w.HBox]] = []
        self.params_box = w.VBox()
        for name, value in defaults.items():
            self.add_parameter(name, repr(value))
        self.add_button = w.Button(description="add parameter", icon="plus")
        self.add_button.on_click(lambda _: self.add_parameter())
        self.messages = w.HTML()
        self.button = w.Button(description="Promote", button_style="primary", icon="rocket")
        self.button.add_class(BUTTON_CLASS)
        self.button.on_click(lambda _: self.promote())
        self.result = w.HTML()
        self.result.add_class(RESULT_CLASS)
        self._fields = {"image": self.image, "gpus": self.gpus, "mig": self.mig,
                        "node_selector": self.node_selector, "tolerations": self.tolerations}
        for control in (self.dag_id, self.schedule, self.cron, self.target, self.image,
                        self.gpus, self.mig, self.node_selector, self.tolerations, self.dags_dir):
            control.observe(self._changed, names="value")
        self.widget = w.VBox([
            w.HTML(f"<b>Promote</b> <code>{html.escape(str(self.notebook))}</code>"),
            self.dag_id, w.HBox([self.schedule, self.cron]), self.target, self.image,
            w.HBox([self.gpus, self.mig]), self.node_selector, self.tolerations,
            w.HTML("parameters (Python literals; plain text stays a string)"), self.params_box,
            self.add_button, w.HBox([self.allow_cpu, self.force]), self.dags_dir,
            self.messages, self.button, self.result,
        ])
        self._ready = True
        self._changed()

    # -- form state --------------------------------------------------------------------------

    def add_parameter(self, name: str = "", value: str = "") -> None:
        key = w.Text(value=name, placeholder="name", layout=w.Layout(width="12em"))
        val = w.Text(value=value, placeholder="value", layout=w.Layout(width="20em"))
        remove = w.Button(icon="trash", tooltip="remove", layout=w.Layout(width="3em"))
        row = w.HBox([key, val, remove])
        self.param_rows.append((key, val, row))
        remove.on_click(lambda _: self.remove_parameter(key))
        key.observe(self._changed, names="value")
        val.observe(self._changed, names="value")
        self.params_box.children = [r for _, _, r in self.param_rows]
        self._changed()

    def remove_parameter(self, key: w.Text) -> None:
        self.param_rows = [r for r in self.param_rows if r[0] is not key]
        self.params_box.children = [r for _, _, r in self.param_rows]
        self._changed()

    def parameters(self) -> dict[str, Any]:
        """Rows as values: a Python literal is read as one; anything else stays a string."""
        found: dict[str, Any] = {}
        for key, val, _ in self.param_rows:
            name = key.value.strip()
            if not name and not val.value.strip():
                continue
            found[name] = _literal(val.value)
        return found

    def _changed(self, _change: Any = None) -> None:
        if not self._ready:
            return
        relevant = RELEVANT.get(self.target.value, frozenset(RELEVANT["kubernetes"]))
        for name, control in self._fields.items():
            control.layout.display = None if name in relevant else "none"
        self.cron.layout.display = None if self.schedule.value == _CRON else "none"
        self.gpus.disabled = bool(self.mig.value) and "mig" in relevant
        problems = self.errors()
        self.button.disabled = bool(problems)
        self.messages.value = "".join(f"<div style='color:#b00'>{html.escape(p)}</div>"
                                      for p in problems)

    def errors(self) -> list[str]:
        """What stops promotion, checked as the user types (promote() checks the rest)."""
        problems = []
        for check in (lambda: validate_dag_id(self.dag_id.value.strip()),
                      lambda: validate_schedule(normalise_schedule(self._schedule())),
                      lambda: parse_gpus(self.gpus.value.strip())):
            try:
                check()
            except SpecError as exc:
                problems.append(str(exc))
        if self.schedule.value == _CRON and not self.cron.value.strip():
            problems.append("type a cron expression, e.g. 0 2 * * *")
        names = [key.value.strip() for key, _, _ in self.param_rows]
        for name, value in self.parameters().items():
            try:
                validate_parameter(name, value)
            except SpecError as exc:
                problems.append(str(exc))
        duplicates = sorted({n for n in names if n and names.count(n) > 1})
        if duplicates:
            problems.append(f"parameter {duplicates[0]!r} is listed twice")
        if not self.dags_dir.value.strip():
            problems.append("give a DAGs dir")
        return problems

    def _schedule(self) -> str | None:
        return self.cron.value.strip() if self.schedule.value == _CRON else self.schedule.value

    def settings(self) -> dict[str, Any]:
        """The form as ``promote()`` options, parsed by the CLI's own promote parser."""
        from .cli import _Parser, add_promote_options, promote_options

        relevant = RELEVANT.get(self.target.value, RELEVANT["kubernetes"])
        argv = ["--target", self.target.value, "--dag-id", self.dag_id.value.strip(),
                "--schedule", self._schedule() or "none"]
        if "mig" in relevant and self.mig.value:
            argv += ["--mig", self.mig.value]
        else:
            argv += ["--gpus", self.gpus.value.strip()]
        if self.allow_cpu.value:
            argv.append("--allow-cpu")
        if "image" in relevant and self.image.value.strip():
            argv += ["--image", self.image.value.strip()]
        for item in _split(self.node_selector.value) if "node_selector" in relevant else []:
            argv += ["--node-selector", item]
        for item in _split(self.tolerations.value) if "tolerations" in relevant else []:
            argv += ["--toleration", item]
        parser = _Parser(prog="airgpu panel", add_help=False)
        add_promote_options(parser)
        form = promote_options(parser.parse_args(argv))
        merged = {**self.base, **{k: v for k, v in form.items() if v is not None}}
        extra = {k: v for k, v in dict(self.base.get("options") or {}).items()
                 if k not in ("node_selector", "tolerations")}
        extra.update(form.get("options") or {})
        if "options" in merged or extra:
            merged["options"] = extra or None
        if "image" not in relevant:
            merged["image"] = None
        merged["gpus"], merged["mig"] = form["gpus"], form["mig"]
        merged["allow_cpu"] = self.allow_cpu.value
        merged["parameters"] = self.parameters()
        return merged

    # -- the click ---------------------------------------------------------------------------

    def promote(self) -> None:
        """Promote, write, check with DagBag, and say what happened in the result area."""
        from .api import check_dag_import, render_promotion
        from .promote import promote

        if self.errors():
            self._changed()
            return
        self.button.disabled = True
        self.result.value = "<i>Promoting…</i>"
        try:
            result = promote(self.notebook, dags_dir=self.dags_dir.value.strip(),
                             **self.settings()).write(force=self.force.value)
            self.result.value = render_promotion(result, None)["text/html"] + \
                "<p><i>Checking the DAG with Airflow's DagBag…</i></p>"
            check = check_dag_import(result.dag_file, result.spec.dag_id)
            warning = self.warning_for(self.notebook) if self.warning_for else None
            self.result.value = render_promotion(result, check, warning)["text/html"]
            self.last_result = result
        except AirgpuError as exc:
            self.result.value = _error_html(str(exc))
        except Exception as exc:  # never a traceback in the panel: say what broke, plainly
            first = (str(exc).strip().splitlines() or [""])[0]
            self.result.value = _error_html(f"unexpected {type(exc).__name__}: {first}")
        finally:
            self._changed()


class PromotionPanel:
    """The dashboard above the form, as one widget."""

    def __init__(self, notebook: str | Path, *, dags_dir: str | None = None,
                 options: Mapping[str, Any] | None = None, force: bool = False,
                 warning_for: Callable[[Path], str | None] | None = None,
                 interval_s: float = 1.0, probe: Probe = _nvml_probe) -> None:
        self.dashboard = GpuDashboard(interval_s, probe)
        self.form = PromotionForm(notebook, dags_dir=dags_dir, options=options, force=force,
                                  warning_for=warning_for)
        self.widget = w.VBox([self.dashboard.widget, self.form.widget])
        self.widget.add_class("airgpu-panel")

    def close(self) -> None:
        self.dashboard.stop()


def _error_html(message: str) -> str:
    return (f"<p style='color:#b00'><b>Could not promote:</b> {html.escape(message)}</p>")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _show_pairs(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return _show_list(value)


def _show_list(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    items = []
    for item in value:
        if isinstance(item, Mapping):
            text = str(item.get("key", ""))
            if item.get("value"):
                text += f"={item['value']}"
            if item.get("effect"):
                text += f":{item['effect']}"
            items.append(text)
        else:
            items.append(str(item))
    return ", ".join(items)
