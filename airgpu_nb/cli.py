"""`airgpu`: promote, run, verify and inspect. A thin shell over the core API.

Exit codes: 0 done; 1 the notebook or check ran and failed; 2 bad input or usage (one line on
stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .errors import AirgpuError, SpecError
from .spec import parse_gpus, parse_value


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(f"{message} (see '{self.prog} --help')")


def _params_action(raw: bool) -> type[argparse.Action]:
    class Collect(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            name, value = values
            items = list(getattr(namespace, "parameters", None) or [])
            items.append((name, value if raw else parse_value(value)))
            namespace.parameters = items

    return Collect


def _add_parameter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--parameter", nargs=2, metavar=("NAME", "VALUE"),
                        action=_params_action(raw=False), dest="parameters",
                        help="override a parameters-cell value; VALUE is read like papermill's "
                             "-p (int, float, True/False, None, else a string); repeatable")
    parser.add_argument("-r", "--raw", nargs=2, metavar=("NAME", "VALUE"),
                        action=_params_action(raw=True), dest="parameters",
                        help="like -p, but VALUE stays a string; repeatable")


def add_promote_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `airgpu promote`, `%%airgpu promote` and `%%airgpu panel`."""
    from .targets import names

    parser.add_argument("--target", help=f"where the notebook runs: {', '.join(names())} "
                        "(default: local)")
    parser.add_argument("--dag-id", help="DAG id (default: the notebook's name made safe)")
    parser.add_argument("--schedule", help="cron expression or preset such as @daily; 'none' "
                        "for trigger-only (default: none)")
    parser.add_argument("--gpus", type=_gpus, metavar="N|all",
                        help="GPUs the run needs (default: 1)")
    parser.add_argument("--mig", metavar="PROFILE",
                        help="one MIG slice instead of whole GPUs, e.g. 1g.10gb (kubernetes)")
    parser.add_argument("--allow-cpu", action="store_true", default=None,
                        help="run on CPU when the GPUs are missing instead of failing")
    _add_parameter_options(parser)
    parser.add_argument("--dags-dir", help="where the DAG and the prepared notebook are "
                        "written (default: $AIRGPU_DAGS_DIR or ./dags)")
    parser.add_argument("--output-dir", help="where runs keep executed notebooks (default: "
                        "$AIRGPU_OUTPUT_DIR or $AIRFLOW_HOME/airgpu-outputs); relative to the "
                        "DAG file")
    parser.add_argument("--image", help="container image (docker, kubernetes targets)")
    _add_container_options(parser)
    parser.add_argument("--start-date", help="first data interval, YYYY-MM-DD")
    parser.add_argument("--retries", type=int, help="task retries (default: 1)")
    parser.add_argument("--retry-delay", type=int, metavar="SECONDS", dest="retry_delay_s",
                        help="wait between retries (default: 300)")
    parser.add_argument("--timeout", type=int, metavar="SECONDS", dest="execution_timeout_s",
                        help="task execution timeout (default: 21600)")
    parser.add_argument("--tag", action="append", dest="tags", help="DAG tag; repeatable")
    parser.add_argument("--no-telemetry", dest="telemetry", action="store_false", default=None,
                        help="do not sample GPU utilisation during runs")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a DAG file that was edited by hand")


def _add_container_options(parser: argparse.ArgumentParser) -> None:
    """Target-specific settings; they land in ``PromotionSpec.options`` and the target checks
    them (a wrong combination is one clear error)."""
    group = parser.add_argument_group("docker and kubernetes targets")
    group.add_argument("--cpu", help="CPU cores, e.g. 4 or 500m (kubernetes: requests = limits, "
                       "default 2; docker: relative CPU weight)")
    group.add_argument("--memory", help="memory, e.g. 16g or 16Gi (kubernetes default 8Gi; "
                       "must exceed --shm-size)")
    group.add_argument("--shm-size", help="size of /dev/shm, e.g. 2g (default 2g)")
    group.add_argument("--user", metavar="UID[:GID]", help="non-root user the notebook runs as "
                       "(default 1000:1000, the runtime image's user)")
    group.add_argument("--notebooks-volume", metavar="SOURCE", help="where the container "
                       "finds the prepared notebook: docker: host path or volume (default: the "
                       "DAG folder); kubernetes: PVC name (default: baked into the image at "
                       "/opt/airgpu/dags)")
    group.add_argument("--outputs-volume", metavar="SOURCE", help="where executed notebooks "
                       "go: docker: host path or volume (default volume airgpu-outputs); "
                       "kubernetes: PVC name (default airgpu-outputs)")
    group.add_argument("--outputs-url", metavar="URL", help="write executed notebooks to an "
                       "object store instead (s3://, gs://, abs://, adl://, hdfs://)")
    group.add_argument("--device-id", action="append", dest="device_ids", metavar="ID",
                       help="docker: a GPU index or UUID to reserve; repeatable (with --gpus "
                       "equal to their number)")
    group.add_argument("--namespace", help="kubernetes namespace of the pod")
    group.add_argument("--service-account", help="kubernetes service account of the pod")
    group.add_argument("--node-selector", action="append", dest="node_selector",
                       metavar="KEY=VALUE", help="kubernetes: extra node label to match, "
                       "beside nvidia.com/gpu.present=true; repeatable")
    group.add_argument("--toleration", action="append", dest="tolerations",
                       metavar="KEY[=VALUE]:EFFECT", help="kubernetes: tolerate a GPU node "
                       "pool's taint, beside nvidia.com/gpu; repeatable")
    group.add_argument("--gpu-product", metavar="LABEL", help="kubernetes: node label "
                       "nvidia.com/gpu.product to match, e.g. NVIDIA-A100-SXM4-80GB")
    group.add_argument("--gpu-sharing", choices=["shared"], help="kubernetes: request "
                       "time-sliced nvidia.com/gpu.shared instead of whole GPUs")


