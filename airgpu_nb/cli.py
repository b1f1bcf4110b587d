"""`airgpu`: promote, run, verify and inspect. A thin shell over the core API.

Exit codes: 0 done; 1 the notebook or check ran and failed; 2 bad input or usage (one line on
stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, options
from .errors import AirgpuError, SpecError
from .spec import parse_gpus


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(f"{message} (see '{self.prog} --help')")


def add_promote_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `airgpu promote`, `%airgpu promote` and `%airgpu panel`: the settings
    table's rows (see :mod:`airgpu_nb.settings`), plus --force."""
    options.add_promote_options(parser)
    parser.add_argument("--force", action="store_true",
                        help="overwrite a DAG or prepared notebook that was edited by hand")


def promote_options(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit settings from parsed promote options (absent ones left out)."""
    return options.from_args(args)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `airgpu run` and `%airgpu run`."""
    options.add_parameter_options(parser)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="airgpu", description="Promote TensorFlow notebooks to Airflow 3 DAGs "
                     "that run on a GPU, with an injected GPU check.")
    parser.add_argument("--version", action="version", version=f"airgpu-nb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an "
                        "unexpected error (a bug: please report it with the traceback)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("promote", help="write an Airflow DAG and a prepared notebook",
                       description="Write DAGS_DIR/<dag_id>.py and the prepared notebook beside "
                       "it (with the GPU check cell). The source notebook is never modified.")
    p.add_argument("notebook", help="the .ipynb to promote")
    add_promote_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object "
                   "(advisories included)")
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

    from .healthcheck import add_options as add_healthcheck_options

    hc = sub.add_parser("healthcheck-dag", help="write a standing DAG that checks the GPUs of a "
                        "worker pool or GPU node pool on a schedule",
                        description="Write DAGS_DIR/<dag_id>.py: the GPU check (NVML, TensorFlow "
                        "and a test op) once per GPU slot, with Prometheus metrics; a failed "
                        "slot fails its task naming the node and the cause.")
    add_healthcheck_options(hc)
    hc.add_argument("--json", action="store_true", help="print the result as one JSON object")
    hc.set_defaults(func=cmd_healthcheck_dag)
    add_deployment_commands(sub)
    return parser


def add_deploy_options(parser: argparse.ArgumentParser) -> None:
    """Options of `deploy` and `trigger` (CLI and magics): where the DAG file is, how long to
    wait for the deployment to parse it."""
    parser.add_argument("dag_id", metavar="DAG_ID", help="the promoted DAG's id")
    parser.add_argument("--dags-dir", metavar="DIR", help="where the DAG was promoted to "
                        "(default: $AIRGPU_DAGS_DIR or ./dags)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for the deployment to parse this version of "
                        "the DAG (default: 360)")


def add_trigger_options(parser: argparse.ArgumentParser) -> None:
    add_deploy_options(parser)
    options.add_parameter_options(parser)
    parser.add_argument("--wait", action="store_true", help="follow the run until it ends: "
                        "exit 0 on success, 1 when it failed (naming the failing cell)")
    parser.add_argument("--run-id", metavar="ID", help="the run's id (default: Airflow's)")


def add_runs_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dag_id", metavar="DAG_ID", help="the promoted DAG's id")
    parser.add_argument("--limit", type=int, default=10, metavar="N",
                        help="how many of the latest runs (default: 10)")


def add_deployment_commands(sub: Any) -> None:
    """`deploy`, `trigger`, `runs`: a deployment's REST API (AIRGPU_AIRFLOW_URL and
    AIRGPU_AIRFLOW_USERNAME + _PASSWORD or AIRGPU_AIRFLOW_TOKEN)."""
    d = sub.add_parser("deploy", help="wait until an Airflow deployment runs this version of a "
                       "promoted DAG, then unpause it",
                       description="Needs AIRGPU_AIRFLOW_URL (and AIRGPU_AIRFLOW_USERNAME + "
                       "AIRGPU_AIRFLOW_PASSWORD, or AIRGPU_AIRFLOW_TOKEN). Waits until the "
                       "deployment serves the same DAG file as DAGS_DIR/<DAG_ID>.py (asking it "
                       "to re-parse), reports an import error in one line, unpauses the DAG.")
    add_deploy_options(d)
    d.add_argument("--json", action="store_true", help="print the result as one JSON object")
    d.set_defaults(func=cmd_deploy)
    t = sub.add_parser("trigger", help="deploy, then start a run with parameters",
                       description="Like `deploy` (when DAGS_DIR/<DAG_ID>.py exists here), then "
                       "a run whose conf is the -p/-r parameters; --wait follows it to the end.")
    add_trigger_options(t)
    t.add_argument("--json", action="store_true", help="print the run as one JSON object")
    t.set_defaults(func=cmd_trigger)
    r = sub.add_parser("runs", help="the latest runs of a DAG on the deployment")
    add_runs_options(r)
    r.add_argument("--json", action="store_true", help="print the runs as a JSON list")
    r.set_defaults(func=cmd_runs)


