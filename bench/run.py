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


def bench_bundle_promotion(work: Path) -> None:
    """Issue 9: promotion that finds and carries a notebook's files (~1 MB) and packages."""
    from airgpu_nb.promote import promote

    project = work / "bundled"
    (project / "data").mkdir(parents=True, exist_ok=True)
    (project / "data" / "train.bin").write_bytes(os.urandom(1_000_000))
    (project / "features.py").write_text("import json\n\ndef load(path):\n    return path\n")
    cells = [nbformat.v4.new_code_cell("epochs = 3", metadata={"tags": ["parameters"]}),
             nbformat.v4.new_code_cell("%matplotlib inline\nimport numpy as np\nimport features"),
             nbformat.v4.new_code_cell("x = np.fromfile('data/train.bin', dtype=np.uint8)")]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    path = project / "bundled.ipynb"
    nbformat.write(nb, path)
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        result = promote(path, dags_dir=work / "bundle-dags").write(force=True)
        samples.append(time.perf_counter() - start)
    line(f"promotion carrying a {result.bundle.total / 1e6:.1f} MB bundle (find, copy, write)",
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
    for target in ("local", "compose", "docker", "kubernetes", "kubernetes-executor"):
        promote(EXAMPLE, dags_dir=folder / target, allow_cpu=True, target=target).write()
        commands[target] = parse_cost(folder / target / "train_classifier.py")
    result = interleaved(commands, reps, env=env)
    base = result["minimal"]
    line("DAG file import, minimal EmptyOperator DAG (process)", f"{base:.2f} s", "baseline")
    for target in ("local", "compose", "docker", "kubernetes", "kubernetes-executor"):
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
    import json, sys, time
    import IPython.display  # a kernel has IPython loaded before any cell runs
    from airgpu_nb.inject import check_cell_source
    source = check_cell_source(1, True)
    t0 = time.perf_counter()
    exec(source, {"__name__": "__main__"})
    t1 = time.perf_counter()
    assert "tensorflow" not in sys.modules, "the check imported TensorFlow in its own process"
    print(json.dumps({"check": t1 - t0}))
""")
TF_IMPORT = ("import json, time; t = time.perf_counter(); import tensorflow; "
             "print(json.dumps({'tf_import': time.perf_counter() - t}))")


def _last_json(command: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_check_cell(env: dict[str, str], reps: int) -> None:
    """The check cell's own cost: since issue 8 its TensorFlow probe is a child process that
    imports TensorFlow itself, so this is that child's whole cost against TensorFlow's import."""
    checks, imports = [], []
    for _ in range(reps):
        checks.append(_last_json([sys.executable, "-c", CHECK_COST], env)["check"])
        imports.append(_last_json([sys.executable, "-c", TF_IMPORT], env)["tf_import"])
    check, tf_import = statistics.median(checks), statistics.median(imports)
    line("verification cell (TF probe in a child process) beyond TF's import",
         f"{check - tf_import:.2f} s", f"bar < 0.30 s (cell {check:.1f} s, TF import "
                                       f"{tf_import:.1f} s)")


RSS_CELL = ("import resource, sys\n"
            "print('airgpu-bench-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "print('airgpu-bench-tf-imported', 'tensorflow' in sys.modules)")


def _papermill_run(notebook: Path, output: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds of a plain papermill run and its kernel's peak RSS in MiB."""
    elapsed = median_time([str(BIN / "papermill"), "--no-progress-bar", str(notebook),
                           str(output), "--cwd", str(output.parent)], env=env)
    nb = nbformat.read(output, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    kib = next(int(ln.split()[1]) for ln in text.splitlines()
               if ln.startswith("airgpu-bench-rss-kib"))
    return elapsed, kib / 1024


def bench_check_in_kernel(work: Path, env: dict[str, str], reps: int) -> None:
    """What the injected check costs the notebook's kernel: the prepared copy with and without
    its check cell under plain papermill, for a notebook that never imports TensorFlow and for
    one that does (the probe's child imports TensorFlow once more)."""
    from airgpu_nb.inject import CHECK_TAG
    from airgpu_nb.promote import promote

    folder = work / "check-kernel"
    folder.mkdir()
    bodies = {
        "no TF": "total = sum(i * i for i in range(200_000))\nprint(total)",
        "imports TF": "import tensorflow as tf\nprint(float(tf.reduce_sum(tf.ones((64, 64)))))",
    }
    commands: dict[str, tuple[Path, Path]] = {}
    for kind, body in bodies.items():
        name = "no_tf" if kind == "no TF" else "with_tf"
        cells = [nbformat.v4.new_code_cell("epochs = 1", metadata={"tags": ["parameters"]}),
                 nbformat.v4.new_code_cell(body), nbformat.v4.new_code_cell(RSS_CELL)]
        source = folder / f"{name}.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
            "name": "python3", "language": "python", "display_name": "Python 3"}}), source)
        prepared = promote(source, dags_dir=folder / "dags", allow_cpu=True).write().notebook
        without = nbformat.from_dict(prepared)
        without.cells = [c for c in without.cells
                         if CHECK_TAG not in c.get("metadata", {}).get("tags", [])]
        nbformat.write(prepared, folder / f"{name}-check.ipynb")
        nbformat.write(without, folder / f"{name}-plain.ipynb")
        for variant in ("check", "plain"):
            out = folder / f"out-{name}-{variant}" / "out.ipynb"
            out.parent.mkdir()
            commands[f"{kind}/{variant}"] = (folder / f"{name}-{variant}.ipynb", out)
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in commands}
    for _ in range(reps):
        for key, (notebook, output) in commands.items():
            samples[key].append(_papermill_run(notebook, output, env))
    for kind in bodies:
        check, plain = samples[f"{kind}/check"], samples[f"{kind}/plain"]
        t_check = statistics.median(t for t, _ in check)
        t_plain = statistics.median(t for t, _ in plain)
        rss_check = statistics.median(r for _, r in check)
        rss_plain = statistics.median(r for _, r in plain)
        line(f"check cell, notebook {kind}: papermill wall, with vs without",
             f"+{t_check - t_plain:.2f} s", f"{t_check:.1f} s vs {t_plain:.1f} s")
        line(f"check cell, notebook {kind}: kernel peak RSS, with vs without",
             f"{round(rss_check - rss_plain):+d} MiB",
             f"{rss_check:.0f} MiB vs {rss_plain:.0f} MiB")


