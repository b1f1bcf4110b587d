"""Third-party imports mapped to the distributions that provide them here, and their versions:
what a promoted notebook records and its verification cell checks on the worker.

Only metadata is read (``importlib.metadata``, ``find_spec``); nothing is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Distributions whose import name differs from their own (checked against their metadata).
_ALIASES = {
    "sklearn": "scikit-learn", "cv2": "opencv-python", "yaml": "PyYAML", "PIL": "Pillow",
    "bs4": "beautifulsoup4", "skimage": "scikit-image", "dateutil": "python-dateutil",
    "attr": "attrs", "jwt": "PyJWT", "dotenv": "python-dotenv", "git": "GitPython",
    "zmq": "pyzmq", "Crypto": "pycryptodome", "OpenSSL": "pyOpenSSL", "serial": "pyserial",
    "docx": "python-docx", "google.protobuf": "protobuf",
}


@dataclass(frozen=True)
class Package:
    """A third-party import: its top-level module, and the distribution and version installed
    where the notebook was promoted (None when it is not installed here)."""

    module: str
    distribution: str | None = None
    version: str | None = None
    installed: bool = False  # False: the notebook imports it but it is not installed here

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "distribution": self.distribution,
                "version": self.version, "installed": self.installed}

    @property
    def label(self) -> str:
        """'scikit-learn 1.7.2', or the module name when it is not installed here."""
        if self.distribution is None:
            return self.module
        return f"{self.distribution} {self.version}" if self.version else self.distribution


def is_stdlib(name: str) -> bool:
    return (name in sys.stdlib_module_names or name in sys.builtin_module_names
            or name == "__future__" or not name.isidentifier())


def package_of(module: str) -> Package:
    """The distribution that provides top-level ``module`` here, and its version."""
    found = _distribution_of(module)
    if found is None:
        return Package(module)
    name, version = found
    return Package(module, name, version, installed=True)


def _distribution_of(module: str) -> tuple[str | None, str | None] | None:
    """(distribution, version); (None, None) when several provide it (a namespace such as
    ``google``); None when nothing here provides it. Tries the likely names first: the full
    scan of every installed distribution costs a few hundred milliseconds."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin in (None, "namespace"):  # shared by several distributions
        return None, None
    for candidate in _candidates(module, spec):
        if _provides(candidate, module):
            return _name(candidate), candidate.version
    providers = _all_providers().get(module, [])
    if len(set(providers)) == 1:
        dist = metadata.distribution(providers[0])
        return _name(dist), dist.version
    return (None, None) if providers else None


def _candidates(module: str, spec: Any) -> Iterator[metadata.Distribution]:
    for name in (_ALIASES.get(module), module):
        found = _installed(name) if name else None
        if found is not None:
            yield found
    yield from _prefixed(module, spec)


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _prefixed(module: str, spec: Any) -> Iterator[metadata.Distribution]:
    """Distributions beside the module whose name starts with it (tensorflow -> tensorflow-cpu)."""
    places = list(spec.submodule_search_locations or [])
    if spec.origin and not places:
        places = [os.path.dirname(spec.origin)]
    elif places:
        places = [os.path.dirname(p) for p in places]
    wanted = _normalise(module)
    for place in dict.fromkeys(places):
        try:
            entries = os.listdir(place)
        except OSError:
            continue
        for entry in sorted(entries):
            if entry.endswith(".dist-info") and _normalise(entry.split("-")[0]).startswith(wanted):
                yield metadata.PathDistribution(Path(place) / entry)


def _provides(dist: metadata.Distribution, module: str) -> bool:
    """Whether ``dist`` installs top-level ``module`` (its RECORD is searched as text: parsing
    a large one into paths costs a tenth of a second)."""
    text = dist.read_text("top_level.txt")
    if text:
        return module in text.split()
    record = dist.read_text("RECORD") or ""
    pattern = rf"(?m)^{re.escape(module)}(/|\.py,|\.[^/,]*\.(so|pyd),)"
    return re.search(pattern, record) is not None


@functools.lru_cache(maxsize=1)
def _all_providers() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _name(dist: metadata.Distribution) -> str | None:
    return dist.metadata["Name"] if dist.metadata is not None else None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