_CONTAINER_OPTIONS = ("cpu", "memory", "shm_size", "user", "notebooks_volume", "outputs_volume",
                      "outputs_url", "device_ids", "namespace", "service_account",
                      "node_selector", "tolerations", "gpu_product", "gpu_sharing")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `airgpu run` and `%airgpu run`."""
    _add_parameter_options(parser)
    parser.add_argument("--output", help="executed notebook path (default: OUTPUT_DIR/<dag_id>/"
                        "local__<time>/<notebook>.ipynb)")
    parser.add_argument("--allow-cpu", action="store_true", default=None,
                        help="run on CPU when the GPUs are missing")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide papermill's progress bar")


def _gpus(text: str) -> int | str:
    try:
        return parse_gpus(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def promote_options(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit settings from parsed promote options (None: not given)."""
    return {
        "target": args.target, "dag_id": args.dag_id, "schedule": args.schedule,
        "gpus": args.gpus, "mig": args.mig, "allow_cpu": args.allow_cpu,
        "parameters": dict(args.parameters) if args.parameters else None,
        "output_dir": args.output_dir, "image": args.image, "start_date": args.start_date,
        "retries": args.retries, "retry_delay_s": args.retry_delay_s,
        "execution_timeout_s": args.execution_timeout_s, "tags": args.tags,
        "telemetry": args.telemetry,
        "options": {name: getattr(args, name) for name in _CONTAINER_OPTIONS
                    if getattr(args, name, None) is not None} or None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airgpu", description="Promote TensorFlow notebooks to Airflow 3 DAGs "
                     "that run on a GPU, with an injected GPU check.")
    parser.add_argument("--version", action="version", version=f"airgpu-nb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("promote", help="write an Airflow DAG and a prepared notebook",
                       description="Write DAGS_DIR/<dag_id>.py and the prepared notebook beside "
                       "it (with the GPU check cell). The source notebook is never modified.")
    p.add_argument("notebook", help="the .ipynb to promote")
    add_promote_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_promote)

    r = sub.add_parser("run", help="run a notebook now, exactly as its DAG task would",
                       description="Prepare the notebook (GPU check included) and execute it "
                       "with papermill; prints the executed notebook's path.")
    r.add_argument("notebook")
    add_run_options(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="run the GPU check here and print its report",
                       description="Exit 0 when the GPUs are usable, 1 when not.")
    v.add_argument("--gpus", type=_gpus, default=1, metavar="N|all")
    v.add_argument("--allow-cpu", action="store_true")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("status", help="show GPUs as NVML and TensorFlow see them")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-tensorflow", dest="tensorflow", action="store_false",
                   help="skip importing TensorFlow (faster)")
    s.set_defaults(func=cmd_status)

    rp = sub.add_parser("report", help="GPU utilisation per cell of an executed notebook",
                        description="A table per cell (duration, mean GPU utilisation, peak "
                        "GPU memory, CPU) and the run's summary, from the telemetry the run "
                        "recorded into the executed notebook.")
    rp.add_argument("notebook", help="an executed notebook (from `airgpu run` or a DAG run)")
    rp.add_argument("--png", metavar="FILE", help="also draw utilisation and memory over time "
                    "with cell boundaries into FILE")
    rp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    rp.set_defaults(func=cmd_report)
    return parser


def cmd_promote(args: argparse.Namespace) -> int:
    from .promote import promote

    result = promote(args.notebook, dags_dir=args.dags_dir, **promote_options(args))
    result.write(force=args.force)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print(f"wrote {result.dag_file}\nwrote {result.notebook_file}\n"
              f"run it: airflow dags test {result.spec.dag_id}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .api import run_notebook

    output = run_notebook(args.notebook, dict(args.parameters or []), output=args.output,
                          allow_cpu=args.allow_cpu, progress_bar=args.progress)
    print(output)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .gpu import verify
    from .gpu_check import render_text

    report = verify(args.gpus, args.allow_cpu)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else render_text(report))
    return 0 if report["ok"] else 1


def cmd_status(args: argparse.Namespace) -> int:
    from .gpu import render_status, status

    info = status(include_tensorflow=args.tensorflow)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else render_status(info))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_text, report

    result = report(args.notebook, png=args.png)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(render_text(result))
        if args.png:
            print(f"wrote {result['png']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except AirgpuError as exc:
        print(f"airgpu: error: {exc}", file=sys.stderr)
        output = getattr(exc, "output_path", None)
        if output and str(output) not in str(exc):
            print(f"airgpu: executed notebook kept at {output}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
