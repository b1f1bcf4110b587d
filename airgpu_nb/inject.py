"""Pure notebook transforms: the prepared copy a DAG runs.

Borrowed from papermill's ``parameterize``: the verification cell is found by its tag, replaced
when present and otherwise inserted right after the ``parameters`` cell, so papermill's
``injected-parameters`` cell lands before it and a run can override ``gpus_requested``.
"""

from __future__ import annotations

import copy
import itertools
from functools import lru_cache
from importlib import resources

import nbformat
from nbformat import NotebookNode

from . import __version__
from .keys import (
    CHECK_TAG,
    INJECTED_PARAMETERS_TAG,
    METADATA_KEY,
    PARAMETERS_TAG,
    cell_tags,
    set_cell_id,
)
from .spec import PromotionSpec

# CHECK_TAG and METADATA_KEY stay importable from here for the modules that still do so.
__all__ = ["CHECK_TAG", "METADATA_KEY", "check_cell_source", "make_check_cell", "prepare"]

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


def make_check_cell(spec: PromotionSpec, nb: NotebookNode | None = None) -> NotebookNode:
    """The tagged check cell for ``nb``: with a stable id only where its nbformat minor version
    allows ids (4.5 on; an id in an older notebook fails validation), without one otherwise."""
    cell = nbformat.v4.new_code_cell(check_cell_source(spec.gpu.count, spec.allow_cpu))
    cell.metadata["tags"] = [CHECK_TAG]
    cell.metadata["jupyter"] = {"source_hidden": True}
    if nb is None:
        return set_cell_id({"nbformat": 4, "nbformat_minor": 5}, cell, CHECK_TAG)
    return set_cell_id(nb, cell, _free_id(nb))


def prepare(nb: NotebookNode, spec: PromotionSpec) -> NotebookNode:
    """A prepared copy of ``nb``: outputs cleared, one check cell, settings recorded.

    Outputs are cleared because the copy is an input to a scheduled run: interactive outputs
    (which may show tokens or data) have no business in the DAG folder.
    """
    prepared = copy.deepcopy(nb)
    prepared.cells = [c for c in prepared.cells if CHECK_TAG not in cell_tags(c)]
    for cell in prepared.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    anchor = _anchor_index(prepared)
    prepared.cells.insert(anchor + 1, make_check_cell(spec, prepared))
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
    tagged = {tag: i for i, cell in reversed(list(enumerate(nb.cells)))
              for tag in cell_tags(cell)}
    params = tagged.get(PARAMETERS_TAG)
    injected = tagged.get(INJECTED_PARAMETERS_TAG)
    if params is None:
        return -1 if injected is None else injected
    return params + 1 if injected == params + 1 else params


def _free_id(nb: NotebookNode) -> str:
    """``CHECK_TAG``, unless a user cell already has that id (ids must be unique)."""
    taken = {cell.get("id") for cell in nb.cells}
    names = (f"{CHECK_TAG}-{n}" if n else CHECK_TAG for n in itertools.count())
    return next(name for name in names if name not in taken)
