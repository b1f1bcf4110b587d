"""Run the notebook in the Airflow worker itself, on queue ``gpu`` and in pool ``gpu``.

With LocalExecutor (or ``airflow dags test``) the queue is ignored and the pool alone keeps two
runs off one GPU; with CeleryExecutor the ``gpu`` queue sends the task to a GPU worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from ..spec import PromotionSpec


@dataclass(frozen=True)
class LocalTarget:
    name: str = "local"
    template: str = "local.py.j2"
    option_names: frozenset[str] = field(default_factory=frozenset)
    queue: str = "gpu"

    def validate(self, spec: PromotionSpec) -> None:
        if spec.gpu.mig is not None:
            raise SpecError(
                f"--mig needs a target that can request a MIG slice (kubernetes), not {self.name!r}"
            )
        unknown = set(spec.option_map) - self.option_names
        if unknown:
            raise SpecError(f"target {self.name!r} does not take {', '.join(sorted(unknown))}")

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        return {"queue": self.queue}


TARGET = LocalTarget()