DEPLOY_PHASES = (
    ("promote", "promote() writes the DAG and notebook"),
    ("parse wait", "deploy: parse wait, unpause, trigger (start_run)"),
    ("scheduling", "run created -> task queued to Celery"),
    ("worker pickup", "queued -> task running on the gpu worker"),
    ("task start", "task running -> papermill starts"),
    ("kernel start", "papermill start -> first cell starts"),
    ("injected cells", "GPU check + parameters cells"),
)


def _utc(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def bench_deploy(work: Path, reps: int) -> None:
    """Issue 11: "Promote and run" (promote() + watch.start_run) to the notebook's first user
    cell executing on the `gpu` worker of a real CeleryExecutor stack (PostgreSQL, Redis: not
    in the default set), and where the time goes. Each repetition promotes a new DAG."""
    sys.path.append(str(ROOT / "tests"))
    from celery_stack import celery_deployment

    from airgpu_nb import keys
    from airgpu_nb.airflow_api import AirflowClient, load_config
    from airgpu_nb.promote import promote
    from airgpu_nb.watch import start_run, watch

    ours = {keys.CHECK_TAG, keys.IDLE_TAG, keys.INJECTED_PARAMETERS_TAG, keys.PARAMETERS_TAG}
    source = work / "deploy_nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('first user cell', x)")], metadata={"kernelspec": {
            "name": "python3", "language": "python", "display_name": "Python 3"}}), source)
    samples: dict[str, list[float]] = {name: [] for name, _ in DEPLOY_PHASES}
    totals: list[float] = []
    with celery_deployment(echo=print) as stack, \
            AirflowClient(load_config(stack.client_env())) as client:
        for rep in range(reps):
            dag_id = f"bench_deploy_{rep}"
            clicked = time.time()
            promote(source, dags_dir=stack.dags, dag_id=dag_id, allow_cpu=True,
                    target="compose").write()
            promoted = time.time()
            run = start_run(client, dag_id, {"x": rep}, dag_file=stack.dags / f"{dag_id}.py",
                            timeout=300)
            triggered = time.time()
            result = watch(client, dag_id, str(run["dag_run_id"]), poll=0.5, timeout=300)
            if not result.ok or not result.executed_notebook:
                raise SystemExit(f"bench run failed: {result.failure}\n"
                                 f"{stack.stack.tail('worker-gpu')}")
            [ti] = [t for t in client.task_instances(dag_id, result.run_id)
                    if t["task_id"] == "run_notebook"]
            executed = json.loads(Path(result.executed_notebook).read_text())
            timed = [c for c in executed["cells"] if c["cell_type"] == "code"
                     and c["metadata"].get("papermill", {}).get("start_time")]
            user = next(c for c in timed if not ours & set(keys.cell_tags(c)))
            marks = [clicked, promoted, triggered, _utc(ti.get("queued_when") or ti["queued_dttm"]),
                     _utc(ti["start_date"]), _utc(executed["metadata"]["papermill"]["start_time"]),
                     _utc(timed[0]["metadata"]["papermill"]["start_time"]),
                     _utc(user["metadata"]["papermill"]["start_time"])]
            for (name, _), start, end in zip(DEPLOY_PHASES, marks, marks[1:], strict=False):
                samples[name].append(end - start)
            totals.append(marks[-1] - clicked)
            print(f"    run {rep + 1}: {totals[-1]:.1f} s "
                  + " ".join(f"{n}={v[-1]:.1f}" for n, v in samples.items()), flush=True)
    line('"Promote and run" to the first user cell on the Celery gpu worker',
         f"{statistics.median(totals):.1f} s",
         f"goal <= 15 s ({min(totals):.1f}-{max(totals):.1f})")
    for name, what in DEPLOY_PHASES:
        line(f"  {name}: {what}", f"{statistics.median(samples[name]):.2f} s", "median")


