"""Deploy a promoted DAG to an Airflow 3 deployment, through its REST API (trigger and watch
are in :mod:`airgpu_nb.watch`).

    deploy()   wait until the deployment has parsed THIS version of DAGS_DIR/<dag_id>.py (the
               source it serves equals the file here, checksum header included), report an
               import error as one line, unpause
    trigger()  one run with typed params (the trigger's ``conf``)
    watch()    queued -> running -> success/failed, with durations and try numbers; at the end
               the XCom the task returned (executed notebook, telemetry summary) or, for a
               failed run, the failing cell from the task log, and the run's URL in the UI

A deployment learns of a new file on its own clock (``[dag_processor] refresh_interval``, 300 s
by default). For a DAG it already knows, ``PUT /parseDagFile/{file_token}`` asks for a re-parse;
for a new one, asking to re-parse another registered file makes Airflow 3.3's processor re-list
the bundle (a side effect, not a promise: polling covers the rest).

Progress goes to ``echo`` (one line per change); nothing here knows about screens.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .airflow_api import AirflowClient, ApiError
from .errors import AirgpuError, SpecError
from .render import checksum_status

Echo = Callable[[str], None]
#: Seconds between asking again for a re-parse while the deployment still shows another version.
REASK_S = 10.0
#: How much earlier than the file here an import error may be stamped and still be about it
#: (the deployment's clock may run a little behind this machine's).
CLOCK_SLACK_S = 5.0
DEFAULT_PARSE_TIMEOUT_S = 360.0


class DagImportError(AirgpuError):
    """The deployment could not import the DAG file (exit 2: fix the file, promote again)."""


class DeployTimeout(AirgpuError):
    """The deployment did not show this version of the DAG in time (exit 2)."""


@dataclass(frozen=True)
class Deployed:
    """The deployment has parsed this version of the DAG and will run it."""

    dag_id: str
    url: str
    waited_s: float
    reparse_requested: bool
    unpaused: bool
    paused: bool


# -- deploy ---------------------------------------------------------------------------------------

def dag_file_for(dag_id: str, dags_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where promotion wrote ``dag_id``: DAGS_DIR (default $AIRGPU_DAGS_DIR or ./dags)."""
    from .promote import default_dags_dir
    from .spec import validate_dag_id

    validate_dag_id(dag_id)
    folder = Path(dags_dir) if dags_dir is not None else default_dags_dir()
    return folder / f"{dag_id}.py"


def same_version(local: str, remote: str) -> bool:
    """The deployment parsed the file we have: same text (line endings aside); a generated file
    is also recognised by its checksum line when both are unedited."""
    if _normal(local) == _normal(remote):
        return True
    line = _checksum_line(local)
    return (line is not None and line == _checksum_line(remote)
            and checksum_status(local) is True and checksum_status(remote) is True)


