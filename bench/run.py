"""`make bench`: airgpu-nb against the baselines named in PRODUCT.md, printed as ratios.

Each figure is a median over interleaved repetitions, measured in fresh processes where the
quantity is a process's cost (DAG parsing, `airflow dags test`). Run on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "notebooks" / "train_classifier.ipynb"
sys.path.insert(0, str(ROOT / "bench"))

MINIMAL_DAG = """\
import datetime
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator
with DAG(dag_id="minimal", schedule=None, catchup=False,
         start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)):
    EmptyOperator(task_id="empty")
"""

PAPERMILL_DAG = """\
import datetime
from airflow.sdk import DAG
from airflow.providers.papermill.operators.papermill import PapermillOperator
with DAG(dag_id="handwritten", schedule=None, catchup=False,
         start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)):
    PapermillOperator(task_id="run_notebook", input_nb={notebook!r},
                      output_nb={output!r} + "/train_classifier-{{{{ run_id }}}}.ipynb",
                      parameters={{"epochs": 8}})
"""


def median_time(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                check: bool = True) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return elapsed


def interleaved(commands: dict[str, list[str]], reps: int, **kwargs) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(reps):
        for name, command in commands.items():
            times[name].append(median_time(command, **kwargs))
    return {name: statistics.median(values) for name, values in times.items()}


def line(label: str, value: str, bar: str) -> None:
    print(f"  {label:<58} {value:>12}   {bar}", flush=True)


def bench_promotion(work: Path) -> None:
    from airgpu_nb.promote import promote

    cells = [nbformat.v4.new_code_cell("epochs = 3", metadata={"tags": ["parameters"]})]
    filler = "x = [" + ", ".join(str(i) for i in range(900)) + "]\n"
    while sum(len(c.source) for c in cells) < 1_000_000:
        cells.append(nbformat.v4.new_code_cell(filler))
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    path = work / "big.ipynb"
    nbformat.write(nb, path)
    size = path.stat().st_size
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        promote(path, dags_dir=work / "promo-dags").write(force=True)
        samples.append(time.perf_counter() - start)
    line(f"promotion of a {size / 1e6:.1f} MB notebook (read, inject, render, write)",
         f"{statistics.median(samples) * 1000:.0f} ms", "bar < 500 ms")


def parse_cost(path: Path) -> list[str]:
    code = ("import runpy, sys; runpy.run_path(sys.argv[1])")
    return [sys.executable, "-c", code, str(path)]


def bench_dag_import(work: Path, env: dict[str, str], reps: int) -> None:
    from airgpu_nb.promote import promote

    folder = work / "import"
    folder.mkdir()
    (folder / "minimal.py").write_text(MINIMAL_DAG)
    (folder / "handwritten.py").write_text(PAPERMILL_DAG.format(notebook=str(EXAMPLE),
                                                                output=str(work / "hw-out")))
    commands = {"minimal": parse_cost(folder / "minimal.py"),
                "papermill": parse_cost(folder / "handwritten.py")}
    for target in ("local", "compose", "docker", "kubernetes"):
        promote(EXAMPLE, dags_dir=folder / target, allow_cpu=True, target=target).write()
        commands[target] = parse_cost(folder / target / "train_classifier.py")
    result = interleaved(commands, reps, env=env)
    base = result["minimal"]
    line("DAG file import, minimal EmptyOperator DAG (process)", f"{base:.2f} s", "baseline")
    for target in ("local", "compose", "docker", "kubernetes"):
        bar = "bar <= 1.10x" if target != "kubernetes" else "imports the kubernetes client"
        line(f"DAG file import, generated {target} DAG vs minimal",
             f"{result[target] / base:.2f}x", bar)
    line("DAG file import, hand-written PapermillOperator DAG vs minimal",
         f"{result['papermill'] / base:.2f}x", "reference 1.65x")


def bench_end_to_end(work: Path, env: dict[str, str], reps: int) -> None:
    from airgpu_nb.promote import promote

    dags = work / "e2e-dags"
    dags.mkdir()
    promote(EXAMPLE, dags_dir=dags, allow_cpu=True).write()
    (dags / "handwritten.py").write_text(PAPERMILL_DAG.format(notebook=str(EXAMPLE),
                                                              output=str(work / "hw-out")))
    script = work / "train_script.py"
    nb = nbformat.read(EXAMPLE, as_version=4)
    script.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code"))
    e2e_env = {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    (work / "hw-out").mkdir(exist_ok=True)
    airflow = str(BIN / "airflow")
    (work / "pm-out").mkdir()
    result = interleaved({
        "promoted": [airflow, "dags", "test", "train_classifier"],
        "handwritten": [airflow, "dags", "test", "handwritten"],
        "papermill": [str(BIN / "papermill"), "--no-progress-bar", str(EXAMPLE),
                      str(work / "pm-out" / "out.ipynb"), "--cwd", str(work / "pm-out")],
        "script": [sys.executable, str(script)],
    }, reps, env=e2e_env, cwd=work / "pm-out")
    line("airflow dags test, hand-written PapermillOperator DAG", f"{result['handwritten']:.1f} s",
         "baseline")
    line("airflow dags test, promoted DAG (check + telemetry on) vs hand-written",
         f"{result['promoted'] / result['handwritten']:.2f}x", "bar <= 1.00x")
    line("airflow dags test, promoted DAG vs papermill alone",
         f"{result['promoted'] / result['papermill']:.2f}x",
         f"papermill {result['papermill']:.1f} s, script {result['script']:.1f} s")


CHECK_COST = textwrap.dedent("""\
    import json, time
    import IPython.display  # a kernel has IPython loaded before any cell runs
    from airgpu_nb.inject import check_cell_source
    source = check_cell_source(1, True)
    t0 = time.perf_counter()
    import tensorflow
    t1 = time.perf_counter()
    exec(source, {"__name__": "__main__"})
    t2 = time.perf_counter()
    print(json.dumps({"tf_import": t1 - t0, "check": t2 - t1}))
""")


def bench_check_cell(env: dict[str, str], reps: int) -> None:
    checks, imports = [], []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", CHECK_COST], env=env, capture_output=True,
                             text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        checks.append(figures["check"])
        imports.append(figures["tf_import"])
    line("verification cell beyond TensorFlow's import", f"{statistics.median(checks):.2f} s",
         f"bar < 0.30 s (TF import {statistics.median(imports):.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of slow benchmarks")
    parser.add_argument("--only", help="comma-separated: promotion,import,e2e,check,extra")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    print(f"airgpu-nb benchmarks on {platform.node()}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}")
    with tempfile.TemporaryDirectory(prefix="airgpu-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "AIRFLOW_HOME": str(work / "home"), "TF_CPP_MIN_LOG_LEVEL": "2",
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(work)}
        env.pop("AIRGPU_OUTPUT_DIR", None)
        if only is None or only & {"e2e"}:
            subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True,
                           capture_output=True)
            subprocess.run([str(BIN / "airflow"), "pools", "set", "gpu", "1", "bench"], env=env,
                           check=True, capture_output=True)
        steps = {
            "promotion": lambda: bench_promotion(work),
            "import": lambda: bench_dag_import(work, env, max(args.reps, 5)),
            "check": lambda: bench_check_cell(env, args.reps),
            "e2e": lambda: bench_end_to_end(work, env, args.reps),
        }
        for name, step in steps.items():
            if only is None or name in only:
                step()
        if only is None or "extra" in only:
            for module in sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py")):
                importlib.import_module(module).main()
        shutil.rmtree(work / "home", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
