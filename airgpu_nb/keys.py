"""Names several parts share: the notebook metadata namespace, cell tags, and small helpers to
read and add cells whatever the notebook's nbformat minor version.

Standard library only: the papermill engine imports this while papermill loads its entry points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``nb.metadata[METADATA_KEY]`` holds the promotion settings and the run's telemetry;
#: ``cell.metadata[METADATA_KEY]`` holds a cell's telemetry.
METADATA_KEY = "airgpu"
CHECK_TAG = "airgpu-gpu-check"
IDLE_TAG = "airgpu-idle-warning"
PARAMETERS_TAG = "parameters"
INJECTED_PARAMETERS_TAG = "injected-parameters"


def cell_tags(cell: Mapping[str, Any]) -> list[str]:
    tags = (cell.get("metadata") or {}).get("tags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def allows_cell_ids(nb: Mapping[str, Any]) -> bool:
    """Cell ids exist from nbformat 4.5 on; an older notebook must not get one."""
    major = nb.get("nbformat", 4)
    minor = nb.get("nbformat_minor", 0)
    return (major, minor) >= (4, 5)


def set_cell_id(nb: Mapping[str, Any], cell: Any, cell_id: str) -> Any:
    """Give ``cell`` a stable id where the notebook's version allows ids, else remove it."""
    cell.pop("id", None)
    if allows_cell_ids(nb):
        cell["id"] = cell_id
    return cell


def first_line(source: str | list[str], width: int = 60) -> str:
    """A cell's first non-blank line, shortened to ``width`` characters."""
    text = "".join(source) if isinstance(source, list) else str(source)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "\u2026"


#: ``[tool.airgpu]`` keys that configure the Airflow deployment (:mod:`airgpu_nb.airflow_api`),
#: not a promotion; the secret ones are refused there (credentials belong in the environment).
DEPLOYMENT_FILE_KEYS = frozenset({"airflow_url", "airflow_username"})
DEPLOYMENT_SECRET_KEYS = frozenset({"airflow_password", "airflow_token"})
