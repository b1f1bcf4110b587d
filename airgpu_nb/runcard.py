"""The panel's run card: one run of a promoted DAG on the Airflow deployment, live (ipywidgets 8).

``RunCard`` is made on the kernel's main thread; ``start()`` hands the work (deploy this version
of the DAG file, start a run, follow it) to a background thread that only ever sets values of the
card's widgets, never creates or displays one (the rule of :mod:`airgpu_nb.dashboard`), so the
kernel stays free while the run goes on. Any error ends the card with one readable line.
"""

from __future__ import annotations

import html
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from .airflow_api import AirflowClient, AirflowConfig
from .errors import AirgpuError

CARD_CLASS = "airgpu-run-card"
STATE_CLASS = "airgpu-run-state"
#: Telemetry summary keys shown on the card, in this order, with their units.
SUMMARY = (("gpu_util_mean", "GPU util mean", " %", 1), ("gpu_util_p95", "p95", " %", 1),
           ("gpu_mem_peak_mb", "GPU mem peak", " MiB", 0), ("gpu_seconds", "GPU-seconds", "", 1),
           ("cpu_pct_mean", "CPU mean", " %", 1), ("duration_s", "duration", " s", 1))
_COLOURS = {"success": "#080", "failed": "#b00", "error": "#b00", "running": "#06c",
            "queued": "#a60"}


class RunCard:
    """State, elapsed time, try number and UI link while the run goes on; at the end the
    executed notebook, the telemetry summary and the per-cell report, or the failing cell."""

    def __init__(self, dag_id: str, *, poll_s: float = 1.0) -> None:
        self.dag_id = dag_id
        self.poll_s = poll_s
        self.state = "starting"
        self.run_id: str | None = None
        self.result: Any = None  # watch.RunResult once the run ended
        self.error: str | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self.title = w.HTML(f"<b>Run of {html.escape(dag_id)}</b>")
        self.state_label = w.HTML()
        self.state_label.add_class(STATE_CLASS)
        self.elapsed = w.HTML()
        self.attempt = w.HTML()
        self.link = w.HTML()
        self.progress = w.HTML()  # the latest line of deploy/trigger progress
        self.details = w.HTML()
        self.report = w.HTML()
        self.widget = w.VBox([w.HBox([self.title, self.state_label, self.elapsed, self.attempt]),
                              self.link, self.progress, self.details, self.report],
                             layout=w.Layout(border="1px solid #ccc", padding="4px",
                                             margin="4px 0"))
        self.widget.add_class(CARD_CLASS)
        self._set_state("starting")

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the card has ended (tests and scripts; never the panel)."""
        return self._finished.wait(timeout)

    def start(self, config: AirflowConfig, dag_file: str | os.PathLike[str],
              params: Mapping[str, Any] | None = None) -> None:
        """Deploy ``dag_file``, start a run with ``params`` and follow it, in the background."""
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._work, args=(config, Path(dag_file), dict(params or {})),
            name=f"airgpu-run-{self.dag_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following (the run goes on in Airflow)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s + 1)

    # -- the background thread: values only ---------------------------------------------------

    def _work(self, config: AirflowConfig, dag_file: Path, params: dict[str, Any]) -> None:
        from .watch import start_run

        try:
            with AirflowClient(config) as client:
                self._set_state("deploying")
                run = start_run(client, self.dag_id, params, dag_file=dag_file,
                                echo=self._echo)
                self.run_id = str(run["dag_run_id"])
                url = client.ui_url(self.dag_id, self.run_id)
                self.link.value = (f"run <a href='{html.escape(url, quote=True)}' "
                                   f"target='_blank'>{html.escape(self.run_id)}</a>")
                self._follow(client)
        except AirgpuError as exc:
            self._end_with_error(str(exc))
        except Exception as exc:  # never a traceback in the kernel: one plain line
            first = (str(exc).strip().splitlines() or [""])[0]
            self._end_with_error(config.scrub(f"unexpected {type(exc).__name__}: {first}"))
        finally:
            self._tick()
            self._finished.set()

    def _follow(self, client: AirflowClient) -> None:
        from .watch import ENDED, watch

        assert self.run_id is not None
        while not self._stop.is_set():
            run = client.dag_run(self.dag_id, self.run_id)
            tasks = client.task_instances(self.dag_id, self.run_id)
            tries = [f"{ti['task_id']}: try {ti['try_number']} of "
                     f"{int(ti.get('max_tries') or 0) + 1}" for ti in tasks if ti.get("try_number")]
            self.attempt.value = html.escape("; ".join(tries))
            self._tick()
            state = str(run.get("state"))
            if state in ENDED:  # shown with its details, once watch() has read them
                break
            self._set_state(state)
            self._stop.wait(self.poll_s)
        if self._stop.is_set():
            self.progress.value = "<i>stopped following; the run goes on in Airflow</i>"
            return
        result = watch(client, self.dag_id, self.run_id, poll=self.poll_s)  # one read
        self._show_result(result)
        self.result = result
        self._set_state(result.state)  # last: a card that says it ended shows everything

    def _show_result(self, result: Any) -> None:
        rows = []
        if result.executed_notebook:
            rows.append(("executed notebook", f"<code>{html.escape(result.executed_notebook)}"
                                              "</code>"))
        if result.failure and not result.ok:
            rows.append(("failure", f"<span style='color:#b00'>"
                                    f"{html.escape(result.failure)}</span>"))
        telemetry = result.result.get("telemetry") if isinstance(result.result, dict) else None
        if isinstance(telemetry, dict):
            rows.append(("telemetry", html.escape(summary_line(telemetry))))
        if result.duration_s is not None:
            queued = f" (queued {result.queued_s:.1f} s)" if result.queued_s is not None else ""
            rows.append(("run", f"{result.duration_s:.1f} s{queued}"))
        self.details.value = "<table>" + "".join(
            f"<tr><td><b>{label}</b></td><td>{value}</td></tr>" for label, value in rows) + \
            "</table>"
        self.progress.value = ""
        self.report.value = _report_html(result.executed_notebook)

    # -- values ------------------------------------------------------------------------------

    def _echo(self, line: str) -> None:
        self.progress.value = f"<i>{html.escape(line)}</i>"
        self._tick()

    def _tick(self) -> None:
        self.elapsed.value = f"{time.monotonic() - self._started:.0f} s"

    def _set_state(self, state: str) -> None:
        self.state = state
        colour = _COLOURS.get(state, "#555")
        self.state_label.value = f"<b style='color:{colour}'>{html.escape(state)}</b>"

    def _end_with_error(self, message: str) -> None:
        self.error = " ".join(message.split())
        self._set_state("error")
        self.progress.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"


def summary_line(telemetry: Mapping[str, Any]) -> str:
    """The telemetry summary of the run's XCom as one line; says so when no GPU was sampled."""
    parts = []
    for key, label, unit, digits in SUMMARY:
        value = telemetry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {value:.{digits}f}{unit}")
    if not telemetry.get("gpu_count"):
        parts.append("no GPU sampled")
    return ", ".join(parts) or "no samples"


def _report_html(executed: str | None) -> str:
    """``airgpu report``'s table when the executed notebook is readable from here (a shared
    folder); else nothing: the notebook is on the worker."""
    if not executed or not Path(executed).is_file():
        return ""
    from .report import render_text, report

    try:
        text = render_text(report(executed))
    except Exception:  # best effort: no telemetry there; the summary above says what there is
        return ""
    return f"<pre style='font-size:85%'>{html.escape(text)}</pre>"
