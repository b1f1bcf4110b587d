"""A standing GPU health DAG: the verification cell's checks, on a schedule, once per GPU slot of
a worker queue / pool or of a Kubernetes GPU node pool, apart from any notebook.

Both seed articles check the workers' GPUs on their own (a standalone ``gpu_usage_check`` DAG; a
check when an autoscaled GPU node pool comes up). ``airgpu healthcheck-dag`` writes such a DAG:

- ``--target local`` (Celery/Local workers): one task per slot of ``--pool`` on ``--queue``; task
  ``check_gpu_slot_N`` checks the N-th GPU of the worker it lands on (by UUID, so a broken GPU
  is named, not hidden behind GPU 0).
- ``--target kubernetes-executor``: one worker pod per slot, each asking for one GPU on the node
  pool that ``--node-selector`` / ``--toleration`` / ``--gpu-product`` name; the pod is the same
  one promoted notebooks get (:func:`airgpu_nb.targets.kubernetes.pod_request`).

Each check runs :func:`airgpu_nb.gpu_check.gpu_report` (NVML, CUDA_VISIBLE_DEVICES and
TensorFlow's view, with a small matrix product on the GPU) under the run telemetry's sampler, and
publishes the result as Prometheus metrics with the run telemetry's names and labels (see
:mod:`airgpu_nb.metrics`) plus ``airgpu_gpu_check_*`` gauges. A failed check fails its task with
one line naming the node, the worker, the slot and the likely cause.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AirgpuError, SpecError
from .spec import DEFAULT_START_DATE, GpuRequest, PromotionSpec, validate_dag_id

log = logging.getLogger(__name__)

DEFAULT_DAG_ID = "airgpu_gpu_healthcheck"
DEFAULT_SCHEDULE = "@hourly"
TARGETS = ("local", "kubernetes-executor")
MAX_SLOTS = 64
CHECK_TIMEOUT_S = 600
NODE_ENV = "AIRGPU_NODE_NAME"  # set from the pod's spec.nodeName in Kubernetes worker pods
PROBE_INTERVAL_S = 0.5


class GpuHealthError(AirgpuError):
    """A GPU slot failed its health check. Exit code 1: the check ran, the GPU did not."""

    exit_code = 1


# -- the DAG ----------------------------------------------------------------------------------

def add_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``airgpu healthcheck-dag``."""
    parser.add_argument("--dag-id", default=DEFAULT_DAG_ID,
                        help=f"DAG id (default: {DEFAULT_DAG_ID})")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                        help=f"cron expression or preset (default: {DEFAULT_SCHEDULE}); 'none' "
                        "to trigger by hand")
    parser.add_argument("--target", default="local", choices=TARGETS,
                        help="local: Airflow workers on --queue/--pool; kubernetes-executor: "
                        "one worker pod per slot on a GPU node pool (default: local)")
    parser.add_argument("--slots", type=int, default=1, metavar="N",
                        help="GPU slots to check: one task per slot (default: 1; give the "
                        "number of GPUs of the pool)")
    parser.add_argument("--queue", default=None, help="worker queue (local default: gpu)")
    parser.add_argument("--pool", default=None,
                        help="Airflow pool, one slot per task (local default: gpu)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="pass when no GPU is usable (the metrics still say so)")
    parser.add_argument("--node-selector", action="append", metavar="KEY=VALUE",
                        help="kubernetes-executor: node label of the GPU node pool; repeatable")
    parser.add_argument("--toleration", action="append", metavar="KEY[=VALUE]:EFFECT",
                        help="kubernetes-executor: a taint of the node pool; repeatable")
    parser.add_argument("--gpu-product", metavar="LABEL",
                        help="kubernetes-executor: node label nvidia.com/gpu.product to match")
    parser.add_argument("--task-executor", action="store_true",
                        help="kubernetes-executor: set executor=\"KubernetesExecutor\" on the "
                        "tasks (a deployment whose default executor is another)")
    parser.add_argument("--dags-dir", default=None, metavar="DIR",
                        help="where the DAG is written (default: $AIRGPU_DAGS_DIR or ./dags)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the metrics files go (default: $AIRGPU_OUTPUT_DIR or "
                        "$AIRFLOW_HOME/airgpu-outputs)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a DAG file that was edited by hand")


def _pod_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    found: dict[str, Any] = {}
    if args.node_selector:
        found["node_selector"] = tuple(args.node_selector)
    if args.toleration:
        found["tolerations"] = tuple(args.toleration)
    if args.gpu_product:
        found["gpu_product"] = args.gpu_product
    return tuple(sorted(found.items()))


def render_healthcheck(args: argparse.Namespace) -> tuple[str, str]:
    """(dag_id, DAG source) for the parsed options, every value checked and a literal."""
    from .render import _environment, add_checksum, literal, shell_word
    from .spec import normalise_schedule, validate_schedule

    dag_id = validate_dag_id(args.dag_id)
    schedule = validate_schedule(normalise_schedule(args.schedule))
    if not 1 <= args.slots <= MAX_SLOTS:
        raise SpecError(f"--slots takes a number of GPU slots from 1 to {MAX_SLOTS}, "
                        f"not {args.slots}")
    pods = args.target == "kubernetes-executor"
    options = _pod_options(args)
    if not pods and (options or args.task_executor):
        raise SpecError("--node-selector, --toleration, --gpu-product and --task-executor are "
                        "for --target kubernetes-executor")
    for name in ("queue", "pool"):
        value = getattr(args, name)
        if value is not None and (not value.strip() or any(ch in value for ch in "\n\r{}%#")):
            raise SpecError(f"--{name} takes a plain name, not {value!r}")
    pod_source = None
    if pods:
        from .targets import kubernetes as k8s

        spec = PromotionSpec(dag_id=dag_id, notebook_name="healthcheck",
                             target=k8s.EXECUTOR_TARGET, gpu=GpuRequest(1), options=options)
        request = k8s.pod_request(spec, k8s.EXECUTOR_TARGET)
        pod = k8s.worker_pod_override(request, env={k8s.OUTPUT_ENV: request["output_dir"]})
        pod_source = k8s.pod_literal(pod)
    queue = args.queue if args.queue is not None else (None if pods else "gpu")
    pool = args.pool if args.pool is not None else (None if pods else "gpu")
    config = {"dag_id": dag_id, "allow_cpu": bool(args.allow_cpu), "pin": not pods,
              "output_dir": args.output_dir}
    command = ["airgpu", "healthcheck-dag", "--dag-id", dag_id,
               "--schedule", schedule or "none", "--target", args.target,
               "--slots", str(args.slots)]
    for flag, value in (("--queue", args.queue), ("--pool", args.pool),
                        ("--gpu-product", args.gpu_product), ("--output-dir", args.output_dir)):
        if value is not None:
            command += [flag, value]
    for flag, values in (("--node-selector", args.node_selector),
                         ("--toleration", args.toleration)):
        for value in values or ():
            command += [flag, value]
    command += ["--allow-cpu"] * bool(args.allow_cpu) + ["--task-executor"] * bool(
        args.task_executor)
    start = [int(part) for part in DEFAULT_START_DATE.split("-")]
    body = _environment().get_template("healthcheck.py.j2").render(
        version=__version__, dag_id=dag_id, schedule=schedule, slots=args.slots, queue=queue,
        pool=pool, config=config, pod_source=pod_source, start_date=start,
        task_executor=bool(args.task_executor), target=args.target,
        regenerate=" ".join(shell_word(w) for w in command))
    ast.parse(body)
    for value in (dag_id, schedule, queue, pool, config):
        literal(value)
    return dag_id, add_checksum(body)


def write_healthcheck(args: argparse.Namespace) -> Path:
    """Write the health DAG atomically into the dags dir (refusing hand-edited files)."""
    from .promote import default_dags_dir
    from .writes import dags_dir_lock, ensure_writable_dir, refuse_foreign_dag, stage_file

    dag_id, source = render_healthcheck(args)
    folder = Path(args.dags_dir) if args.dags_dir else default_dags_dir()
    ensure_writable_dir(folder)
    path = folder / f"{dag_id}.py"
    with dags_dir_lock(folder):
        if not args.force:
            refuse_foreign_dag(path)
        staged = stage_file(path, source.encode("utf-8"))
        try:
            os.replace(staged, path)
        except OSError as exc:
            os.unlink(staged)
            raise AirgpuError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# -- the task ---------------------------------------------------------------------------------

def pin_slot(slot: int, inventory: dict[str, Any] | None) -> str | None:
    """Make this process (and the TensorFlow probe) see only the slot's GPU; returns it.

    The N-th of the GPUs this worker may use (CUDA_VISIBLE_DEVICES if set, else every GPU the
    driver lists, by UUID so CUDA's own ordering cannot swap them). None when the driver lists
    none (then the check reports why) or the worker has fewer GPUs than slots.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        choices = [v.strip() for v in visible.split(",") if v.strip()]
    elif inventory:
        choices = [d["uuid"] for d in inventory["devices"]]
    else:
        return None
    if slot >= len(choices):
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = choices[slot]
    return choices[slot]


def check_slot(dag_file: str, config: dict[str, Any], slot: int,
               context: dict[str, Any]) -> dict[str, Any]:
    """Check one GPU slot; publish metrics; raise :class:`GpuHealthError` naming node, worker,
    slot and cause when it is not usable (``allow_cpu``: a CPU-only worker passes)."""
    from . import gpu_check
    from .telemetry import Sampler

    worker = socket.gethostname()
    node = os.environ.get(NODE_ENV) or worker
    ti = context.get("ti")
    task_id = str(getattr(ti, "task_id", f"check_gpu_slot_{slot}"))
    run_id = str(context.get("run_id") or "manual")
    inventory = gpu_check.nvml_inventory()
    before = len(inventory["devices"]) if inventory else 0
    pinned = pin_slot(slot, inventory) if config.get("pin") else None
    started = time.perf_counter()
    sampler = Sampler(interval_s=PROBE_INTERVAL_S)
    with sampler:
        report = gpu_check.gpu_report(1, bool(config.get("allow_cpu")))
    seconds = time.perf_counter() - started
    log.info("airgpu health check, slot %s on node %s (worker %s):\n%s", slot, node, worker,
             gpu_check.render_text(report))
    labels = {"dag": str(config["dag_id"]), "task": task_id, "run": run_id}
    usable = len(report["tensorflow"].get("gpus") or [])
    outcome = {"ok": bool(report["ok"]), "slot": slot, "node": node, "worker": worker,
               "gpu": pinned, "gpus_usable": usable, "driver_gpus": before,
               "seconds": round(seconds, 2), "cause": report["cause"],
               "message": report["message"]}
    outcome["metrics_file"] = publish(Path(dag_file).resolve().parent, config, labels, sampler,
                                      outcome)
    if not report["ok"]:
        if config.get("pin") and inventory and pinned is None:
            cause = (f"this worker has {before} GPU(s), so slot {slot} has none; give the pool "
                     f"one slot per GPU ({before}) or run the DAG with fewer --slots")
        elif usable == 0:
            cause = f"no GPU usable: {report['cause']}"
        else:
            cause = report["cause"] or report["message"]
        raise GpuHealthError(f"GPU health check failed on node {node} (worker {worker}, slot "
                             f"{slot}{', GPU ' + pinned if pinned else ''}): {cause}")
    return outcome


def publish(dag_dir: Path, config: dict[str, Any], labels: dict[str, str], sampler: Any,
            outcome: dict[str, Any]) -> str | None:
    """The check's metrics beside the run's other outputs, and pushed when configured. Never
    raises: a metrics problem must not hide the check's verdict."""
    try:
        registry = build_registry(labels, sampler, outcome)
        from prometheus_client import write_to_textfile

        from .airflow_task import default_output_dir
        from .run import resolve_output_dir, safe_name

        root = resolve_output_dir(config.get("output_dir"), dag_dir, default_output_dir())
        path = root / safe_name(labels["dag"]) / safe_name(labels["run"]) / \
            f"{safe_name(labels['task'])}.prom"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry)
    except Exception as exc:
        log.warning("airgpu: could not write the health check's metrics: %s", exc)
        return None
    from .metrics import PUSHGATEWAY_ENV

    url = os.environ.get(PUSHGATEWAY_ENV, "").strip()
    if url:
        push(registry, labels, url)
    return str(path)


