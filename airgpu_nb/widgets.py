"""``%airgpu panel``: the GPU dashboard (:mod:`airgpu_nb.dashboard`) above a one-click promotion
form (ipywidgets 8).

The logic lives in plain classes (:class:`GpuDashboard`, :class:`PromotionForm`) that tests drive
headless: set widget values, call ``button.click()``, read the result. Display is the magic's job.
The form is built from the settings table (:mod:`airgpu_nb.settings`) and reads its controls with
the table's own parsers, so the panel accepts exactly what ``airgpu promote`` accepts; one click
calls ``promote()`` (then the DagBag check). **Promote and run** (enabled when a deployment is
configured) promotes the same way, then adds a :class:`~airgpu_nb.runcard.RunCard` under the form
that deploys, runs and follows the DAG in a background thread.
"""

from __future__ import annotations

import ast
import html
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from . import settings as table
from .dashboard import GpuDashboard, Probe, nvml_probe
from .errors import AirgpuError, SpecError
from .promote import check_parameters
from .runcard import RunCard
from .spec import (
    SCHEDULE_PRESETS,
    normalise_schedule,
    safe_dag_id,
    validate_parameter,
    validate_schedule,
)

BUTTON_CLASS = "airgpu-promote-button"
RUN_BUTTON_CLASS = "airgpu-promote-run-button"
RESULT_CLASS = "airgpu-result"
CARRIED_CLASS = "airgpu-carried"

_NO_SCHEDULE = "none"
_CRON = "cron"
_NONE = ""

