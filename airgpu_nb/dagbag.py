"""Ask Airflow whether a written DAG file imports, without importing Airflow here.

The DagBag runs in a child process: importing Airflow configures logging, settings and plugins,
which a user's kernel should not inherit, and a broken DAG must not take the kernel down with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

_DAGBAG_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
try:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:
        from airflow.models.dagbag import DagBag
except ImportError as exc:
    print("AIRGPU_DAGBAG " + json.dumps({"airflow": False, "error": str(exc)}))
    sys.exit(0)
bag = DagBag(dag_folder=sys.argv[1])
print("AIRGPU_DAGBAG " + json.dumps({
    "airflow": True,
    "dag_ids": sorted(bag.dag_ids),
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
}))
"""
_MARKER = "AIRGPU_DAGBAG "


@dataclass(frozen=True)
class DagImportCheck:
    """Whether Airflow's DagBag imports a DAG file: ``ok`` is None when Airflow is absent."""

    ok: bool | None
    message: str
    dag_ids: tuple[str, ...] = ()
    seconds: float = 0.0


def check_dag_import(dag_file: str | os.PathLike[str], dag_id: str | None = None,
                     timeout: float = 300.0) -> DagImportCheck:
    """Parse ``dag_file`` with Airflow's DagBag in a child process and say what it found."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _DAGBAG_SCRIPT, str(dag_file)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return DagImportCheck(False, f"DagBag did not finish within {timeout:.0f} s")
    seconds = time.perf_counter() - start
    found = [line[len(_MARKER):] for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if not found:
        tail = _last_line(proc.stderr) or f"exit code {proc.returncode}"
        return DagImportCheck(False, f"DagBag check crashed: {tail}", seconds=seconds)
    data = json.loads(found[-1])
    if not data["airflow"]:
        return DagImportCheck(None, "skipped: Airflow is not installed in this environment",
                              seconds=seconds)
    errors = data["import_errors"]
    ids = tuple(data["dag_ids"])
    if errors:
        first = _last_line(next(iter(errors.values())))
        return DagImportCheck(False, f"import error: {first}", ids, seconds)
    if dag_id is not None and dag_id not in ids:
        return DagImportCheck(False, f"the file imports but defines no DAG {dag_id!r}", ids,
                              seconds)
    return DagImportCheck(True, f"imports cleanly in Airflow's DagBag ({', '.join(ids)})", ids,
                          seconds)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
