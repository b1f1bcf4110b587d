"""What an executed notebook found: the GPU check's report, the error if a cell failed, and the
files the run left beside it. Used by `make demo` and anything that summarises a run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat

from .gpu_check import REPORT_MIME
from .inject import CHECK_TAG


def gpu_report(nb: nbformat.NotebookNode) -> dict[str, Any] | None:
    """The report the verification cell displayed, or None when it never ran."""
    for cell in nb.cells:
        if CHECK_TAG in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if REPORT_MIME in data:
                    return dict(data[REPORT_MIME])
    return None


def first_error(nb: nbformat.NotebookNode) -> dict[str, Any] | None:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return {"cell": index, "ename": output.get("ename"),
                        "evalue": output.get("evalue")}
    return None


def read_findings(executed: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(executed)
    nb = nbformat.read(path, as_version=4)
    metrics_file = path.parent / "metrics.json"
    return {
        "executed_notebook": str(path),
        "gpu_report": gpu_report(nb),
        "error": first_error(nb),
        "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
        "telemetry": nb.metadata.get("airgpu", {}).get("telemetry", {}).get("summary"),
    }
