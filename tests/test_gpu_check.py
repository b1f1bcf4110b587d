"""The GPU check on this CPU-only machine, and its diagnosis of why GPUs are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.cli import main
from airgpu_nb.gpu_check import NOT_INSTALLED, REPORT_MIME, gpu_report, likely_cause
from airgpu_nb.inject import CHECK_TAG, probes_in_kernel
from conftest import BIN, ROOT, write_notebook


@pytest.fixture(autouse=True)
def _no_growth_setting_leaks(monkeypatch):
    """The check sets TF_FORCE_GPU_ALLOW_GROWTH in the process that runs it: keep it per test."""
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)


def report(**overrides):
    base = {
        "gpus_requested": 1,
        "cuda_visible_devices": None,
        "tensorflow": {"version": "2.21.0", "built_with_cuda": True, "cuda_version": "12.5",
                       "gpus": []},
        "nvml": {"driver_version": "570.1", "cuda_driver_version": "12.8", "devices": [
            {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-1", "mig_mode": False,
             "mig_devices": []}]},
    }
    base.update(overrides)
    return base


def test_missing_gpu_fails_and_names_the_cpu_only_tensorflow_build():
    result = gpu_report(gpus_requested=1, allow_cpu=False)
    assert result["ok"] is False
    assert result["tensorflow"]["built_with_cuda"] is False
    assert "built without CUDA" in result["message"]
    assert result["ops"] and result["ops"][0]["device"] == "/CPU:0" and result["ops"][0]["ok"]


def test_allow_cpu_passes_and_says_so():
    result = gpu_report(gpus_requested=1, allow_cpu=True)
    assert result["ok"] is True
    assert "no GPU — running on CPU because --allow-cpu" in result["message"]


def test_zero_gpus_requested_is_a_cpu_run_not_a_failure():
    result = gpu_report(gpus_requested=0, allow_cpu=False)
    assert result["ok"] is True and "no GPU requested" in result["message"]


def test_report_has_the_contract_fields():
    result = gpu_report(gpus_requested="all", allow_cpu=True)
    assert {"ok", "gpus_requested", "tensorflow", "nvml", "cuda_visible_devices"} <= set(result)
    assert {"version", "built_with_cuda", "gpus"} <= set(result["tensorflow"])
    json.dumps(result)  # the MIME bundle must be JSON


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles"])
def test_cuda_visible_devices_hiding_gpus_is_named(visible):
    assert "hides every GPU" in likely_cause(report(cuda_visible_devices=visible))


def test_no_driver_in_the_container_is_named():
    cause = likely_cause(report(nvml=None))
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has NVIDIA device files")
    assert "no NVIDIA driver" in cause and "device request" in cause


def test_unaddressable_mig_slice_is_named_with_a_uuid_to_use():
    nvml = report()["nvml"]
    nvml["devices"][0].update(mig_mode=True, mig_devices=[{"uuid": "MIG-abc",
                                                           "memory_total_mb": 10000}])
    cause = likely_cause(report(nvml=nvml, cuda_visible_devices="GPU-1"))
    assert "MIG" in cause and "MIG-abc" in cause


def test_driver_and_library_mismatch_is_named():
    cause = likely_cause(report())
    assert "do not match the driver" in cause and "12.8" in cause


def test_fewer_gpus_exposed_than_requested_is_named():
    assert "exposes fewer GPUs" in likely_cause(report(cuda_visible_devices="0",
                                                       gpus_requested=2))


def test_verify_cli_exit_codes(capsys):
    assert main(["verify", "--gpus", "1", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["verify", "--gpus", "1", "--allow-cpu"]) == 0
    assert "airgpu GPU check: OK" in capsys.readouterr().out


def test_hidden_gpus_are_reported_from_a_fresh_process():
    code = ("from airgpu_nb.gpu_check import gpu_report; r = gpu_report(1, False, run_ops=False);"
            "print(r['cause'])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "CUDA_VISIBLE_DEVICES='-1' hides every GPU" in out.stdout


# -- the probe runs in a child process -------------------------------------------------------

def fresh_python(code: str, **env: str) -> str:
    """Run ``code`` in a new interpreter (this test process may have TensorFlow imported)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_check_never_imports_tensorflow_in_its_own_process():
    last = fresh_python("""
        import json, os, sys
        from airgpu_nb.gpu_check import gpu_report
        r = gpu_report(1, True)
        print(json.dumps([r["ok"], r["tensorflow"]["version"], r["ops"][0]["device"],
                          "tensorflow" in sys.modules, os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
                          r["tensorflow"]["memory_growth"]]))
    """)
    ok, version, device, imported, growth, said = json.loads(last)
    assert ok and version and device == "/CPU:0"
    assert imported is False
    assert growth == "true" and said.startswith("on: TF_FORCE_GPU_ALLOW_GROWTH=true")


