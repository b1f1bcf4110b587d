"""Run the notebook on the GPU worker of ``docker/docker-compose.yml``.

The same task as the local target (queue ``gpu``, pool ``gpu`` with one slot per GPU), meant for
the compose stack: its GPU worker alone listens on queue ``gpu`` and holds the GPU reservation,
the DAG folder is mounted at ``/opt/airflow/dags`` and ``AIRGPU_OUTPUT_DIR`` points at the
outputs volume, so every path the task uses is a path inside the container.
"""

from __future__ import annotations

from .local import LocalTarget

TARGET = LocalTarget(name="compose", template="compose.py.j2")
