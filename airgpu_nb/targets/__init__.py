"""Where a promoted notebook runs. One module per target behind one small interface
(:class:`airgpu_nb.targets.base.Target`).

papermill's registry habit: ``register(name, target)`` and a lookup whose error names what
exists. Built-in targets and those other packages declare under the ``airgpu.targets`` entry
point group are imported on first lookup, never at package import time.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from ..errors import SpecError
from .base import Target

ENTRY_POINT_GROUP = "airgpu.targets"
_BUILTIN: dict[str, str] = {
    "local": "airgpu_nb.targets.local:TARGET",
    "compose": "airgpu_nb.targets.local:COMPOSE",
    "docker": "airgpu_nb.targets.docker:TARGET",
    "kubernetes": "airgpu_nb.targets.kubernetes:TARGET",
    "kubernetes-executor": "airgpu_nb.targets.kubernetes:EXECUTOR",
}
_REGISTRY: dict[str, Target] = {}

__all__ = ["ENTRY_POINT_GROUP", "Target", "get_target", "names", "register"]


def register(name: str, target: Target) -> None:
    _REGISTRY[name] = target


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Built-in targets in the order help and the panel show them, then the others sorted."""
    others = (set(_REGISTRY) | set(_entry_points())) - set(_BUILTIN)
    return [*_BUILTIN, *sorted(others)]


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        where = _BUILTIN.get(name) or _entry_points().get(name)
        if where is None:
            raise SpecError.invalid_choice("target", name, names())
        module, attr = where.split(":")
        register(name, getattr(importlib.import_module(module), attr))
    return _REGISTRY[name]