def test_memory_growth_keeps_the_environment_value_and_never_follows_an_imported_tensorflow():
    kept = fresh_python("""
        import os
        from airgpu_nb.gpu_check import enable_memory_growth
        print(enable_memory_growth(), os.environ["TF_FORCE_GPU_ALLOW_GROWTH"], sep="|")
    """, TF_FORCE_GPU_ALLOW_GROWTH="false")
    assert kept == "left as the environment set it: TF_FORCE_GPU_ALLOW_GROWTH='false'|false"
    late = fresh_python("""
        import os
        import tensorflow
        from airgpu_nb.gpu_check import enable_memory_growth
        print(enable_memory_growth(), os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"), sep="|")
    """)
    assert late.startswith("unchanged: TensorFlow was already imported") and late.endswith("|None")


def test_a_kernel_without_tensorflow_is_named(tmp_path):
    """The check's own source in an interpreter that has no TensorFlow (a bare venv)."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    code = (ROOT / "airgpu_nb" / "gpu_check.py").read_text() + textwrap.dedent("""
        import json
        r = gpu_report(1, False)
        print(json.dumps([r["ok"], r["tensorflow"]["version"], r["cause"], r["probe"]["error"]]))
    """)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, version, cause, failure = json.loads(out.stdout.strip().splitlines()[-1])
    assert (ok, version, failure) == (False, None, None)
    assert cause == NOT_INSTALLED


def fake_tensorflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str) -> None:
    """A ``tensorflow`` package that shadows the real one in the probe's child process: the only
    way to make TensorFlow crash, hang or break on a machine where it works."""
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(init))
    monkeypatch.setenv("PYTHONPATH", str(package.parent))


def test_a_tensorflow_that_cannot_import_is_named_not_called_missing(tmp_path, monkeypatch):
    fake_tensorflow(tmp_path, monkeypatch, """
        raise ImportError("libcudart.so.12: cannot open shared object file\\nsecond line")
    """)
    result = gpu_report(1, False, run_ops=True)
    assert result["ok"] is False and result["tensorflow"]["version"] is None
    assert result["cause"] == ("TensorFlow cannot be imported in this kernel's environment: "
                               "libcudart.so.12: cannot open shared object file")


def test_a_crashing_probe_is_one_line_in_the_report_not_a_traceback(tmp_path, monkeypatch):
    fake_tensorflow(tmp_path, monkeypatch, """
        import os, signal, sys
        sys.stdout.write("noise on stdout without a newline")
        sys.stderr.write("Traceback (most recent call last):\\n  noise\\nF0000 illegal op\\n")
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    """)
    result = gpu_report(1, False)
    assert result["ok"] is False and result["tensorflow"]["version"] is None
    assert result["cause"] == ("the TensorFlow probe process was killed by SIGSEGV: "
                               "F0000 illegal op")
    assert "\n" not in result["message"] and "Traceback" not in result["message"]
    json.dumps(result)


def test_a_crash_while_testing_a_device_is_blamed_on_that_device(tmp_path, monkeypatch):
    fake_tensorflow(tmp_path, monkeypatch, """
        import contextlib, os, signal, sys
        __version__ = "0.fake"
        class config:
            list_physical_devices = staticmethod(lambda kind: [])
        class sysconfig:
            get_build_info = staticmethod(dict)
        class test:
            is_built_with_cuda = staticmethod(lambda: False)
        device = staticmethod(lambda name: contextlib.nullcontext())
        class random:
            @staticmethod
            def uniform(shape):
                print("noise", flush=True)
                os.kill(os.getpid(), signal.SIGABRT)
    """)
    result = gpu_report(0, False)
    assert result["tensorflow"]["version"] == "0.fake"
    assert result["ops"] == [{"device": "/CPU:0", "ok": False,
                              "error": "the TensorFlow probe process was killed by SIGABRT"}]
    assert result["ok"] is False
    assert result["cause"] == ("work failed on /CPU:0: the TensorFlow probe process was killed "
                               "by SIGABRT")


def test_a_hanging_probe_is_stopped_at_its_timeout(tmp_path, monkeypatch):
    fake_tensorflow(tmp_path, monkeypatch, "import time\ntime.sleep(60)\n")
    start = time.perf_counter()
    result = gpu_report(1, False, timeout=2)
    assert time.perf_counter() - start < 20
    assert result["ok"] is False
    assert result["cause"] == ("the TensorFlow probe process ran past its 2 s timeout and was "
                               "stopped")


# -- in real kernels -------------------------------------------------------------------------

LOGICAL_CPUS = """\
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
print("logical CPUs:", len(tf.config.list_logical_devices("CPU")))
"""
NO_VISIBLE_GPU = """\
import tensorflow as tf
tf.config.set_visible_devices([], "GPU")
print("logical CPUs:", len(tf.config.list_logical_devices("CPU")))
"""


def outputs_text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def check_report(nb: nbformat.NotebookNode) -> dict:
    cell = next(c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", []))
    return next(o["data"][REPORT_MIME] for o in cell.outputs if REPORT_MIME in o.get("data", {}))


@pytest.mark.e2e
@pytest.mark.parametrize("source,expected", [(LOGICAL_CPUS, "logical CPUs: 2"),
                                             (NO_VISIBLE_GPU, "logical CPUs: 1")],
                         ids=["logical-cpus", "no-visible-gpu"])
def test_a_notebook_that_configures_its_devices_runs_after_the_check(tmp_path, source, expected):
    """Issue 8: the check used to initialise the kernel's TensorFlow, and the notebook's own
    device configuration then failed with 'cannot be modified after being initialized'."""
    notebook = write_notebook(tmp_path / "devices.ipynb", source, parameters="epochs = 1")
    executed = tmp_path / "airgpu-out" / "devices.ipynb"
    assert main(["run", str(notebook), "--allow-cpu", "--output", str(executed)]) == 0
    nb = nbformat.read(executed, as_version=4)
    assert check_report(nb)["ok"] is True
    assert check_report(nb)["probe"]["where"] == "child process"
    assert expected in outputs_text(nb)

    assert main(["promote", str(notebook), "--allow-cpu", "--dags-dir",
                 str(tmp_path / "dags")]) == 0
    by_papermill = tmp_path / "pm-out" / "devices.ipynb"
    by_papermill.parent.mkdir()
    run = subprocess.run([str(BIN / "papermill"), "--no-progress-bar",
                          str(tmp_path / "dags" / "devices.ipynb"), str(by_papermill)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert expected in outputs_text(nbformat.read(by_papermill, as_version=4))


@pytest.mark.e2e
def test_the_check_leaves_the_kernel_without_tensorflow(tmp_path):
    seen = tmp_path / "seen.json"
    notebook = write_notebook(tmp_path / "plain.ipynb", textwrap.dedent(f"""\
        import json, os, sys
        with open({str(seen)!r}, "w") as f:
            json.dump(["tensorflow" in sys.modules,
                       os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")], f)
        """), parameters="x = 1")
    executed = tmp_path / "out" / "plain.ipynb"
    assert main(["run", str(notebook), "--allow-cpu", "--output", str(executed)]) == 0
    assert json.loads(seen.read_text()) == [False, "true"]
    report = check_report(nbformat.read(executed, as_version=4))
    assert report["ok"] is True and report["tensorflow"]["version"]
    assert report["ops"][0] == {**report["ops"][0], "device": "/CPU:0", "ok": True}


@pytest.mark.parametrize(("source", "in_kernel"), [
    ("import tensorflow as tf\nmodel = tf.keras.Sequential()", True),
    ("from keras import layers", True),
    ("import numpy as np", False),  # no TensorFlow: the kernel never pays for its import
    (LOGICAL_CPUS, False),
    (NO_VISIBLE_GPU, False),
    ("import tensorflow as tf\ntf.config.experimental.set_memory_growth(g, True)", False),
    ("import tensorflow as tf\ntf.config.threading.set_inter_op_parallelism_threads(2)", False),
    ("import os\nos.environ['CUDA_VISIBLE_DEVICES'] = '1'\nimport tensorflow", False),
    ("import os\nos.environ['TF_GPU_ALLOCATOR'] = 'cuda_malloc_async'\nimport tensorflow",
     False),
])
def test_the_probe_shares_the_kernel_only_where_nothing_configures_tensorflow(source, in_kernel):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    assert probes_in_kernel(nb) is in_kernel


@pytest.mark.e2e
def test_a_tensorflow_notebook_is_probed_in_its_kernel_and_imports_tensorflow_once(tmp_path):
    seen = tmp_path / "seen.json"
    notebook = write_notebook(tmp_path / "tf.ipynb", textwrap.dedent(f"""\
        import json, sys
        already = "tensorflow" in sys.modules
        import tensorflow as tf
        with open({str(seen)!r}, "w") as f:
            json.dump([already, float(tf.reduce_sum(tf.ones((2, 2))))], f)
        """), parameters="x = 1")
    dags = tmp_path / "dags"
    assert main(["promote", str(notebook), "--allow-cpu", "--dags-dir", str(dags)]) == 0
    assert "probe_in_kernel=True" in (dags / "tf.ipynb").read_text()
    executed = tmp_path / "out" / "tf.ipynb"
    assert main(["run", str(notebook), "--allow-cpu", "--output", str(executed)]) == 0
    assert json.loads(seen.read_text()) == [True, 4.0]  # the check's import is the notebook's
    report = check_report(nbformat.read(executed, as_version=4))
    assert report["probe"]["where"] == "kernel" and report["probe"]["error"] is None
    assert report["ok"] is True and report["ops"][0]["ok"] is True
