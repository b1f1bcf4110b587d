"""Writes notebooks/train_classifier.ipynb (kept in the repo; rerun after editing the cells)."""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Train a small classifier with TensorFlow\n\n"
        "A Keras model on a synthetic spiral data set (generated here, no downloads). Promote it "
        "with `airgpu promote notebooks/train_classifier.ipynb`; the `parameters` cell below is "
        "what a scheduled run can override."
    ),
    new_code_cell(
        "epochs = 8\nbatch_size = 128\nlearning_rate = 0.01\nsamples = 6000\nseed = 7",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import json\nimport time\n\nimport numpy as np\nimport tensorflow as tf\n\n"
        "tf.keras.utils.set_random_seed(seed)\n"
        "print('TensorFlow', tf.__version__, '| GPUs:', len(tf.config.list_physical_devices('GPU')))"
    ),
    new_markdown_cell("## Data: three interleaved spirals"),
    new_code_cell(
        "rng = np.random.default_rng(seed)\n"
        "classes = 3\n"
        "per_class = samples // classes\n"
        "radius = np.tile(np.linspace(0.05, 1.0, per_class), classes)\n"
        "label = np.repeat(np.arange(classes), per_class)\n"
        "angle = radius * 4.0 + label * (2 * np.pi / classes) + rng.normal(0, 0.15, radius.size)\n"
        "x = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1).astype('float32')\n"
        "order = rng.permutation(len(x))\n"
        "x, label = x[order], label[order]\n"
        "split = int(0.8 * len(x))\n"
        "(x_train, y_train), (x_test, y_test) = (x[:split], label[:split]), (x[split:], label[split:])\n"
        "print(f'{len(x_train)} training and {len(x_test)} test points')"
    ),
    new_markdown_cell("## Model and training"),
    new_code_cell(
        "model = tf.keras.Sequential([\n"
        "    tf.keras.Input(shape=(2,)),\n"
        "    tf.keras.layers.Dense(64, activation='relu'),\n"
        "    tf.keras.layers.Dense(64, activation='relu'),\n"
        "    tf.keras.layers.Dense(classes, activation='softmax'),\n"
        "])\n"
        "model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),\n"
        "              loss='sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "start = time.perf_counter()\n"
        "history = model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=2)\n"
        "train_seconds = time.perf_counter() - start\n"
        "print(f'trained in {train_seconds:.1f} s, '\n"
        "      f'{epochs * len(x_train) / train_seconds:.0f} samples/s')"
    ),
    new_markdown_cell("## Evaluate and save\n\nFiles land in the run's folder, beside the executed notebook."),
    new_code_cell(
        "loss, accuracy = model.evaluate(x_test, y_test, verbose=0)\n"
        "metrics = {'test_accuracy': round(float(accuracy), 4), 'test_loss': round(float(loss), 4),\n"
        "           'epochs': epochs, 'samples_per_second': round(epochs * len(x_train) / train_seconds)}\n"
        "model.save('model.keras')\n"
        "with open('metrics.json', 'w') as handle:\n"
        "    json.dump(metrics, handle, indent=2)\n"
        "print(f\"test accuracy: {metrics['test_accuracy']:.3f}\")"
    ),
]

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
for index, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{index}"
nbformat.validate(nb)
target = Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks/train_classifier.ipynb")
target.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
print(f"wrote {target}")
