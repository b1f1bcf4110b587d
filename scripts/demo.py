"""`make demo`: promote the example notebook and train it through real Airflow (SQLite).

Steps: a project-local AIRFLOW_HOME (.airflow, git-ignored) -> `airflow db migrate` -> the `gpu`
pool sized to this machine's GPUs -> `airgpu promote` into dags/ -> `airflow dags test` -> what
the executed notebook found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOTEBOOK = ROOT / "notebooks" / "train_classifier.ipynb"
DAG_ID = "train_classifier"
HOME = ROOT / ".airflow"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(args: list[str], env: dict[str, str], log: Path | None = None) -> int:
    if log is None:
        return subprocess.run(args, env=env, cwd=ROOT).returncode
    with log.open("w") as handle:
        return subprocess.run(args, env=env, cwd=ROOT, stdout=handle,
                              stderr=subprocess.STDOUT).returncode


def gpu_count() -> int:
    from airgpu_nb.gpu_check import nvml_inventory

    inventory = nvml_inventory()
    return len(inventory["devices"]) if inventory else 0


def main() -> int:
    from airgpu_nb.findings import read_findings

    HOME.mkdir(exist_ok=True)
    env = {**os.environ, "AIRFLOW_HOME": str(HOME),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("AIRGPU_OUTPUT_DIR", None)

    step(f"Airflow metadata database on SQLite in {HOME.relative_to(ROOT)}/")
    if run([str(BIN / "airflow"), "db", "migrate"], env, HOME / "migrate.log") != 0:
        print(f"airflow db migrate failed; see {HOME / 'migrate.log'}", file=sys.stderr)
        return 1
    gpus = gpu_count()
    slots = max(gpus, 1)
    run([str(BIN / "airflow"), "pools", "set", "gpu", str(slots), "one slot per GPU"], env,
        HOME / "pools.log")
    print(f"GPUs seen by NVML: {gpus}; pool 'gpu' has {slots} slot(s)")

    step("airgpu promote notebooks/train_classifier.ipynb --dags-dir dags --allow-cpu")
    if run([str(BIN / "airgpu"), "promote", str(NOTEBOOK.relative_to(ROOT)), "--dags-dir", "dags",
            "--allow-cpu"], env) != 0:
        return 1

    step(f"airflow dags test {DAG_ID} (log: .airflow/dags-test.log)")
    started = time.time()
    code = run([str(BIN / "airflow"), "dags", "test", DAG_ID], env, HOME / "dags-test.log")
    print(f"finished in {time.time() - started:.0f} s with exit code {code}")

    runs = sorted((HOME / "airgpu-outputs" / DAG_ID).glob("*/*.ipynb"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        print("no executed notebook was written; see .airflow/dags-test.log", file=sys.stderr)
        return 1
    found = read_findings(runs[-1])
    step("What the run found")
    print(f"executed notebook: {Path(found['executed_notebook']).relative_to(ROOT)}")
    report = found["gpu_report"]
    if report:
        tf_view = report["tensorflow"]
        print(f"GPU check:         {'OK' if report['ok'] else 'FAILED'}: {report['message']}")
        print(f"TensorFlow:        {tf_view['version']} (built with CUDA: "
              f"{tf_view['built_with_cuda']}), GPUs visible: {len(tf_view['gpus'])}")
        if report.get("cause") and report["ok"]:
            print(f"why no GPU:        {report['cause']}")
    if found["metrics"]:
        m = found["metrics"]
        print(f"trained model:     test accuracy {m['test_accuracy']:.3f}, loss "
              f"{m['test_loss']:.4f} after {m['epochs']} epochs "
              f"({m['samples_per_second']} samples/s)")
    if found["telemetry"]:
        t = found["telemetry"]
        util = "n/a (no GPU)" if t.get("gpu_util_mean") is None else f"{t['gpu_util_mean']:.0f}%"
        print(f"telemetry:         {t.get('duration_s', 0):.1f} s, mean GPU utilisation {util}; "
              f"`.venv/bin/airgpu report {Path(found['executed_notebook']).relative_to(ROOT)}`")
    if found["error"]:
        e = found["error"]
        print(f"failed cell:       {e['cell']}: {e['ename']}: {e['evalue']}")
    return 0 if code == 0 and not found["error"] else 1


if __name__ == "__main__":
    sys.exit(main())