def deploy(client: AirflowClient, dag_id: str, dag_file: str | os.PathLike[str], *,
           timeout: float = DEFAULT_PARSE_TIMEOUT_S, poll: float = 1.0,
           unpause: bool = True, echo: Echo | None = None) -> Deployed:
    """Wait until the deployment runs this version of ``dag_file``, then unpause the DAG.

    A DAG promoted with ``--paused`` stays paused here (``trigger`` unpauses it). An import
    error of this version is a :class:`DagImportError`; no such version within ``timeout``
    seconds a :class:`DeployTimeout` that says what the deployment shows instead.
    """
    say = echo or (lambda _line: None)
    path = Path(dag_file)
    local = _read_dag_file(path, dag_id)
    expected = expected_dag(local)
    throttled = False
    since = path.stat().st_mtime - CLOCK_SLACK_S
    started = time.monotonic()
    asked_at: float | None = None
    nudged_at: float | None = None
    reparse_requested = False
    shown = client.config.shown_url
    say(f"waiting for the deployment at {shown} to parse {path.name}")
    while True:
        now = time.monotonic()
        dag = client.dag(dag_id)
        if dag is not None:
            remote = client.dag_source(dag_id)
            read = remote is not None and same_version(local, remote)
            if read and serialized_matches(dag, expected):
                break
            what = "an older version"
            if read and not throttled:
                throttled = True
                say("the deployment has read this file but still schedules the previous DAG "
                    "(it rewrites a DAG at most every [core] min_serialized_dag_update_interval, "
                    "30 s by default): waiting")
            token = dag.get("file_token")
            if token and (asked_at is None or now - asked_at >= REASK_S):
                asked_at = now
                if client.reparse(token) and not reparse_requested:
                    reparse_requested = True
                    say("the deployment has an older version: asked it to re-parse the file")
        else:
            what = "no such DAG yet"
            if nudged_at is None or now - nudged_at >= REASK_S:
                nudged_at = now
                reparse_requested = _nudge(client, dag_id) or reparse_requested
        error = _fresh_import_error(client, path.name, since)
        if error is not None:
            raise DagImportError(f"the deployment at {shown} cannot import {path.name}: {error}")
        if now - started > timeout:
            raise DeployTimeout(
                f"the deployment at {shown} still shows {what} for {dag_id!r} after "
                f"{timeout:.0f} s: is {path.parent} its DAG folder (or synced to it)? A "
                "deployment rescans its folder every [dag_processor] refresh_interval "
                "(300 s by default)")
        time.sleep(poll)
    waited = time.monotonic() - started
    say(f"parsed: the deployment runs this version of {path.name} (after {waited:.1f} s)")
    paused = bool(dag.get("is_paused"))
    unpaused = False
    if paused and unpause and not dag.get("is_paused_upon_creation"):
        client.set_paused(dag_id, False)
        paused, unpaused = False, True
        say(f"unpaused {dag_id}")
    elif paused:
        say(f"{dag_id} is paused (promoted with --paused); `airgpu trigger` unpauses it")
    return Deployed(dag_id, client.ui_url(dag_id), round(waited, 3), reparse_requested,
                    unpaused, paused)


def expected_dag(text: str) -> dict[str, Any] | None:
    """What the deployment's parsed DAG must show for a file we generated: its ``doc_md`` and
    ``params``, read from the file's literals (never by importing it). None for other files.

    The source the API serves is re-read on every parse, but the DAG the scheduler uses is
    rewritten at most every ``[core] min_serialized_dag_update_interval`` (30 s by default):
    a re-promotion within that window shows the new source long before the new DAG.
    """
    if checksum_status(text) is None:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    found: dict[str, Any] = {}
    for node in ast.walk(tree):
        with contextlib.suppress(ValueError, TypeError, SyntaxError, AttributeError):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "DOC_MD"
                    and isinstance(node.value, ast.Call) and node.value.args):
                found["doc_md"] = "\n".join(ast.literal_eval(node.value.args[0]))
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DAG":
                for keyword in node.keywords:
                    if keyword.arg == "params":
                        found["params"] = ast.literal_eval(keyword.value)
    return found or None


def serialized_matches(dag: Mapping[str, Any], expected: Mapping[str, Any] | None) -> bool:
    """The DAG as the deployment serves it shows what ``expected`` says."""
    if not expected:
        return True
    if "doc_md" in expected and dag.get("doc_md") != expected["doc_md"]:
        return False
    if "params" in expected:
        params = {name: (value.get("value") if isinstance(value, dict) else value)
                  for name, value in (dag.get("params") or {}).items()}
        if params != expected["params"]:
            return False
    return True


def _read_dag_file(path: Path, dag_id: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no DAG file {path}: promote the notebook first (airgpu promote ... "
                        f"--dag-id {dag_id}) or pass --dags-dir") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()


def _checksum_line(text: str) -> str | None:
    from .render import CHECKSUM_PREFIX

    for line in text.splitlines():
        if line.startswith(CHECKSUM_PREFIX):
            return line.strip()
    return None


def _nudge(client: AirflowClient, dag_id: str) -> bool:
    """Ask for a re-parse of another registered DAG file, so the processor re-lists its bundle
    (new files included) now rather than at its next refresh. Best effort."""
    try:
        for other in client.dags(limit=10):
            token = other.get("file_token")
            if token and other.get("dag_id") != dag_id and client.reparse(token):
                return True
    except ApiError as exc:
        if exc.status is None:  # unreachable: the next poll says so
            raise
    return False


def _fresh_import_error(client: AirflowClient, name: str, since: float) -> str | None:
    """The last line of the import error of ``name`` stamped after the file here was written
    (an older one is about an older version)."""
    for error in client.import_errors(name):
        stamp = timestamp(error.get("timestamp"))
        if stamp is None or stamp >= since:
            return _last_line(str(error.get("stack_trace") or "")) or "import error"
    return None


def timestamp(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:400] if lines else ""
