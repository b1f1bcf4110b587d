"""The GPU dashboard at the top of ``%airgpu panel``: a bar per GPU for utilisation and memory,
refreshed by a background thread that only ever sets widget values."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

DASHBOARD_CLASS = "airgpu-gpu-dashboard"

Probe = Callable[[], "dict[str, Any] | None"]


def nvml_probe() -> dict[str, Any] | None:
    from .gpu_check import nvml_inventory

    return nvml_inventory()


class GpuDashboard:
    """A bar per GPU for utilisation and memory. A background thread only sets values of
    widgets made on the kernel's main thread; it never displays or creates anything."""

    def __init__(self, interval_s: float = 1.0, probe: Probe = nvml_probe) -> None:
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
