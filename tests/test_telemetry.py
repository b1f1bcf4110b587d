"""GPU telemetry: the sampler, the `airgpu` papermill engine, metrics and the idle-GPU warning.

Notebooks run for real (papermill, nbclient, an IPython kernel). There is no GPU here, so the
only stand-in is a fake ``pynvml`` module for the NVML part of the sampler.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from prometheus_client.parser import text_string_to_metric_families

from airgpu_nb import metrics
from airgpu_nb.airflow_task import run_notebook_task
from airgpu_nb.errors import RunError
from airgpu_nb.idle import apply_idle_note, idle_threshold_from_env, warn_if_idle
from airgpu_nb.keys import IDLE_TAG
from airgpu_nb.run import execute
from airgpu_nb.telemetry import Sampler, interval_from_env
from airgpu_nb.timeline import annotate, percentile, summarise

MB = 2**20


# -- a stand-in for NVML (no GPU can exist on this machine) --------------------------------


class FakeNvml(types.ModuleType):
    """Enough of pynvml for the sampler: whole GPUs, and GPUs in MIG mode with slices."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, gpus: list[dict]) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.calls: dict[str, int] = {}
        self.initialised = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict:
        self._count("handle")
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: dict) -> str:
        return handle["uuid"]

    def nvmlDeviceGetMigMode(self, handle: dict) -> tuple[int, int]:
        if "slices" not in handle:
            raise self.NVMLError_NotSupported("not supported")
        return (1, 1)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: dict) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: dict, slot: int) -> dict:
        if slot >= len(handle["slices"]):
            raise self.NVMLError("not found")
        return handle["slices"][slot]

    def nvmlDeviceGetMemoryInfo(self, handle: dict) -> SimpleNamespace:
        return SimpleNamespace(used=handle["used_mb"] * MB, total=handle["total_mb"] * MB)

    def nvmlDeviceGetUtilizationRates(self, handle: dict) -> SimpleNamespace:
        self._count("util")
        if handle.get("util") is None:
            raise self.NVMLError_NotSupported("not supported")
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: dict) -> int:
        if handle.get("power_mw") is None:
            raise self.NVMLError_NotSupported("not supported")
        return handle["power_mw"]


def whole_gpu(uuid: str = "GPU-aaaa", util: float = 80, used_mb: int = 1000) -> dict:
    return {"uuid": uuid, "util": util, "used_mb": used_mb, "total_mb": 81559,
            "power_mw": 250_000}


def mig_gpu(uuid: str = "GPU-bbbb") -> dict:
    return {"uuid": uuid, "util": None, "used_mb": 0, "total_mb": 81559, "power_mw": None,
            "slices": [{"uuid": f"MIG-s{i}", "util": None, "used_mb": 100 * (i + 1),
                        "total_mb": 9984, "power_mw": None} for i in range(2)]}


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(gpus: list[dict]) -> FakeNvml:
        fake = FakeNvml(gpus)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


# -- the sampler -----------------------------------------------------------------------------


def test_sampler_measures_the_process_tree_and_reports_no_gpu_without_nvml():
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        with Sampler(interval_s=0.1) as sampler:
            sampler.mark("spin")
            child.wait(timeout=10)
    finally:
        child.kill()
    samples = sampler.samples
    assert sampler.gpu_available is False  # NVML cannot initialise without a driver
    assert len(samples) >= 8
    assert all(s["gpus"] == [] for s in samples)
    assert samples[0]["t"] < 0.05 and samples[-1]["t"] >= 1.4
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    # The busy child is part of the measured tree; this process alone sleeps.
    assert max(s["cpu_pct"] for s in samples) > 40
    assert all(s["rss_mb"] > 5 for s in samples)
    assert sampler.marks[0]["label"] == "spin" and sampler.marks[0]["t"] < 0.1
    assert sampler.cpu_time_s < 0.02 * samples[-1]["t"]


