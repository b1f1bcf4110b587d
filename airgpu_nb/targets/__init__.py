"""Where a promoted notebook runs. One module per target behind one small interface.

papermill's registry habit: ``register(name, target)`` and a lookup whose error names what
exists. Built-in targets are imported on first lookup, never at package import time.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..errors import SpecError
from ..spec import PromotionSpec


class Target(Protocol):
    """Turns a validated spec into the context its Jinja2 template renders."""

    name: str
    template: str  # file name under airgpu_nb/templates/
    option_names: frozenset[str]  # target-specific options it accepts in ``spec.options``

    def validate(self, spec: PromotionSpec) -> None:
        """Raise ``SpecError`` for settings this target cannot honour."""

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        """Template variables beyond the common ones (see ``render.common_context``)."""


_BUILTIN: dict[str, str] = {
    "local": "airgpu_nb.targets.local:TARGET",
    "compose": "airgpu_nb.targets.compose:TARGET",
    "docker": "airgpu_nb.targets.docker:TARGET",
    "kubernetes": "airgpu_nb.targets.kubernetes:TARGET",
}
_REGISTRY: dict[str, Target] = {}


def register(name: str, target: Target) -> None:
    _REGISTRY[name] = target


def names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        if name not in _BUILTIN:
            raise SpecError.invalid_choice("target", name, names())
        module, attr = _BUILTIN[name].split(":")
        register(name, getattr(importlib.import_module(module), attr))
    return _REGISTRY[name]