def build_registry(labels: dict[str, str], sampler: Any, outcome: dict[str, Any]) -> Any:
    """The run telemetry's metrics for the check (same names and labels) plus its verdict."""
    from prometheus_client import Gauge

    from .metrics import RUN_LABELS
    from .metrics import build_registry as telemetry_registry

    telemetry = {"interval_s": sampler.interval_s, "samples": list(sampler.samples)}
    registry = telemetry_registry(telemetry, labels)
    names = (*RUN_LABELS, "node", "worker", "slot")
    values = {**{k: labels[k] for k in RUN_LABELS}, "node": outcome["node"],
              "worker": outcome["worker"], "slot": str(outcome["slot"])}
    for name, doc, value in (
        ("airgpu_gpu_check_ok", "1 when the GPU slot passed its health check, else 0.",
         1.0 if outcome["ok"] else 0.0),
        ("airgpu_gpu_check_gpus_usable", "GPUs TensorFlow could see and run work on.",
         outcome["gpus_usable"]),
        ("airgpu_gpu_check_driver_gpus", "GPUs the NVIDIA driver listed on the worker.",
         outcome["driver_gpus"]),
        ("airgpu_gpu_check_duration_seconds", "Wall time of the health check.",
         outcome["seconds"]),
    ):
        Gauge(name, doc, names, registry=registry).labels(**values).set(float(value))
    return registry


def push(registry: Any, labels: dict[str, str], url: str) -> bool:
    """Push to a Pushgateway grouped by DAG and task (each slot keeps its latest check), the
    way runs push theirs. A failure is a warning."""
    from .metrics import push_registry

    return push_registry(registry, labels, url, what="health metrics")
