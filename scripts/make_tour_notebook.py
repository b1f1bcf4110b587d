"""Writes notebooks/airgpu_tour.ipynb: the %airgpu magics on the example training notebook."""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# A tour of the `%airgpu` magics\n\n"
        "See the GPUs, pick one, check it, profile a cell, then promote "
        "`train_classifier.ipynb` (beside this notebook) to an Airflow DAG. On a machine "
        "without a GPU every step still works and says so; `--allow-cpu` lets the promoted "
        "run fall back to the CPU."),
    new_code_cell("%load_ext airgpu_nb"),
    new_markdown_cell("`%airgpu?` documents every subcommand. The GPUs as NVML and "
                      "TensorFlow see them:"),
    new_code_cell("%airgpu status"),
    new_markdown_cell("Pick GPU 0 and turn on memory growth. This must happen before "
                      "TensorFlow initialises its GPUs (`%airgpu status` only lists them)."),
    new_code_cell("%airgpu use 0 --memory-growth"),
    new_markdown_cell("The same check a promoted run starts with:"),
    new_code_cell("%airgpu verify --gpus 1 --allow-cpu"),
    new_markdown_cell("How busy were the GPU and the CPU during a cell?"),
    new_code_cell(
        "%%airgpu profile --interval 0.2\n"
        "import tensorflow as tf\n"
        "x = tf.random.uniform((1024, 1024))\n"
        "for _ in range(30):\n"
        "    x = tf.linalg.normalize(tf.matmul(x, x))[0]\n"
        "float(tf.reduce_sum(x))"),
    new_markdown_cell("The panel: a GPU dashboard and a promotion form. **Promote** writes "
                      "the DAG and the prepared notebook and checks the DAG in Airflow's "
                      "DagBag."),
    new_code_cell("%airgpu panel --notebook train_classifier.ipynb --allow-cpu"),
    new_markdown_cell("Or promote from a magic, with the CLI's options:"),
    new_code_cell('%airgpu promote --notebook train_classifier.ipynb --allow-cpu '
                  '--schedule "0 2 * * *" -p epochs 3'),
    new_markdown_cell("Run it now, exactly as the DAG task would (papermill, the GPU check "
                      "first, telemetry recorded):"),
    new_code_cell("%airgpu run --notebook train_classifier.ipynb --allow-cpu -p epochs 1"),
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