def test_sampler_reads_nvml_once_per_device_and_mig_slices_have_no_utilisation(fake_nvml):
    fake = fake_nvml([whole_gpu(), mig_gpu()])
    with Sampler(interval_s=0.02) as sampler:
        time.sleep(0.2)
    assert sampler.gpu_available
    assert fake.initialised == 0  # shut down again
    assert fake.calls["handle"] == 2  # handles opened once, not per sample
    first, last = sampler.samples[0]["gpus"], sampler.samples[-1]["gpus"]
    assert [g["uuid"] for g in last] == ["GPU-aaaa", "MIG-s0", "MIG-s1"]
    assert last[0] == {"index": 0, "uuid": "GPU-aaaa", "util_pct": 80.0, "mem_used_mb": 1000.0,
                       "mem_total_mb": 81559.0, "power_w": 250.0}
    assert last[1] == {"index": 1, "uuid": "MIG-s0", "util_pct": None, "mem_used_mb": 100.0,
                       "mem_total_mb": 9984.0, "power_w": None}
    assert first == last
    # "not supported" is remembered: each slice is asked once, the whole GPU every sample.
    assert fake.calls["util"] == len(sampler.samples) + 2


@pytest.mark.parametrize(("visible", "uuids"), [
    ("0", ["GPU-aaaa"]),
    ("1", ["MIG-s0", "MIG-s1"]),
    ("MIG-s1", ["MIG-s1"]),
    ("GPU-aaaa,1", ["GPU-aaaa", "MIG-s0", "MIG-s1"]),
    ("-1", []),
])
def test_sampler_follows_cuda_visible_devices(fake_nvml, monkeypatch, visible, uuids):
    fake_nvml([whole_gpu(), mig_gpu()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    sampler = Sampler(interval_s=10).start()
    samples = sampler.stop()
    assert [g["uuid"] for g in samples[-1]["gpus"]] == uuids


def test_summarise_gpu_figures():
    def sample(t, utils, mem=(1000, 3000)):
        return {"t": t, "cpu_pct": 50.0 * t, "rss_mb": 100 + t,
                "gpus": [{"index": i, "uuid": f"GPU-{i}", "util_pct": u, "mem_used_mb": m,
                          "mem_total_mb": 8000, "power_w": None}
                         for i, (u, m) in enumerate(zip(utils, mem, strict=True))]}
    samples = [sample(0, [0, 2]), sample(1, [10, 50], (2000, 5000)), sample(2, [90, 100])]
    s = summarise(samples, 1.0)
    assert s["samples"] == 3 and s["duration_s"] == 2.0 and s["gpu_count"] == 2
    assert s["gpu_util_mean"] == pytest.approx(252 / 6, abs=0.01)
    assert s["gpu_util_p95"] == 100.0
    assert s["idle_fraction"] == pytest.approx(2 / 6, abs=0.001)  # 0 and 2 are under 5 %
    assert s["gpu_mem_peak_mb"] == 7000.0  # summed over the run's GPUs at its peak
    assert s["gpu_seconds"] == 4.0  # 2 GPUs x 2 s
    assert (s["cpu_pct_mean"], s["cpu_pct_peak"], s["rss_peak_mb"]) == (50.0, 100.0, 102.0)
    assert summarise(samples[:1], 1.0, duration_s=0.3)["duration_s"] == 0.3
    assert percentile([3, 1, 2], 50) == 2.0


def test_summarise_without_gpu_data_and_with_mig_slices():
    cpu_only = summarise([{"t": 0, "cpu_pct": 10, "rss_mb": 5, "gpus": []},
                          {"t": 1, "cpu_pct": 30, "rss_mb": 6, "gpus": []}], 1.0)
    assert all(cpu_only[k] is None for k in ("gpu_util_mean", "gpu_util_p95", "gpu_mem_peak_mb",
                                             "gpu_seconds", "idle_fraction"))
    assert cpu_only["cpu_pct_mean"] == 20.0 and cpu_only["gpu_count"] == 0
    mig = summarise([{"t": t, "cpu_pct": 1, "rss_mb": 1, "gpus": [
        {"index": 0, "uuid": "MIG-x", "util_pct": None, "mem_used_mb": 300.0 * (t + 1),
         "mem_total_mb": 9984, "power_w": None}]} for t in range(3)], 1.0)
    assert mig["gpu_util_mean"] is None and mig["idle_fraction"] is None
    assert mig["gpu_mem_peak_mb"] == 900.0 and mig["gpu_seconds"] == 2.0


def test_interval_and_threshold_come_from_the_environment(caplog):
    assert interval_from_env({}) == 1.0
    assert interval_from_env({"AIRGPU_TELEMETRY_INTERVAL": "0.25"}) == 0.25
    with caplog.at_level(logging.WARNING):
        assert interval_from_env({"AIRGPU_TELEMETRY_INTERVAL": "fast"}) == 1.0
        assert interval_from_env({"AIRGPU_TELEMETRY_INTERVAL": "0"}) == 1.0
    assert "AIRGPU_TELEMETRY_INTERVAL" in caplog.text
    assert idle_threshold_from_env({"AIRGPU_IDLE_THRESHOLD": "35"}) == 35.0
    assert idle_threshold_from_env({}) == 20.0


def test_engine_module_imports_first_cheaply_and_papermill_still_registers_it():
    code = ("import sys, airgpu_nb.engine\n"
            "assert 'papermill' not in sys.modules and 'psutil' not in sys.modules\n"
            "from papermill.engines import papermill_engines, NBClientEngine\n"
            "cls = papermill_engines.get_engine('airgpu')\n"
            "assert issubclass(cls, NBClientEngine) and cls is airgpu_nb.engine.AirgpuEngine\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


# -- real runs -------------------------------------------------------------------------------


def prepared_notebook(path: Path, *sources: str, gpus: int | str = 1) -> Path:
    """A notebook with promotion settings recorded, as `airgpu promote` leaves them."""
    from conftest import write_notebook

    path.parent.mkdir(parents=True, exist_ok=True)
    write_notebook(path, *sources)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["airgpu"] = {"settings": {"dag_id": "tele_dag", "gpus": gpus, "mig": None}}
    nbformat.write(nb, path)
    return path


def cell_telemetry(nb, index: int) -> dict:
    return nb.cells[index].metadata["airgpu"]["telemetry"]


@pytest.fixture
def fast_sampling(monkeypatch):
    monkeypatch.setenv("AIRGPU_TELEMETRY_INTERVAL", "0.2")
    monkeypatch.delenv("AIRGPU_PUSHGATEWAY_URL", raising=False)


def test_dag_task_records_timeline_per_cell_xcom_and_prometheus_file(tmp_path, fast_sampling):
    prepared_notebook(tmp_path / "dags" / "train.ipynb", "x = 1",
                      "import time\ntime.sleep(2.5)", "y = x + 1", gpus=0)
    dag_file = tmp_path / "dags" / "tele_dag.py"
    config = {"dag_id": "tele_dag", "name": "train.ipynb", "prepared": "train.ipynb",
              "kernel": "python3", "output_dir": str(tmp_path / "out"), "telemetry": True}
    context = {"ti": SimpleNamespace(try_number=1, task_id="run_notebook"),
               "run_id": "manual__2026-01-01T00:00:00+00:00", "params": {}}

    xcom = run_notebook_task(str(dag_file), config, context)

    executed = Path(xcom["executed_notebook"])
    nb = nbformat.read(executed, as_version=4)
    meta = nb.metadata["airgpu"]
    assert meta["settings"]["dag_id"] == "tele_dag"  # merged, not overwritten
    telemetry = meta["telemetry"]
    assert telemetry["interval_s"] == 0.2 and telemetry["gpu_available"] is False
    assert set(telemetry) >= {"interval_s", "samples", "summary"}
    summary = telemetry["summary"]
    assert 2.5 <= summary["duration_s"] < 6 and summary["samples"] == len(telemetry["samples"])
    assert summary["gpu_util_mean"] is None and summary["cpu_pct_mean"] is not None
    assert summary["rss_peak_mb"] > 20  # an IPython kernel, not an empty tree

    quick, sleeper, after = cell_telemetry(nb, 0), cell_telemetry(nb, 1), cell_telemetry(nb, 2)
    assert 2.4 <= sleeper["duration_s"] < 4
    assert sleeper["samples"] >= 10  # ~2.5 s of 0.2 s samples belong to the sleeping cell
    assert quick["samples"] <= 1 and quick["duration_s"] < 0.5
    assert quick["end_s"] <= sleeper["start_s"] < sleeper["end_s"] <= after["start_s"]
    in_span = [s for s in telemetry["samples"]
               if sleeper["start_s"] <= s["t"] <= sleeper["end_s"]]
    assert len(in_span) == sleeper["samples"]

    # XCom: small, and the same summary the notebook carries.
    assert xcom["ok"] is True and xcom["telemetry"] == summary
    assert len(json.dumps(xcom)) < 1000

    prom = executed.with_name("train.prom")
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    duration = families["airgpu_run_duration_seconds"].samples[0]
    assert duration.labels == {"dag": "tele_dag", "task": "run_notebook",
                               "run": "manual__2026-01-01T00:00:00+00:00"}
    assert duration.value == pytest.approx(summary["duration_s"])
    assert families["airgpu_run_samples"].samples[0].value == summary["samples"]
    assert families["airgpu_run_cpu_utilization_peak_percent"].samples[0].value == \
        pytest.approx(summary["cpu_pct_peak"])
    assert "airgpu_gpu_utilization_mean" not in families  # no GPU, no invented GPU series


def test_failing_cell_keeps_partial_timeline_and_its_own_summary(tmp_path, fast_sampling):
    source = prepared_notebook(tmp_path / "fails.ipynb", "x = 1",
                               "import time\ntime.sleep(0.8)\nraise ValueError('boom')",
                               "never = True")
    output = tmp_path / "out" / "run-1" / "fails.ipynb"
    with pytest.raises(RunError, match="ValueError"):
        execute(source, output)
    nb = nbformat.read(output, as_version=4)
    telemetry = nb.metadata["airgpu"]["telemetry"]
    assert telemetry["samples"] and telemetry["summary"]["duration_s"] >= 0.8
    cells = {c.source: c for c in nb.cells if c.cell_type == "code"}
    failed = cells["import time\ntime.sleep(0.8)\nraise ValueError('boom')"]
    assert failed.metadata["papermill"]["exception"] is True
    failed_summary = failed.metadata["airgpu"]["telemetry"]
    assert 0.8 <= failed_summary["duration_s"] < 3 and failed_summary["samples"] >= 3
    assert "airgpu" not in cells["never = True"].metadata  # it never ran
    assert output.with_name("fails.prom").is_file()  # failed runs are measured too


def test_idle_gpu_run_gets_warning_note_and_log(tmp_path, fast_sampling, fake_nvml, caplog):
    fake_nvml([whole_gpu(util=2, used_mb=500)])
    source = prepared_notebook(tmp_path / "idle.ipynb", "x = 1",
                               "import time\ntime.sleep(1.2)  # waiting on input")
    output = tmp_path / "out" / "run-1" / "idle.ipynb"
    with caplog.at_level(logging.WARNING, logger="airgpu_nb.idle"):
        outcome = execute(source, output)
    assert outcome.telemetry["gpu_util_mean"] == 2.0 and outcome.telemetry["gpu_count"] == 1
    nb = nbformat.read(output, as_version=4)
    note = nb.cells[0]
    assert note.cell_type == "markdown" and note.metadata["tags"] == [IDLE_TAG]
    assert "Mean utilisation was 2.0 %" in note.source and "warning under 20 %" in note.source
    assert "`import time`: 2.0 % over 1.2 s" in note.source  # the least busy cell, named
    for advice in ("Larger batches", "prefetch", "--mig 1g.10gb", "Fewer GPUs"):
        assert advice in note.source
    assert sum(IDLE_TAG in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert "GPU mostly idle" in caplog.text and "In [2]" in caplog.text
    families = {f.name: f for f in text_string_to_metric_families(
        output.with_name("idle.prom").read_text())}
    util = families["airgpu_gpu_utilization_mean"].samples[0]
    assert util.value == 2.0 and util.labels["gpu"] == "0" and util.labels["UUID"] == "GPU-aaaa"
    assert families["airgpu_gpu_memory_used_peak_mib"].samples[0].value == 500.0
    assert families["airgpu_gpu_power_usage_mean_watts"].samples[0].value == 250.0


# -- the idle decision on synthetic timelines -----------------------------------------------


def synthetic_run(util: float | None, gpus_requested: int | str = 1, with_gpu: bool = True):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("load()"),
                                         nbformat.v4.new_code_cell("model.fit(ds)")])
    nb.metadata["airgpu"] = {"settings": {"gpus": gpus_requested, "mig": None}}
    gpus = ([{"index": 0, "uuid": "GPU-a", "util_pct": util, "mem_used_mb": 100.0,
              "mem_total_mb": 8000.0, "power_w": 60.0}] if with_gpu else [])
    samples = [{"t": float(t), "cpu_pct": 90.0, "rss_mb": 500.0, "gpus": gpus}
               for t in range(11)]
    telemetry = annotate(nb, samples, 1.0, {0: (0.0, 2.5), 1: (2.5, 10.0)},
                                gpu_available=with_gpu)
    return nb, telemetry


def test_idle_note_names_cells_by_idle_time_and_is_replaced_not_duplicated():
    nb, telemetry = synthetic_run(util=3.0)
    first = warn_if_idle(nb, telemetry, threshold=20)
    second = warn_if_idle(nb, telemetry, threshold=20)
    assert first == second and first is not None
    notes = [c for c in nb.cells if IDLE_TAG in c.metadata.get("tags", [])]
    assert len(notes) == 1 and nb.cells[0] is notes[0]
    # model.fit held the GPU longest while idle: it comes first.
    assert first.index("model.fit(ds)") < first.index("load()")


@pytest.mark.parametrize(("util", "requested", "with_gpu", "threshold"), [
    (85.0, 1, True, 20),       # busy
    (3.0, 0, True, 20),        # no GPUs requested (CPU notebook)
    (None, 1, False, 20),      # no GPU data at all: not evidence of idleness
    (None, 1, True, 20),       # MIG slice: utilisation not reported
    (19.0, 1, True, 15),       # under the default, over a lowered threshold
])
def test_no_idle_note_when_busy_unrequested_or_unmeasured(util, requested, with_gpu, threshold):
    nb, telemetry = synthetic_run(util, requested, with_gpu)
    apply_idle_note(nb, "stale note from an earlier run")  # must be cleared
    assert warn_if_idle(nb, telemetry, threshold=threshold) is None
    assert not any(IDLE_TAG in c.metadata.get("tags", []) for c in nb.cells)


def test_idle_threshold_env_and_all_gpus_request(monkeypatch):
    nb, telemetry = synthetic_run(util=60.0, gpus_requested="all")
    assert warn_if_idle(nb, telemetry) is None
    monkeypatch.setenv("AIRGPU_IDLE_THRESHOLD", "75")
    assert "warning under 75 %" in warn_if_idle(nb, telemetry)


# -- metrics ----------------------------------------------------------------------------------


class _Capture(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []
    authorization: list[str | None] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(("PUT", self.path, body))
        self.authorization.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_pushgateway_gets_the_run_grouped_by_dag_and_task(monkeypatch, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, telemetry = synthetic_run(util=50.0)
        monkeypatch.setenv("AIRGPU_PUSHGATEWAY_URL", f"http://127.0.0.1:{server.server_port}")
        labels = {"dag": "d1", "task": "run_notebook", "run": "manual__x"}
        written = metrics.publish(telemetry, tmp_path / "nb.ipynb", labels)
    finally:
        server.shutdown()
    assert written == tmp_path / "nb.prom" and written.is_file()
    _method, path, body = _Capture.received[-1]
    assert path == "/metrics/job/airgpu/dag/d1/task/run_notebook"
    text = body.decode()
    assert 'airgpu_gpu_utilization_mean{UUID="GPU-a",dag="d1",gpu="0",run="manual__x",' \
           'task="run_notebook"} 50.0' in text


def test_unreachable_pushgateway_is_a_warning_not_a_failure(monkeypatch, tmp_path, caplog):
    _, telemetry = synthetic_run(util=50.0)
    monkeypatch.setenv("AIRGPU_PUSHGATEWAY_URL", "http://127.0.0.1:9")  # discard port: refused
    with caplog.at_level(logging.WARNING, logger="airgpu_nb.metrics"):
        written = metrics.publish(telemetry, tmp_path / "nb.ipynb", {"dag": "d"})
    assert written is not None and written.is_file()
    assert "could not push metrics" in caplog.text


def test_pushgateway_credentials_become_basic_auth_and_are_never_logged(monkeypatch, tmp_path,
                                                                      caplog):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _, telemetry = synthetic_run(util=50.0)
    try:
        monkeypatch.setenv("AIRGPU_PUSHGATEWAY_URL",
                           f"http://alice:s3cr%2Ft@127.0.0.1:{server.server_port}")
        assert metrics.publish(telemetry, tmp_path / "nb.ipynb",
                               {"dag": "d", "task": "t"}) is not None
    finally:
        server.shutdown()
    # The credentials went in a header (percent-decoded), not in the request line.
    assert _Capture.authorization[-1] == "Basic " + base64.b64encode(b"alice:s3cr/t").decode()
    assert _Capture.received[-1][1] == "/metrics/job/airgpu/dag/d/task/t"


@pytest.mark.parametrize(("url", "shown"), [
    ("http://alice:s3cret@127.0.0.1:9", "http://127.0.0.1:9"),  # refused
    ("http://alice:s3cret@[::1]:9/", "http://[::1]:9/"),  # ipv6
    ("alice:s3cret@127.0.0.1:9", "127.0.0.1:9"),  # no scheme
    ("http://alice:s3cret@no-such-host.invalid", "http://no-such-host.invalid"),
])
def test_pushgateway_warning_shows_the_url_without_its_password(monkeypatch, tmp_path, caplog,
                                                                 url, shown):
    _, telemetry = synthetic_run(util=50.0)
    monkeypatch.setenv("AIRGPU_PUSHGATEWAY_URL", url)
    with caplog.at_level(logging.WARNING, logger="airgpu_nb.metrics"):
        metrics.publish(telemetry, tmp_path / "nb.ipynb", {"dag": "d"})
    assert "could not push metrics" in caplog.text
    assert "s3cret" not in caplog.text and "alice" not in caplog.text
    assert f"Pushgateway at {shown}: " in caplog.text


def test_prometheus_file_per_gpu_series_for_mig_slices(tmp_path):
    samples = [{"t": float(t), "cpu_pct": 1.0, "rss_mb": 1.0, "gpus": [
        {"index": 1, "uuid": f"MIG-s{i}", "util_pct": None, "mem_used_mb": 100.0 * (i + t),
         "mem_total_mb": 9984.0, "power_w": None} for i in range(2)]} for t in range(3)]
    telemetry = {"interval_s": 1.0, "samples": samples, "summary": summarise(samples, 1.0)}
    path = metrics.write_textfile(telemetry, tmp_path / "m.prom", {"dag": "d", "task": "t",
                                                                   "run": "r"})
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    peaks = {s.labels["UUID"]: s.value for s in families["airgpu_gpu_memory_used_peak_mib"].samples}
    assert peaks == {"MIG-s0": 200.0, "MIG-s1": 300.0}
    assert all(s.labels["gpu"] == "1" for s in families["airgpu_gpu_memory_total_mib"].samples)
    assert "airgpu_gpu_utilization_mean" not in families  # MIG: NVML reports none
    assert os.path.getsize(path) < 10_000
