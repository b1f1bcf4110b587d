"""Run the notebook in the Airflow worker itself, on queue ``gpu`` and in pool ``gpu``.

With LocalExecutor (or ``airflow dags test``) the queue is ignored and the pool alone keeps two
runs off one GPU; with CeleryExecutor the ``gpu`` queue sends the task to a GPU worker.

``compose`` is the same task meant for ``docker/docker-compose.yml``: its GPU worker alone
listens on queue ``gpu`` and holds the GPU reservation, the DAG folder is mounted at
``/opt/airflow/dags`` and ``AIRGPU_OUTPUT_DIR`` points at the outputs volume, so every path the
task uses is a path inside the container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import PromotionSpec
from . import base


@dataclass(frozen=True)
class WorkerTarget:
    name: str = "local"
    template: str = "worker.py.j2"
    queue: str = "gpu"

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        base.no_mig(spec, self.name)
        base.check_options(spec, self.name)
        return {"queue": self.queue, "compose": self.name == "compose"}


TARGET = WorkerTarget()
COMPOSE = WorkerTarget(name="compose")
