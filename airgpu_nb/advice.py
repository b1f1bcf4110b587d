"""Advisories at promotion: things a notebook does that work interactively but misbehave in a
scheduled run. They are notes, not errors: promotion goes on, the CLI prints them on stderr and
``--json`` carries them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from nbformat import NotebookNode

from .keys import CHECK_TAG, cell_tags, first_line

_PIP = re.compile(r"^\s*(?:!|%)\s*(?:python\d?(?:\.\d+)?\s+-m\s+)?(?:pip|pip3|conda|mamba)\s+"
                  r"install\b", re.MULTILINE)
_SERVERS = re.compile(r"^\s*%\s*(?:tensorboard\b|load_ext\s+tensorboard\b)", re.MULTILINE)
_COLAB = re.compile(r"^\s*(?:from\s+google\.colab\b|import\s+google\.colab\b)", re.MULTILINE)
_HOME = re.compile(r"""(?P<q>['"])(?P<path>(?:/home/|/Users/|[A-Za-z]:\\\\?Users\\\\?)"""
                   r"""[^'"\n]+)(?P=q)""")


def advisories(nb: NotebookNode) -> list[str]:
    """One line per concern, naming the first cell where it appears."""
    found: dict[str, str] = {}
    for number, cell in _code_cells(nb):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        where = f"cell {number} (`{first_line(source, 40)}`)"
        if "pip" not in found and _PIP.search(source):
            found["pip"] = (f"{where} installs packages: at every run it would install into the "
                            "worker's shared environment. Put the packages in the runtime image "
                            "or the worker's environment and remove the install line.")
        if "server" not in found and _SERVERS.search(source):
            found["server"] = (f"{where} starts TensorBoard: a scheduled run has nobody to look "
                               "at it and the server may outlive the run. Write logs to a "
                               "folder and run TensorBoard elsewhere.")
        if "colab" not in found and _COLAB.search(source):
            found["colab"] = (f"{where} imports google.colab, which exists only on Colab: the "
                              "run will fail there. Guard it with `if 'google.colab' in "
                              "sys.modules` or remove it.")
        match = _HOME.search(source)
        if "home" not in found and match:
            found["home"] = (f"{where} uses the absolute path {match.group('path')!r} in the "
                             "author's home folder, which the worker will not have. Use a "
                             "path relative to the notebook or a mounted volume.")
    return list(found.values())


def _code_cells(nb: NotebookNode) -> Iterator[tuple[int, NotebookNode]]:
    for number, cell in enumerate(nb.cells, start=1):
        if cell.get("cell_type") == "code" and CHECK_TAG not in cell_tags(cell):
            yield number, cell
