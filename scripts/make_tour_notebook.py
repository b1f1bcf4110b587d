"""Writes notebooks/airgpu_tour.ipynb (kept in the repo; rerun after editing the cells).

The tour runs under `pytest --nbval-lax`: every cell must run cleanly on a machine without a GPU,
and no output is compared (GPU names, timings and widget ids differ from machine to machine).
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# airgpu-nb in Jupyter: see the GPU, pick it, profile, promote\n\n"
        "The whole loop without leaving the notebook. Every cell also runs on a machine without "
        "a GPU: each magic then says so plainly. `%airgpu?` documents every subcommand."
    ),
    new_code_cell("%load_ext airgpu_nb"),
    new_markdown_cell(
        "## Pick the GPU first\n\n`%airgpu use` must run before TensorFlow initialises its "
        "GPUs (after that, it asks you to restart the kernel)."
    ),
    new_code_cell("%airgpu use 0 --memory-growth"),
    new_markdown_cell("## What the driver and TensorFlow see"),
    new_code_cell("%airgpu status"),
    new_markdown_cell(
        "## The GPU check a promoted run starts with\n\n`--allow-cpu` lets it pass on a CPU-only "
        "machine; without it a missing GPU is a one-line error after the report."
    ),
    new_code_cell("%airgpu verify --allow-cpu"),
    new_markdown_cell("## How busy was the GPU during a cell?"),
    new_code_cell(
        "%%airgpu profile --interval 0.1\n"
        "import tensorflow as tf\n\n"
        "x = tf.random.uniform((512, 512))\n"
        "for _ in range(50):\n"
        "    x = tf.linalg.normalize(tf.matmul(x, x))[0]\n"
        "float(tf.reduce_sum(x))"
    ),
    new_markdown_cell(
        "## Promote with one click\n\nThe panel's form is pre-filled from the options and from "
        "the notebook's `parameters` cell. Promote writes the DAG and the prepared notebook, "
        "checks the DAG with Airflow's DagBag and shows the command to run it."
    ),
    new_code_cell(
        "import tempfile\n\n"
        "tour_dags = tempfile.mkdtemp(prefix='airgpu-tour-dags-')  # keep the repo clean"
    ),
    new_code_cell(
        "%airgpu panel --notebook train_classifier.ipynb --dags-dir $tour_dags --allow-cpu "
        "--schedule @daily"
    ),
    new_markdown_cell(
        "## Or promote from a magic\n\nThe same options as `airgpu promote`. In JupyterLab or "
        "VS Code `--notebook` may be left out: the magic promotes the notebook the kernel "
        "belongs to (save it first)."
    ),
    new_code_cell(
        "%airgpu promote --notebook train_classifier.ipynb --dags-dir $tour_dags --allow-cpu "
        "--dag-id train_classifier_tour -p epochs 2"
    ),
]

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
for index, cell in enumerate(nb.cells):
    cell["id"] = f"tour-{index}"
nbformat.validate(nb)
target = Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks/airgpu_tour.ipynb")
target.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
print(f"wrote {target}")