def cmd_promote(args: argparse.Namespace) -> int:
    from .promote import promote

    result = promote(args.notebook, **promote_options(args))
    result.write(force=args.force)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        for note in result.notes:
            print(f"airgpu: note: {note}", file=sys.stderr)
        print("\n".join(f"wrote {path}" for path in result.written_paths()))
        print(f"run it: airflow dags test {result.spec.dag_id}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_notebook

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


def cmd_healthcheck_dag(args: argparse.Namespace) -> int:
    from .healthcheck import write_healthcheck

    path = write_healthcheck(args)
    dag_id = path.stem
    if args.json:
        print(json.dumps({"dag_id": dag_id, "dag_file": str(path)}, sort_keys=True))
    else:
        print(f"wrote {path}\nrun it: airflow dags test {dag_id}")
    return 0


def _progress(args: argparse.Namespace):
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda line: print(line, file=stream, flush=True)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .airflow_api import AirflowClient, load_config
    from .deploy import DEFAULT_PARSE_TIMEOUT_S, dag_file_for, deploy

    dag_file = dag_file_for(args.dag_id, args.dags_dir)
    with AirflowClient(load_config()) as client:
        done = deploy(client, args.dag_id, dag_file, echo=_progress(args),
                      timeout=args.timeout or DEFAULT_PARSE_TIMEOUT_S)
    if args.json:
        print(json.dumps(done.__dict__, sort_keys=True))
    else:
        print(f"ready: {done.url}")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    from .airflow_api import AirflowClient, load_config
    from .watch import raise_for, render_result, start_and_follow

    with AirflowClient(load_config()) as client:
        run, result = start_and_follow(client, args.dag_id, dict(args.parameters or {}),
                                       dags_dir=args.dags_dir, timeout=args.timeout,
                                       run_id=args.run_id, wait=args.wait,
                                       echo=_progress(args))
        if result is None:  # the echo said "triggered RUN_ID: URL"
            if args.json:
                run_id = str(run["dag_run_id"])
                print(json.dumps({"dag_id": args.dag_id, "run_id": run_id,
                                  "state": run.get("state"),
                                  "url": client.ui_url(args.dag_id, run_id)}, sort_keys=True))
            return 0
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True, default=str))
    else:
        for line in render_result(result):
            print(line)
    raise_for(result)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .airflow_api import AirflowClient, load_config
    from .watch import list_runs, render_runs

    if args.limit < 1:
        raise SpecError(f"--limit must be at least 1, not {args.limit}")
    with AirflowClient(load_config()) as client:
        runs = list_runs(client, args.dag_id, args.limit)
    print(json.dumps(runs, sort_keys=True) if args.json else render_runs(args.dag_id, runs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Never a traceback: bad input is one line and exit 2, a failed run exit 1, and an
    unexpected error one line and exit 1 (its traceback with --debug)."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    try:
        _refuse_undecodable(words)
        words, parameters = options.split_parameters(words)
        parser = build_parser()
        args = parser.parse_args(words)
        if parameters is not None:
            args.parameters = parameters
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except AirgpuError as exc:
        print(f"airgpu: error: {_one_line(str(exc))}", file=sys.stderr)
        output = getattr(exc, "output_path", None)
        if output and str(output) not in str(exc):
            print(f"airgpu: executed notebook kept at {output}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"airgpu: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} (a bug; "
              "rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _refuse_undecodable(words: Sequence[str]) -> None:
    """Bytes that are not UTF-8 (Python keeps them as surrogates) cannot go into a UTF-8 DAG
    file, notebook or JSON: one line naming the word, before anything is read or written."""
    for word in words:
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(f"argument {os.fsencode(word)!r} is not valid UTF-8: rename the "
                            "file or retype the value in UTF-8") from None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


if __name__ == "__main__":
    sys.exit(main())
