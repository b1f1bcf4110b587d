"""airgpu-nb: promote a TensorFlow notebook to an Airflow 3 DAG that runs it on a GPU.

``%load_ext airgpu_nb`` registers the ``%airgpu`` magics. The core API is imported lazily so
that loading the package (and parsing a generated DAG) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython):  # pragma: no cover - exercised through IPython
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython):  # pragma: no cover - exercised through IPython
    from .magics import unload

    unload(ipython)
