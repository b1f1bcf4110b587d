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
    return parser


def cmd_promote(args: argparse.Namespace) -> int:
    from .promote import promote

    result = promote(args.notebook, **promote_options(args))
    result.write(force=args.force)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        for note in result.notes:
            print(f"airgpu: note: {note}", file=sys.stderr)
        print(f"wrote {result.dag_file}\nwrote {result.notebook_file}\n"
              f"run it: airflow dags test {result.spec.dag_id}")
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
