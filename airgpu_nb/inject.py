"""Pure notebook transforms: the prepared copy a DAG runs.

Borrowed from papermill's ``parameterize``: the verification cell is found by its tag, replaced
when present and otherwise inserted right after the ``parameters`` cell, so papermill's
``injected-parameters`` cell lands before it and a run can override ``gpus_requested``.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources

import nbformat
from nbformat import NotebookNode

from . import __version__
from .spec import PromotionSpec

CHECK_TAG = "airgpu-gpu-check"
PARAMETERS_TAG = "parameters"
INJECTED_PARAMETERS_TAG = "injected-parameters"
METADATA_KEY = "airgpu"

CELL_HEADER = """\
# airgpu-nb GPU check, injected by `airgpu promote` (replaced on re-promotion; edit the source
# notebook, not this copy). `gpus_requested` and `allow_cpu` are papermill parameters: a run can
# override them, e.g. `airgpu run NOTEBOOK -p allow_cpu True`.
"""


@lru_cache(maxsize=1)
def _check_source() -> str:
    return resources.files(__package__).joinpath("gpu_check.py").read_text(encoding="utf-8")


def check_cell_source(gpus_requested: int | str, allow_cpu: bool) -> str:
    """The verification cell: the readable check module, then one call with literal defaults."""
    call = (
        f"gpus_requested = globals().get('gpus_requested', {gpus_requested!r})\n"
        f"allow_cpu = globals().get('allow_cpu', {bool(allow_cpu)!r})\n"
        "airgpu_gpu_report = verify_gpus(gpus_requested, allow_cpu)\n"
    )
    return f"{CELL_HEADER}\n{_check_source().rstrip()}\n\n\n{call}"


def make_check_cell(spec: PromotionSpec) -> NotebookNode:
    cell = nbformat.v4.new_code_cell(check_cell_source(spec.gpu.count, spec.allow_cpu))
    cell.metadata["tags"] = [CHECK_TAG]
    cell.metadata["jupyter"] = {"source_hidden": True}
    cell.pop("id", None)
    cell["id"] = CHECK_TAG
    return cell


def prepare(nb: NotebookNode, spec: PromotionSpec) -> NotebookNode:
    """A prepared copy of ``nb``: outputs cleared, one check cell, settings recorded.

    Outputs are cleared because the copy is an input to a scheduled run: interactive outputs
    (which may show tokens or data) have no business in the DAG folder.
    """
    prepared = copy.deepcopy(nb)
    prepared.cells = [c for c in prepared.cells if CHECK_TAG not in _tags(c)]
    for cell in prepared.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    anchor = _anchor_index(prepared)
    prepared.cells.insert(anchor + 1, make_check_cell(spec))
    prepared.metadata[METADATA_KEY] = {
        "generated_by": f"airgpu-nb {__version__}",
        "source_notebook": spec.notebook_name,
        "settings": spec.settings(),
    }
    nbformat.validate(prepared)
    return prepared


def _anchor_index(nb: NotebookNode) -> int:
    """Index of the cell the check goes after; -1 puts it at the top.

    That is the first ``parameters`` cell, or the ``injected-parameters`` cell papermill left
    behind it (or at the top, when the notebook has no ``parameters`` cell).
    """
    tagged = {tag: i for i, cell in reversed(list(enumerate(nb.cells))) for tag in _tags(cell)}
    params = tagged.get(PARAMETERS_TAG)
    injected = tagged.get(INJECTED_PARAMETERS_TAG)
    if params is None:
        return -1 if injected is None else injected
    return params + 1 if injected == params + 1 else params


def _tags(cell: NotebookNode) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])