class PromotionForm:
    """The promotion form, built from the settings table: one control per row the panel shows,
    shown only for the targets that take it. ``errors()`` drives the button, ``settings()`` is
    the form as ``promote()`` options, ``promote()`` is the one click."""

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
        self._fields: dict[str, w.Widget] = {}
        for row in table.SETTINGS:
            if row.panel in ("text", "list", "choice", "check"):
                control = _control(row, o.get(row.name))
                setattr(self, row.name, control)
                self._fields[row.name] = control
        if not o.get("dag_id"):
            self.dag_id.value = safe_dag_id(self.notebook.stem)
        self.target.options = list(table.row("target").kind.choices())
        self.target.value = o.get("target") or "local"
        self._nb = nb
        for always_shown in ("target", "dag_id", "allow_cpu", "allow_new_parameters"):
            self._fields.pop(always_shown)
        schedule = normalise_schedule(o.get("schedule"))
        presets = sorted(SCHEDULE_PRESETS - {"@continuous"})
        self.schedule = w.Dropdown(
            options=[("none (trigger by hand)", _NO_SCHEDULE), *[(p, p) for p in presets],
                     ("cron expression…", _CRON)],
            value=(_NO_SCHEDULE if schedule is None else
                   schedule if schedule in presets else _CRON), description="schedule")
        self.cron = w.Text(value=schedule if self.schedule.value == _CRON else "",
                           placeholder="0 2 * * *", description="cron")
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
        self.carried = w.HTML(_carried_html(nb, self.notebook, self.base, self.dags_dir.value))
        self.carried.add_class(CARRIED_CLASS)
        self.messages = w.HTML()
        self.button = w.Button(description="Promote", button_style="primary", icon="rocket")
        self.button.add_class(BUTTON_CLASS)
        self.button.on_click(lambda _: self.promote())
        self.run_button = w.Button(description="Promote and run", icon="play")
        self.run_button.add_class(RUN_BUTTON_CLASS)
        self.run_button.on_click(lambda _: self.promote_and_run())
        self.cards: list[RunCard] = []
        self.runs_box = w.VBox()
        self.result = w.HTML()
        self.result.add_class(RESULT_CLASS)
        for control in (self.dag_id, self.schedule, self.cron, self.target, self.dags_dir,
                        *self._fields.values()):
            control.observe(self._changed, names="value")
        self.widget = w.VBox([
            w.HTML(f"<b>Promote</b> <code>{html.escape(str(self.notebook))}</code>"),
            self.dag_id, w.HBox([self.schedule, self.cron]), self.target,
            *self._fields.values(),
            w.HTML("parameters (Python literals; plain text stays a string)"), self.params_box,
            self.add_button, w.HBox([self.allow_new_parameters, self.allow_cpu, self.force]),
            self.dags_dir, self.carried,
            self.messages, w.HBox([self.button, self.run_button]), self.result, self.runs_box,
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
        target = self.target.value
        for name, control in self._fields.items():
            control.layout.display = None if table.row(name).takes(target) else "none"
        self.cron.layout.display = None if self.schedule.value == _CRON else "none"
        self.gpus.disabled = bool(self.mig.value) and table.row("mig").takes(target)
        problems = self.errors()
        self.button.disabled = bool(problems)
        deployment = _deployment_problem()
        self.run_button.disabled = bool(problems) or deployment is not None
        self.run_button.tooltip = (deployment or "promote, then deploy and run it on the Airflow "
                                   "deployment; a card follows the run")
        self.messages.value = "".join(f"<div style='color:#b00'>{html.escape(p)}</div>"
                                      for p in problems)

    def errors(self) -> list[str]:
        """What stops promotion, checked as the user types by the settings table's own
        parsers (promote() checks the rest)."""
        problems = []
        try:
            self._form_settings()
        except SpecError as exc:
            problems.append(str(exc))
        try:
            validate_schedule(normalise_schedule(self._schedule()))
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
        try:
            check_parameters(self._nb, self.notebook, self.parameters(),
                             self.allow_new_parameters.value)
        except SpecError as exc:
            problems.append(str(exc))
        if not self.dags_dir.value.strip():
            problems.append("give a DAGs dir")
        return problems

    def _schedule(self) -> str | None:
        return self.cron.value.strip() if self.schedule.value == _CRON else self.schedule.value

    def _form_settings(self) -> dict[str, Any]:
        """The visible controls as typed settings (``SpecError`` names the first bad one)."""
        target = self.target.value
        found: dict[str, Any] = {"target": target, "allow_cpu": self.allow_cpu.value,
                                 "allow_new_parameters": self.allow_new_parameters.value}
        dag_id = self.dag_id.value.strip()
        found["dag_id"] = table.row("dag_id").parse_text(dag_id, "DAG id")
        for name, control in self._fields.items():
            row = table.row(name)
            if row.takes(target):
                found[name] = _read(row, control)
        if found.get("mig") is not None:
            found["gpus"] = None  # a MIG slice is one slice
        return found

    def settings(self) -> dict[str, Any]:
        """The form as ``promote()`` options: the options it was opened with, overridden by
        what the form shows; settings the chosen target cannot take are dropped."""
        form = self._form_settings()
        target = form["target"]
        merged = {k: v for k, v in self.base.items()
                  if k not in table.BY_NAME or table.row(k).takes(target)}
        merged.update(form)
        for name in self._fields:  # a hidden field is not sent
            if not table.row(name).takes(target):
                merged[name] = None
        merged["schedule"] = self._schedule() or "none"
        merged["parameters"] = self.parameters()
        return merged

    # -- the click ---------------------------------------------------------------------------

    def promote(self) -> None:
        """Promote, write, check with DagBag, and say what happened in the result area."""
        from .dagbag import check_dag_import
        from .display import render_promotion
        from .promote import promote

        if self.errors():
            self._changed()
            return
        self.button.disabled = self.run_button.disabled = True
        self.last_result = None
        self.result.value = "<i>Promoting…</i>"
        try:
            settings = {**self.settings(), "dags_dir": self.dags_dir.value.strip()}
            result = promote(self.notebook, **settings).write(force=self.force.value)
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

    def promote_and_run(self) -> RunCard | None:
        """Promote, then add a run card that deploys, runs and follows the DAG in the background
        (the kernel is never blocked); each click adds a card."""
        from .airflow_api import load_config

        if self.errors() or _deployment_problem() is not None:
            self._changed()
            return None
        config = load_config()
        self.promote()
        if self.last_result is None:  # the result area says why
            return None
        card = RunCard(self.last_result.spec.dag_id)
        self.cards.append(card)
        self.runs_box.children = [*self.runs_box.children, card.widget]
        card.start(config, self.last_result.dag_file, self.parameters())
        return card


class PromotionPanel:
    """The dashboard above the form, as one widget."""

    def __init__(self, notebook: str | Path, *, dags_dir: str | None = None,
                 options: Mapping[str, Any] | None = None, force: bool = False,
                 warning_for: Callable[[Path], str | None] | None = None,
                 interval_s: float = 1.0, probe: Probe = nvml_probe) -> None:
        self.dashboard = GpuDashboard(interval_s, probe)
        self.form = PromotionForm(notebook, dags_dir=dags_dir, options=options, force=force,
                                  warning_for=warning_for)
        self.widget = w.VBox([self.dashboard.widget, self.form.widget])
        self.widget.add_class("airgpu-panel")

    def close(self) -> None:
        self.dashboard.stop()
        for card in self.form.cards:
            card.stop()


def _control(row: table.Setting, value: Any) -> w.Widget:
    """The panel control for one settings row, showing ``value``."""
    label = row.label or row.name.replace("_", " ")
    if row.panel == "check":
        return w.Checkbox(value=bool(value if value is not None else row.default),
                          description=label)
    if row.panel == "choice":
        choices = sorted(row.kind.choices())
        options = ([(row.unset_label, _NONE)]
                   if getattr(row.kind, "none_word", None) else [])
        return w.Dropdown(options=[*options, *choices] if not options else
                          [*options, *[(c, c) for c in choices]],
                          value=value if value is not None else (row.default or _NONE),
                          description=label)
    shown = value if value is not None else (row.default if row.name == "gpus" else None)
    if row.panel == "list":
        text = ", ".join(row.kind.check(shown)) if shown is not None else ""
    else:
        text = "" if shown is None else str(shown)
    return w.Text(value=text, description=label, placeholder=row.metavar or "")


def _read(row: table.Setting, control: w.Widget) -> Any:
    """A control's value through its row's parser (None: left empty)."""
    if row.panel == "check":
        return bool(control.value)
    if row.panel == "choice":
        return None if control.value == _NONE else control.value
    if row.panel == "list":
        items = [row.kind.item.from_text(i) for i in _split(control.value)]
        return items or None
    text = control.value.strip()
    return row.parse_text(text) if text else None


def _carried_html(nb: Any, notebook: Path, options: Mapping[str, Any], dags_dir: str) -> str:
    """What promotion will carry and check (files, packages), shown before the click."""
    from .bundle import plan

    try:
        notes = plan(nb, notebook, options.get("dag_id") or safe_dag_id(notebook.stem), options,
                     dags_dir).notes()
    except AirgpuError as exc:
        return _error_html(str(exc))
    if not notes:
        return "<i>carries nothing besides the notebook; imports no third-party package</i>"
    return "<ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>"


def _deployment_problem() -> str | None:
    """Why runs cannot go to a deployment (which settings to make), or None when configured."""
    from .airflow_api import load_config

    try:
        load_config()
    except AirgpuError as exc:
        return str(exc)
    return None


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