def bench_containers(work: Path, env: dict[str, str], reps: int) -> None:
    """Issue 10: the docker target's container against the local target on the same notebook
    (`airflow dags test`, the example with 3 epochs, CPU), the images' build times (cached
    layers count: build from nothing for the first-build figures) and the compose stack's start
    (`up --wait` with the test override) and a promoted notebook's trigger to success on its
    GPU worker. Needs Docker (a daemon is started as root when none answers)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
    import docker_images
    from compose_stack import compose_stack

    from airgpu_nb.airflow_api import AirflowClient, load_config
    from airgpu_nb.promote import promote
    from airgpu_nb.watch import start_and_follow

    with docker_images.running_daemon():
        built = docker_images.build_images(["runtime", "airflow", "gpu-worker"])
        built.update(docker_images.build_services())
        for tag, seconds in built.items():
            line(f"docker build {tag}", f"{seconds:.0f} s", "layer cache as found")
        dags, outputs = work / "ct-dags", work / "ct-outputs"
        outputs.mkdir()
        os.chown(outputs, 1000, 1000)  # the runtime image's user writes there
        airgpu = str(BIN / "airgpu")
        common = ["--dags-dir", str(dags), "--allow-cpu", "--force", "-p", "epochs", "3"]
        for dag_id, extra in (("ct_local", []), ("ct_docker", [
                "--target", "docker", "--image", docker_images.IMAGES["runtime"][1],
                "--outputs-volume", str(outputs)])):
            subprocess.run([airgpu, "promote", str(EXAMPLE), "--dag-id", dag_id, *common,
                            *extra], env=env, check=True, capture_output=True)
        ct_env = {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
        airflow = str(BIN / "airflow")
        result = interleaved({"local": [airflow, "dags", "test", "ct_local"],
                              "docker": [airflow, "dags", "test", "ct_docker"]},
                             reps, env=ct_env, cwd=work)
        line("airflow dags test, example notebook: local target", f"{result['local']:.1f} s",
             "baseline")
        line("  docker target (DockerOperator, runtime container) vs local",
             f"{result['docker'] / result['local']:.2f}x", f"{result['docker']:.1f} s")

        ups: list[float] = []
        runs: list[float] = []
        source = work / "compose_nb.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("print('ran', x)")], metadata={"kernelspec": {
                "name": "python3", "language": "python", "display_name": "Python 3"}}), source)
        for rep in range(reps):
            home = work / f"compose-{rep}"
            (home / "dags").mkdir(parents=True)
            with compose_stack(home, home / "dags") as stack, \
                    AirflowClient(load_config(stack.client_env())) as client:
                ups.append(stack.up_seconds)
                promote(source, dags_dir=stack.dags, dag_id="ct_compose", allow_cpu=True,
                        target="compose").write()
                started = time.monotonic()
                _, run = start_and_follow(client, "ct_compose", {"x": rep},
                                          dags_dir=stack.dags, timeout=300, wait=True)
                runs.append(time.monotonic() - started)
                if run is None or not run.ok:
                    raise SystemExit(f"compose bench run failed: {run.failure}\n{stack.logs()}")
        line("compose stack `up --wait` (test override, CPU)", f"{statistics.median(ups):.0f} s",
             f"{min(ups):.0f}-{max(ups):.0f} s")
        line("  promote -> deploy -> trigger -> success on airflow-worker-gpu",
             f"{statistics.median(runs):.1f} s", f"{min(runs):.1f}-{max(runs):.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of slow benchmarks")
    parser.add_argument("--only", help="comma-separated: promotion,bundle,import,e2e,check,kernel,"
                        "extra, and two never in the default set: deploy (needs PostgreSQL and "
                        "Redis) and containers (needs Docker)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    print(f"airgpu-nb benchmarks on {platform.node()}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}")
    with tempfile.TemporaryDirectory(prefix="airgpu-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "AIRFLOW_HOME": str(work / "home"), "TF_CPP_MIN_LOG_LEVEL": "2",
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(work)}
        env.pop("AIRGPU_OUTPUT_DIR", None)
        if only is None or only & {"e2e", "containers"}:
            subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True,
                           capture_output=True)
            subprocess.run([str(BIN / "airflow"), "pools", "set", "gpu", "1", "bench"], env=env,
                           check=True, capture_output=True)
        steps = {
            "promotion": lambda: bench_promotion(work),
            "bundle": lambda: bench_bundle_promotion(work),
            "import": lambda: bench_dag_import(work, env, max(args.reps, 5)),
            "check": lambda: bench_check_cell(env, args.reps),
            "kernel": lambda: bench_check_in_kernel(work, env, args.reps),
            "e2e": lambda: bench_end_to_end(work, env, args.reps),
        }
        for name, step in steps.items():
            if only is None or name in only:
                step()
        if only is not None and "deploy" in only:
            bench_deploy(work, args.reps)
        if only is not None and "containers" in only:
            bench_containers(work, env, args.reps)
        if only is None or "extra" in only:
            for module in sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py")):
                importlib.import_module(module).main()
        shutil.rmtree(work / "home", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
