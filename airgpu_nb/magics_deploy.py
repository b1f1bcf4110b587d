"""``%airgpu trigger`` and ``%airgpu runs``: the deployment subcommands of the magic, parse and
dispatch only (the work is :mod:`airgpu_nb.deploy`, the API :mod:`airgpu_nb.airflow_api`).

Kept apart from :mod:`airgpu_nb.magics` so each shell module stays small. ``trigger --wait``
follows the run in the cell's output (it blocks this cell, as ``%airgpu run`` does).
"""

from __future__ import annotations

import argparse
import html
from typing import Any

from IPython.display import display

SUBCOMMANDS = ("trigger", "runs")
INTRO = """\
  %airgpu trigger DAG_ID -p epochs 2 --wait   deploy, run on the Airflow deployment, follow it
  %airgpu runs DAG_ID             the DAG's latest runs on the deployment
"""


def add_parsers(sub: Any) -> None:
    """The subparsers, with exactly the CLI's options."""
    from .cli import add_runs_options, add_trigger_options

    t = sub.add_parser("trigger", help="deploy the promoted DAG to the Airflow deployment "
                       "($AIRGPU_AIRFLOW_URL), start a run with parameters; --wait follows it",
                       description="Same options as `airgpu trigger`.")
    add_trigger_options(t)
    r = sub.add_parser("runs", help="the latest runs of a DAG on the Airflow deployment")
    add_runs_options(r)


def trigger(args: argparse.Namespace) -> None:
    from .airflow_api import AirflowClient, load_config
    from .watch import raise_for, render_result, start_and_follow

    with AirflowClient(load_config()) as client:
        run, result = start_and_follow(client, args.dag_id, dict(args.parameters or {}),
                                       dags_dir=args.dags_dir, timeout=args.timeout,
                                       run_id=args.run_id, wait=args.wait, echo=_say)
        run_id = str(run["dag_run_id"])
        if result is None:
            display(_link(client.ui_url(args.dag_id, run_id), f"run {run_id}"), raw=True)
            return
    for line in render_result(result):
        print(line)
    display(_link(result.url, f"run {run_id} ({result.state})"), raw=True)
    raise_for(result)


def runs(args: argparse.Namespace) -> None:
    from .airflow_api import AirflowClient, load_config
    from .watch import list_runs, render_runs

    with AirflowClient(load_config()) as client:
        found = list_runs(client, args.dag_id, max(1, args.limit))
    rows = "".join(
        f"<tr><td><a href='{html.escape(r['url'], quote=True)}' target='_blank'>"
        f"{html.escape(r['run_id'])}</a></td><td>{html.escape(str(r['state']))}</td>"
        f"<td>{html.escape(str(r.get('start_date') or '-'))}</td>"
        f"<td>{_duration(r)}</td></tr>" for r in found)
    table = ("<table><tr><th>run</th><th>state</th><th>started</th><th>duration</th></tr>"
             f"{rows}</table>") if found else f"<p>{html.escape(render_runs(args.dag_id, []))}</p>"
    display({"text/plain": render_runs(args.dag_id, found), "text/html": table}, raw=True)


def _duration(run: dict[str, Any]) -> str:
    return "-" if run.get("duration_s") is None else f"{run['duration_s']:.1f} s"


def _say(line: str) -> None:
    print(line, flush=True)


def _link(url: str, label: str) -> dict[str, str]:
    return {"text/plain": f"{label}: {url}",
            "text/html": f"<p>{html.escape(label)}: <a href='{html.escape(url, quote=True)}' "
                         f"target='_blank'>{html.escape(url)}</a></p>"}
