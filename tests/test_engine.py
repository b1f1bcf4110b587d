"""The `airgpu` papermill engine keeps executed notebooks whole and honest: a dead or timed-out
kernel marks the cell it was running as failed, and a killed run never leaves torn JSON.

Real papermill runs with real IPython kernels; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import psutil
import pytest
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from airgpu_nb import keys
from airgpu_nb.idle import warn_if_idle
from airgpu_nb.timeline import annotate
from conftest import write_notebook

PAPERMILL = Path(sys.executable).parent / "papermill"


@pytest.fixture(autouse=True)
def _quiet_telemetry(monkeypatch):
    monkeypatch.setenv("AIRGPU_TELEMETRY_INTERVAL", "0.2")


def read_valid(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def test_a_cell_that_kills_its_kernel_is_kept_marked_failed_and_the_run_raises(tmp_path):
    source = write_notebook(tmp_path / "dies.ipynb", "print('before')",
                            "import os\nprint('dying', flush=True)\nos._exit(3)",
                            "never = True")
    output = tmp_path / "out" / "dies.ipynb"
    output.parent.mkdir()
    sink: dict = {}
    with pytest.raises(DeadKernelError, match=r"kernel died while In \[2\] ran \(exit code 3\)"):
        papermill.execute_notebook(str(source), str(output), engine_name="airgpu",
                                   progress_bar=False, airgpu_telemetry=sink)

    nb = read_valid(output)
    first, dead, after = nb.cells
    assert first.metadata.papermill["status"] == "completed" and first.outputs
    assert dead.metadata.papermill["status"] == "failed"
    assert dead.metadata.papermill["exception"] is True
    assert nb.metadata.papermill["exception"] is True
    # What it printed before dying is kept when it reached the kernel's output channel before
    # os._exit (a race on a loaded machine, so only checked when present).
    assert all(o.text == "dying\n" for o in dead.outputs if o.output_type == "stream")
    error = dead.outputs[-1]
    assert error.output_type == "error" and error.ename == "DeadKernelError"
    assert error.evalue == "the kernel died while this cell ran (exit code 3)"
    assert error.traceback  # frontends show an error through its traceback
    assert after.metadata.papermill["status"] == "pending"
    assert after.outputs == [] and after.execution_count is None
    # The partial timeline is kept, the dead cell's span included.
    assert sink["telemetry"]["samples"]
    assert dead.metadata[keys.METADATA_KEY]["telemetry"]["duration_s"] > 0
    assert "airgpu" not in after.metadata


def test_a_cell_past_its_timeout_is_marked_failed_not_completed(tmp_path):
    source = write_notebook(tmp_path / "slow.ipynb", "x = 1", "import time\ntime.sleep(60)",
                            "never = True")
    output = tmp_path / "slow.out.ipynb"
    started = time.monotonic()
    with pytest.raises(CellTimeoutError):
        papermill.execute_notebook(str(source), str(output), engine_name="airgpu",
                                   progress_bar=False, execution_timeout=2)
    assert time.monotonic() - started < 45
    nb = read_valid(output)
    slow = nb.cells[1]
    assert slow.metadata.papermill["status"] == "failed"
    assert slow.metadata.papermill["exception"] is True
    assert slow.outputs[-1].ename == "CellTimeoutError"
    assert "timed out" in slow.outputs[-1].evalue
    assert nb.cells[2].metadata.papermill["status"] == "pending"


def test_relative_output_path_lands_beside_the_caller_and_keeps_its_permissions(
        tmp_path, monkeypatch):
    source = write_notebook(tmp_path / "nb.ipynb", "open('made-here.txt', 'w').write('x')")
    kernel_dir = tmp_path / "kernel"
    kernel_dir.mkdir()
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "nb.ipynb"
    existing.write_text("{}")
    existing.chmod(0o600)
    monkeypatch.chdir(tmp_path)

    papermill.execute_notebook("nb.ipynb", "out/nb.ipynb", engine_name="airgpu",
                               progress_bar=False, cwd=str(kernel_dir))

    assert (kernel_dir / "made-here.txt").is_file()  # the kernel ran in cwd...
    assert not (kernel_dir / "out").exists()  # ...while the notebook was written beside us
    read_valid(existing)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nb.ipynb"]
    assert source.is_file()


def _watched(folder: Path, output: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of the output and of any dot-file (a temporary) in ``folder``."""
    found = {}
    for entry in os.scandir(folder):
        if entry.name == output.name or entry.name.startswith("."):
            try:
                info = entry.stat()
            except FileNotFoundError:
                continue
            found[entry.name] = (info.st_size, info.st_mtime_ns)
    return found


