"""Telemetry overhead (issue 5): `airgpu run` (the `airgpu` engine, sampler on, Prometheus file
written) against plain papermill on the same notebook, and the sampler's own CPU cost.

Run alone: ``.venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); import bench_telemetry;
bench_telemetry.main()"``; `make bench` (bench/run.py) calls ``main()`` too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
REPS = 3
SAMPLER_SECONDS = 10.0

#: About 3 s of numpy work on one small machine; no TensorFlow, so the kernel starts fast and
#: the difference between the two engines is what is left.
WORK = """\
import numpy as np
rng = np.random.default_rng(0)
a = rng.random((1000, 1000))
for _ in range(120):
    a = np.tanh(a @ a / 1000.0)
checksum = float(a.sum())
"""

#: Each run happens in a fresh interpreter and times only the execution call (kernel start
#: included), so import caches and a warm papermill do not favour whichever runs second.
RUNNER = """\
import pathlib, sys, time
mode, source, output = sys.argv[1:4]
import papermill  # imported before the clock starts in both modes
if mode == "airgpu":
    from airgpu_nb.run import execute
    start = time.perf_counter()
    execute(source, output, telemetry=True)
else:
    start = time.perf_counter()
    papermill.execute_notebook(source, output, progress_bar=False,
                               cwd=str(pathlib.Path(output).parent))
print(time.perf_counter() - start)
"""


def line(label: str, value: str, bar: str) -> None:
    print(f"  {label:<58} {value:>12}   {bar}", flush=True)


def _timed_run(mode: str, source: Path, output: Path, env: dict[str, str]) -> float:
    result = subprocess.run([sys.executable, "-c", RUNNER, mode, str(source), str(output)],
                            env=env, capture_output=True, text=True, cwd=str(ROOT))
    if result.returncode != 0:
        raise SystemExit(f"bench_telemetry: {mode} run failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def bench_engine_overhead(work: Path, reps: int = REPS) -> dict:
    source = work / "numpy_work.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WORK)], metadata={
        "kernelspec": {"name": "python3", "language": "python", "display_name": "python3"}})
    source.write_text(nbformat.writes(nb), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("AIRGPU_PUSHGATEWAY_URL", "AIRGPU_TELEMETRY_INTERVAL")}
    times: dict[str, list[float]] = {"papermill": [], "airgpu": []}
    for rep in range(reps):  # interleaved, alternating which goes first
        order = ("papermill", "airgpu") if rep % 2 == 0 else ("airgpu", "papermill")
        for mode in order:
            output = work / mode / f"rep{rep}" / "numpy_work.ipynb"
            output.parent.mkdir(parents=True, exist_ok=True)
            times[mode].append(_timed_run(mode, source, output, env))
    executed = nbformat.read(work / "airgpu" / "rep0" / "numpy_work.ipynb", as_version=4)
    if "telemetry" not in executed.metadata.get("airgpu", {}):
        raise SystemExit("bench_telemetry: the airgpu run recorded no telemetry")
    plain = statistics.median(times["papermill"])
    airgpu = statistics.median(times["airgpu"])
    line("telemetry: plain papermill run (median s)", f"{plain:.2f} s", "baseline")
    line("telemetry: airgpu run (median s)", f"{airgpu:.2f} s", "")
    line("telemetry: airgpu run vs plain papermill", f"{airgpu / plain:.3f}x",
         "goal <= 1.03x, bar 1.10x")
    return {"papermill_s": times["papermill"], "airgpu_s": times["airgpu"],
            "ratio": airgpu / plain}


def bench_sampler_cost(seconds: float = SAMPLER_SECONDS) -> dict:
    """The sampler at 1 s on this process while the main thread sleeps: the sampler's own CPU
    (thread time it accounts for itself) and the process's CPU over the same wall time."""
    from airgpu_nb.telemetry import Sampler

    sampler = Sampler(1.0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    own = 100 * sampler.cpu_time_s / wall
    whole = 100 * cpu / wall
    line(f"telemetry: sampler CPU at 1 s ({len(sampler.samples)} samples)", f"{own:.3f} %",
         "< 1%")
    line("telemetry: process CPU while sampling, main thread idle", f"{whole:.3f} %",
         "< 1%")
    return {"sampler_pct": own, "process_pct": whole, "samples": len(sampler.samples),
            "per_sample_ms": 1000 * sampler.cpu_time_s / max(1, len(sampler.samples))}


def main() -> dict:
    print("telemetry (issue 5)", flush=True)
    with tempfile.TemporaryDirectory(prefix="airgpu-bench-telemetry-") as tmp:
        overhead = bench_engine_overhead(Path(tmp))
    cost = bench_sampler_cost()
    return {"engine": overhead, "sampler": cost}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
