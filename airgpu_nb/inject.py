"""Pure notebook transforms: the prepared copy a DAG runs.

Borrowed from papermill's ``parameterize``: the verification cell is found by its tag, replaced
when present and otherwise inserted right after the ``parameters`` cell, so papermill's
``injected-parameters`` cell lands before it and a run can override ``gpus_requested``.
"""

from __future__ import annotations

import ast
import copy
import itertools
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

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


#: Calls that must come before TensorFlow initialises its devices ("... cannot be modified after
#: being initialized"): a notebook making one is probed in a child process.
_DEVICE_SETUP = re.compile(
    r"\bset_(logical_device_configuration|virtual_device_configuration|visible_devices"
    r"|memory_growth|inter_op_parallelism_threads|intra_op_parallelism_threads"
    r"|synchronous_execution|device_policy)\b|\bTPUClusterResolver\b|\bconnect_to_cluster\b"
    r"|\b(?:CUDA_VISIBLE_DEVICES|TF_[A-Z0-9_]+|XLA_FLAGS)\b")  # environment TF reads at start
_IMPORTS_TENSORFLOW = re.compile(r"^\s*(?:import|from)\s+(?:tensorflow|keras|tf_keras)\b",
                                 re.MULTILINE)


def probes_in_kernel(nb: NotebookNode) -> bool:
    """Whether the check may run TensorFlow's probe in the kernel: only for a notebook that
    imports TensorFlow anyway (the import is shared, about 3 s) and never configures devices,
    memory or threads, which TensorFlow refuses once the probe has initialised it."""
    code = "\n".join(cell.get("source", "") for cell in nb.cells
                     if cell.get("cell_type") == "code" and CHECK_TAG not in cell_tags(cell))
    return bool(_IMPORTS_TENSORFLOW.search(code)) and not _DEVICE_SETUP.search(code)


def check_cell_source(gpus_requested: int | str, allow_cpu: bool,
                      packages: Sequence[Mapping[str, Any]] = (),
                      allow_missing_packages: bool = False, probe_in_kernel: bool = False) -> str:
    """The verification cell: the readable check module, then one call with literal defaults.
    ``packages`` (``needs.Package.as_dict()`` items) are checked to be importable first."""
    extra = ",\n    probe_in_kernel=True" if probe_in_kernel else ""
    if packages or allow_missing_packages:
        items = [[p["module"], p.get("distribution"), p.get("version")] for p in packages]
        if ast.literal_eval(repr(items)) != items:  # names from package metadata: literals only
            raise ValueError(f"package names without a literal: {items!r}")
        extra += (f",\n    packages={items!r},\n"
                  f"    allow_missing_packages={bool(allow_missing_packages)!r}")
    call = (
        f"gpus_requested = globals().get('gpus_requested', {gpus_requested!r})\n"
        f"allow_cpu = globals().get('allow_cpu', {bool(allow_cpu)!r})\n"
        f"airgpu_gpu_report = verify_gpus(gpus_requested, allow_cpu{extra})\n"
    )
    return f"{CELL_HEADER}\n{_check_source().rstrip()}\n\n\n{call}"


def make_check_cell(spec: PromotionSpec, nb: NotebookNode | None = None,
                    packages: Sequence[Mapping[str, Any]] = ()) -> NotebookNode:
    """The tagged check cell for ``nb``: with a stable id only where its nbformat minor version
    allows ids (4.5 on; an id in an older notebook fails validation), without one otherwise."""
    allow_missing = bool(spec.option_map.get("allow_missing_packages"))
    cell = nbformat.v4.new_code_cell(check_cell_source(
        spec.gpu.count, spec.allow_cpu, packages, allow_missing,
        probe_in_kernel=nb is not None and probes_in_kernel(nb)))
    cell.metadata["tags"] = [CHECK_TAG]
    cell.metadata["jupyter"] = {"source_hidden": True}
    if nb is None:
        return set_cell_id({"nbformat": 4, "nbformat_minor": 5}, cell, CHECK_TAG)
    return set_cell_id(nb, cell, _free_id(nb))


def prepare(nb: NotebookNode, spec: PromotionSpec, *,
            packages: Sequence[Mapping[str, Any]] = (), bundle: str | None = None
            ) -> NotebookNode:
    """A prepared copy of ``nb``: outputs cleared, one check cell, settings recorded.

    Outputs are cleared because the copy is an input to a scheduled run: interactive outputs
    (which may show tokens or data) have no business in the DAG folder. ``packages`` the
    notebook imports are recorded and checked by the check cell; ``bundle`` names the folder
    beside the copy that holds the files it carries (see :mod:`airgpu_nb.bundle`).
    """
    prepared = copy.deepcopy(nb)
    prepared.cells = [c for c in prepared.cells if CHECK_TAG not in cell_tags(c)]
    for cell in prepared.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    anchor = _anchor_index(prepared)
    prepared.cells.insert(anchor + 1, make_check_cell(spec, prepared, packages))
    prepared.metadata[METADATA_KEY] = {
        "generated_by": f"airgpu-nb {__version__}",
        "source_notebook": spec.notebook_name,
        "settings": spec.settings(),
    }
    if packages:
        prepared.metadata[METADATA_KEY]["packages"] = [dict(p) for p in packages]
    if bundle is not None:
        prepared.metadata[METADATA_KEY]["bundle"] = bundle
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