def _kill_during_a_write(proc: subprocess.Popen, folder: Path, output: Path, nth: int,
                         deadline: float) -> bool:
    """SIGKILL ``proc`` the moment the ``nth`` write shows in ``folder``.

    Counting writes instead of sleeping keeps the test strong on any machine speed: a
    fast machine finishes a run in the time a slow one takes to start it.
    """
    before = _watched(folder, output)
    seen = 0
    while proc.poll() is None and time.monotonic() < deadline:
        now = _watched(folder, output)
        if now != before:
            seen += 1
            if seen >= nth:
                kernels = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGKILL)
                for kernel in kernels:  # a killed papermill leaves its kernel behind
                    with contextlib.suppress(psutil.Error):
                        kernel.kill()
                return True
        before = now
        time.sleep(0.001)
    return False


def test_sigkill_during_a_run_with_large_outputs_never_leaves_a_torn_notebook(tmp_path):
    # ~40 MB of output over four cells: each save takes long enough to be caught mid-write.
    source = write_notebook(tmp_path / "big.ipynb", *(
        f"import sys\nsys.stdout.write({letter!r} * 10_000_000)" for letter in "abcd"))
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    killed_runs = 0
    for trial in range(6):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        output = folder / "big.ipynb"
        proc = subprocess.Popen(
            [str(PAPERMILL), str(source), str(output), "--engine", "airgpu",
             "--no-progress-bar"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            killed_runs += _kill_during_a_write(proc, folder, output, rng.randint(1, 40),
                                                deadline=time.monotonic() + 40)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        where = f"trial {trial}, seed {seed}"
        if output.exists():
            nb = read_valid(output)  # the previous complete version, never torn JSON
            assert len(nb.cells) == 4, where
        strays = [p.name for p in folder.iterdir() if p.name != output.name]
        # A temporary cut off by SIGKILL may stay, but never looks like a notebook.
        assert all(n.startswith(".") and not n.endswith(".ipynb") for n in strays), (where,
                                                                                    strays)
    assert killed_runs >= 3, "the runs finished before they could be killed: test too weak"


def test_idle_note_gets_a_cell_id_only_where_the_nbformat_allows_one():
    def idle_run(minor: int) -> nbformat.NotebookNode:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("model.fit(ds)")])
        nb.nbformat_minor = minor
        if minor < 5:
            for cell in nb.cells:
                cell.pop("id", None)
        nb.metadata["airgpu"] = {"settings": {"gpus": 1, "mig": None}}
        gpu = {"index": 0, "uuid": "GPU-a", "util_pct": 2.0, "mem_used_mb": 10.0,
               "mem_total_mb": 8000.0, "power_w": 50.0}
        samples = [{"t": float(t), "cpu_pct": 1.0, "rss_mb": 1.0, "gpus": [gpu]}
                   for t in range(5)]
        telemetry = annotate(nb, samples, 1.0, {0: (0.0, 4.0)}, gpu_available=True)
        assert warn_if_idle(nb, telemetry, threshold=20) is not None
        return nb

    old = idle_run(4)
    assert keys.IDLE_TAG in keys.cell_tags(old.cells[0])
    assert "id" not in old.cells[0]
    nbformat.validate(old)
    nbformat.validate(nbformat.reads(nbformat.writes(old), as_version=4))

    new = idle_run(5)
    assert new.cells[0]["id"] == keys.IDLE_TAG
    nbformat.validate(new)


def test_engine_module_still_offers_first_line_for_report():
    from airgpu_nb.engine import first_line

    assert first_line is keys.first_line
