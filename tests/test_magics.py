"""%airgpu magics through a real IPython InteractiveShell: each subcommand, help, bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from airgpu_nb import report
from airgpu_nb.gpu import render_status, status_html
from airgpu_nb.gpu_check import REPORT_MIME
from airgpu_nb.magics import SUBCOMMANDS, AirgpuMagics
from airgpu_nb.profile import PLOT_OPTIONS, profile_bundle
from conftest import write_notebook


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "airgpu_nb")
    yield ip
    for name in ("__session__", "__vsc_ipynb_file__"):
        ip.user_ns.pop(name, None)
    ip.run_line_magic("unload_ext", "airgpu_nb")


def magics(ip: InteractiveShell) -> AirgpuMagics:
    return ip.magics_manager.registry["AirgpuMagics"]


@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return write_notebook(tmp_path / "work" / "my nb.ipynb", "y = x * 2\nprint('y is', y)",
                          parameters="x = 1\nname = 'it\\'s \"quoted\"'")


def run(ip: InteractiveShell, line: str):
    """Run a magic as a cell, the way a user does; return (result, captured output)."""
    with capture_output() as captured:
        result = ip.run_cell(line)
    return result, captured


def test_load_is_idempotent_and_unload_removes_the_magics(shell: InteractiveShell) -> None:
    shell.run_line_magic("load_ext", "airgpu_nb")  # second load: no error, still one set
    from airgpu_nb.magics import load

    load(shell)
    assert shell.find_line_magic("airgpu") is not None
    assert shell.find_cell_magic("airgpu") is not None
    hooks = [cb for cb in shell.events.callbacks["pre_run_cell"]
             if getattr(cb, "__self__", None).__class__ is AirgpuMagics]
    assert len(hooks) == 1
    shell.run_line_magic("unload_ext", "airgpu_nb")
    assert shell.find_line_magic("airgpu") is None
    assert shell.find_cell_magic("airgpu") is None
    assert not [cb for cb in shell.events.callbacks["pre_run_cell"]
                if getattr(cb, "__self__", None).__class__ is AirgpuMagics]
    shell.run_line_magic("load_ext", "airgpu_nb")
    assert shell.find_line_magic("airgpu") is not None


def test_help_documents_every_subcommand_and_its_options(shell: InteractiveShell) -> None:
    doc = shell.find_line_magic("airgpu").__doc__
    for name in SUBCOMMANDS:
        assert f"%airgpu {name}" in doc
    for option in ("%%airgpu profile", "--interval", "--memory-growth", "--memory-limit",
                   "--dag-id", "--schedule", "--notebook", "--allow-cpu", "--dags-dir", "-p"):
        assert option in doc
    _, captured = run(shell, "%airgpu?")
    assert "--memory-growth" in captured.stdout


def test_unknown_subcommand_lists_the_valid_ones_without_a_traceback(shell) -> None:
    with pytest.raises(UsageError, match="status, use, verify, promote, run, panel"):
        shell.run_line_magic("airgpu", "bogus")
    result, captured = run(shell, "%airgpu bogus")
    assert isinstance(result.error_in_exec, UsageError)
    assert "Traceback" not in captured.stdout + captured.stderr


@pytest.mark.parametrize("line, message", [
    ("", "give a subcommand"),
    ("profile", "cell magic"),
    ("promote --gpus -3 --notebook x.ipynb", "--gpus must be >= 0"),
    ("promote --dag-id 'bad id' --notebook x.ipynb", "invalid DAG id"),  # options first
    ("promote --notebook 'unterminated", "cannot parse"),
    ("promote --no-such-option", "unrecognized arguments"),
    ("use 0 --memory-growth --memory-limit 100", "not allowed with"),
    ("use zero", "invalid GPU id"),
    ("verify --gpus many", "--gpus takes a whole number"),
    ("status extra", "unrecognized arguments"),
])
def test_bad_input_is_a_one_line_usage_error(shell, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("airgpu", line)


def test_subcommand_help_prints_and_does_not_exit(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%airgpu promote --help")
    assert result.error_in_exec is None
    assert "--dag-id" in captured.stdout and "--notebook" in captured.stdout


def test_status_is_an_html_table_that_says_there_is_no_gpu(shell: InteractiveShell) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    result, captured = run(shell, "%airgpu status")
    assert result.error_in_exec is None
    data = captured.outputs[0].data
    assert "No NVIDIA GPU visible" in data["text/html"]
    assert "<table>" in data["text/html"] and "built with CUDA" in data["text/html"]
    assert "<code>0</code>" in data["text/html"]
    assert "CUDA_VISIBLE_DEVICES: 0" in data["text/plain"]
    assert "TensorFlow 2." in data["text/plain"]


def test_status_html_lists_each_gpu_and_mig_slice_escaped() -> None:
    info = {"cuda_visible_devices": None, "tensorflow": {"version": None},
            "nvml": {"driver_version": "550.54", "cuda_driver_version": "12.4", "devices": [
                {"index": 0, "name": "A100 <80GB>", "uuid": "GPU-aaa", "memory_used_mb": 10,
                 "memory_total_mb": 81920, "utilization_pct": None, "mig_mode": True,
                 "mig_devices": [{"uuid": "MIG-bbb", "memory_total_mb": 9856}]}]}}
    page = status_html(info)
    assert "NVIDIA driver 550.54 (CUDA 12.4), 1 GPU(s)" in page
    assert "A100 &lt;80GB&gt;" in page and "<80GB>" not in page
    assert "<td>MIG slice</td><td>MIG-bbb</td><td>9856 MiB</td>" in page
    assert "<td>n/a</td><td>on</td>" in page
    assert "not installed in this kernel's environment" in page
    assert "not set (every GPU is visible)" in page
    text = render_status(info)
    assert "[0] A100 <80GB>  GPU-aaa  10/81920 MiB  util n/a  MIG on" in text
    assert "MIG MIG-bbb 9856 MiB" in text and "TensorFlow: not installed" in text


def test_verify_shows_the_injected_cells_report(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%airgpu verify --allow-cpu")
    assert result.error_in_exec is None
    report = captured.outputs[0].data[REPORT_MIME]
    assert report["ok"] is True and report["allow_cpu"] is True
    assert report["tensorflow"]["version"]
    assert "airgpu GPU check: OK" in captured.outputs[0].data["text/plain"]
    # No GPU here: without --allow-cpu the same report is shown, then a one-line error.
    result, captured = run(shell, "%airgpu verify --gpus 1")
    assert isinstance(result.error_in_exec, UsageError)
    assert "GPU check failed" in str(result.error_in_exec)
    assert captured.outputs[0].data[REPORT_MIME]["ok"] is False
    assert "Traceback" not in captured.stderr


def test_use_sets_devices_before_tensorflow_and_refuses_after(tmp_path: Path) -> None:
    """In a fresh interpreter: TensorFlow state cannot be undone inside this test process."""
    script = textwrap.dedent("""
        import json, os, sys
        from IPython.core.error import UsageError
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "airgpu_nb")
        from airgpu_nb.gpu import tensorflow_initialised
        out = {"init_before_import": tensorflow_initialised()}
        ip.run_line_magic("airgpu", "use 1,0 --memory-growth")
        out["env"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        out["growth"] = os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")
        out["tf_imported"] = "tensorflow" in sys.modules
        ip.run_line_magic("airgpu", "use none --memory-limit 512")
        out["env2"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        import tensorflow as tf
        out["visible"] = [d.name for d in tf.config.get_visible_devices("GPU")]
        out["init_after_listing"] = tensorflow_initialised()
        tf.constant(1.0) + 1  # TensorFlow initialises its devices here
        out["init_after_op"] = tensorflow_initialised()
        try:
            ip.run_line_magic("airgpu", "use 0")
            out["after"] = "no error"
        except UsageError as exc:
            out["after"] = str(exc)
        out["env3"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        print("RESULT " + json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["env"] == "1,0" and out["growth"] == "true"
    assert out["tf_imported"] is False
    assert out["env2"] == "-1" and out["visible"] == []
    assert "restart the kernel" in out["after"]
    assert out["env3"] == "-1"  # the refused call changed nothing
    assert out["init_before_import"] is False and out["init_after_listing"] is False
    assert out["init_after_op"] is True


def test_promote_writes_files_checks_dagbag_and_names_the_command(shell, notebook, tmp_path):
    dags = tmp_path / "dags"
    result, captured = run(shell, f"%airgpu promote --notebook '{notebook}' --dags-dir {dags} "
                                  "--dag-id nightly_nb --schedule @daily -p x 7 --allow-cpu")
    assert result.error_in_exec is None, result.error_in_exec
    assert (dags / "nightly_nb.py").is_file() and (dags / "nightly_nb.ipynb").is_file()
    text = captured.outputs[0].data["text/plain"]
    html = captured.outputs[0].data["text/html"]
    assert f"wrote {dags / 'nightly_nb.py'}" in text
    assert "imports cleanly in Airflow's DagBag (nightly_nb)" in text
    assert "airflow dags test nightly_nb" in text and "airflow dags test nightly_nb" in html
    source = (dags / "nightly_nb.py").read_text()
    assert "@daily" in source
    prepared = nbformat.read(dags / "nightly_nb.ipynb", as_version=4)
    assert prepared.metadata["airgpu"]["settings"]["parameters"]["x"] == 7


def test_promote_finds_the_kernels_notebook_vscode_first(shell, notebook, tmp_path):
    other = write_notebook(tmp_path / "other.ipynb", "pass")
    with pytest.raises(UsageError, match="--notebook PATH"):
        shell.run_line_magic("airgpu", "promote --dags-dir d")
    shell.user_ns["__session__"] = str(other)
    assert magics(shell).kernel_notebook() == other
    shell.user_ns["__vsc_ipynb_file__"] = str(notebook)
    assert magics(shell).kernel_notebook() == notebook
    del shell.user_ns["__vsc_ipynb_file__"], shell.user_ns["__session__"]
    os.environ["JPY_SESSION_NAME"] = str(other)
    try:
        assert magics(shell).kernel_notebook() == other
    finally:
        del os.environ["JPY_SESSION_NAME"]
    shell.user_ns["__session__"] = "other.ipynb"  # a relative session path: the kernel's cwd
    os.chdir(tmp_path)
    result, captured = run(shell, "%airgpu promote --dags-dir d --dag-id found")
    assert result.error_in_exec is None, result.error_in_exec
    assert (tmp_path / "d" / "found.py").is_file()
    assert "warning" not in captured.outputs[0].data["text/plain"].lower()


def test_promote_warns_when_the_notebook_was_saved_before_the_latest_cell(shell, notebook):
    shell.user_ns["__session__"] = str(notebook)
    old = time.time() - 3600
    os.utime(notebook, (old, old))
    run(shell, "value = 1")  # the kernel ran a cell after the file was last saved
    result, captured = run(shell, "%airgpu promote --dags-dir d")
    assert result.error_in_exec is None, result.error_in_exec
    assert "unsaved edits are not included" in captured.outputs[0].data["text/plain"]
    os.utime(notebook, None)  # saved now: no warning
    run(shell, "value = 2")
    os.utime(notebook, (time.time() + 5, time.time() + 5))
    _, captured = run(shell, "%airgpu promote --dags-dir d")
    assert "unsaved" not in captured.outputs[0].data["text/plain"]


def test_run_executes_the_prepared_notebook_and_links_it(shell, notebook, tmp_path):
    output = tmp_path / "runs" / "out.ipynb"
    result, captured = run(shell, f"%airgpu run --notebook '{notebook}' -p x 5 --allow-cpu "
                                  f"--no-progress --output {output}")
    assert result.error_in_exec is None, result.error_in_exec
    executed = nbformat.read(output, as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "y is 10" in printed
    tags = [t for c in executed.cells for t in c.metadata.get("tags", [])]
    assert "airgpu-gpu-check" in tags and "injected-parameters" in tags
    assert str(output) in captured.outputs[-1].data["text/plain"]
    assert "<a href='runs/out.ipynb'" in captured.outputs[-1].data["text/html"]


def test_run_of_a_failing_notebook_is_one_line_naming_the_kept_notebook(shell, tmp_path):
    bad = write_notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    output = tmp_path / "failed.ipynb"
    result, captured = run(shell, f"%airgpu run --notebook {bad} --allow-cpu --no-progress "
                                  f"--output {output}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "ValueError: boom" in str(result.error_in_exec)
    assert output.is_file()
    assert "Traceback" not in captured.stderr


def test_profile_runs_the_cell_and_reports_cpu_without_a_gpu(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%%airgpu profile --interval 0.05\n"
                                  "import time\ntime.sleep(0.4)\nprofiled = 42\n")
    assert result.error_in_exec is None, result.error_in_exec
    assert shell.user_ns["profiled"] == 42
    summary = magics(shell).last_profile
    assert summary["wall_s"] >= 0.4 and summary["gpu_available"] is False
    assert summary["samples"] >= 3 and summary["rss_peak_mb"] > 0
    data = captured.outputs[-1].data
    assert "no GPU" in data["text/plain"] and "kernel CPU mean / peak" in data["text/plain"]
    assert data["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    with pytest.raises(UsageError, match="positive"):
        shell.run_cell_magic("airgpu", "profile --interval 0", "pass")
    with pytest.raises(UsageError, match="line magic"):
        shell.run_cell_magic("airgpu", "status", "pass")


def test_profile_timeline_is_the_report_plot_at_a_small_size(shell: InteractiveShell) -> None:
    """One drawing for `%%airgpu profile` and `airgpu report --png`: the profile's PNG is exactly
    report.plot() of the profile's samples, at the profile's size."""
    from matplotlib.image import imread

    result, captured = run(shell, "%%airgpu profile --interval 0.05\n"
                                  "import time\ntime.sleep(0.3)\n")
    assert result.error_in_exec is None, result.error_in_exec
    png = base64.b64decode(captured.outputs[-1].data["image/png"])
    timeline = magics(shell).last_profile["timeline"]
    assert len(timeline) >= 3 and timeline[0]["t"] < timeline[-1]["t"]
    assert png == report.plot(timeline, **PLOT_OPTIONS)
    assert png != report.plot(timeline)  # not the report's full-size figure
    pixels = imread(io.BytesIO(png))
    assert pixels.shape[:2] == (320, 512) and pixels.std() > 0.01


def test_profile_bundle_shows_gpu_figures_when_a_gpu_was_sampled() -> None:
    bundle = profile_bundle({"wall_s": 1.5, "gpu_available": True, "gpu_util_mean": 40.0,
                             "gpu_util_p95": 90.0, "gpu_util_peak": 99.0, "gpu_mem_peak_mb": 2048,
                             "gpu_seconds": 1.5, "idle_fraction": 0.25, "cpu_pct_mean": None,
                             "cpu_pct_peak": None, "rss_peak_mb": 300.0})
    text = bundle["text/plain"]
    assert "40.0% / 90.0% / 99.0%" in text and "2048 MiB" in text and "0.25" in text
    assert "no GPU" not in text and "n/a / n/a" in text
    assert ("<th style='text-align:left'>GPU memory peak</th><td>2048 MiB</td>"
            in bundle["text/html"])


def test_profile_still_reports_when_the_cell_raises(shell: InteractiveShell) -> None:
    _, captured = run(shell, "%%airgpu profile --interval 0.05\n1 / 0\n")
    assert "raised an error" in captured.outputs[-1].data["text/plain"]
    assert "ZeroDivisionError" in captured.stdout + captured.stderr


def test_panel_prefills_the_form_from_promote_options(shell, notebook, tmp_path) -> None:
    result, _ = run(shell, f"%airgpu panel --notebook '{notebook}' --dags-dir {tmp_path / 'd'} "
                           "--target docker --dag-id from_magic --schedule '0 3 * * *' "
                           "--image repo/img:1 -p x 9 --allow-cpu")
    assert result.error_in_exec is None, result.error_in_exec
    form = magics(shell).panels[-1].form
    assert form.dag_id.value == "from_magic" and form.target.value == "docker"
    assert form.schedule.value == "cron" and form.cron.value == "0 3 * * *"
    assert form.image.value == "repo/img:1" and form.allow_cpu.value is True
    assert dict((k.value, v.value) for k, v, _ in form.param_rows)["x"] == "9"
    assert form.dags_dir.value == str(tmp_path / "d")
    with pytest.raises(UsageError, match="notebook not found"):
        shell.run_line_magic("airgpu", "panel --notebook missing.ipynb")


def test_tour_notebook_is_generated_and_runs_under_nbval(tmp_path: Path) -> None:
    """notebooks/airgpu_tour.ipynb matches its generator and every cell runs (outputs not
    compared: GPU names and timings differ between machines)."""
    root = Path(__file__).resolve().parents[1]
    fresh = tmp_path / "tour.ipynb"
    subprocess.run([sys.executable, str(root / "scripts" / "make_tour_notebook.py"), str(fresh)],
                   check=True, capture_output=True, cwd=root)
    assert fresh.read_text() == (root / "notebooks" / "airgpu_tour.ipynb").read_text(), \
        "rerun scripts/make_tour_notebook.py"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q",
                           "-p", "no:cacheprovider", "notebooks/airgpu_tour.ipynb"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
