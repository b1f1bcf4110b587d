"""Two promotions of one notebook at once: the scheduler never sees a half-written DAG."""

from __future__ import annotations

import ast
import multiprocessing
import time

from airgpu_nb.promote import promote
from airgpu_nb.render import checksum_status
from conftest import write_notebook


def _promote_many(path: str, dags: str, value: int, rounds: int) -> None:
    for i in range(rounds):
        promote(path, dags_dir=dags, parameters={"epochs": value * 1000 + i}).write()


def test_concurrent_promotions_only_ever_expose_complete_files(tmp_path):
    path = write_notebook(tmp_path / "train.ipynb", "print(epochs)", parameters="epochs = 1")
    dags = tmp_path / "dags"
    promote(path, dags_dir=dags).write()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_promote_many, args=(str(path), str(dags), n, 40))
               for n in (1, 2)]
    for w in workers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in workers) or reads == 0:
        for dag in dags.glob("*.py"):
            text = dag.read_text()
            ast.parse(text)
            assert checksum_status(text) is True
            reads += 1
        time.sleep(0.001)
    for w in workers:
        w.join()
        assert w.exitcode == 0
    assert reads > 10
    assert sorted(p.name for p in dags.iterdir()) == ["train.ipynb", "train.py"]  # no temp files
    final = (dags / "train.py").read_text()
    assert "'epochs': 1039" in final or "'epochs': 2039" in final
