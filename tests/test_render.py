"""DAG rendering: deterministic, literal-only, parseable, and guarded against hand edits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from airgpu_nb import __version__
from airgpu_nb.errors import SpecError
from airgpu_nb.render import checksum_status, literal, render_dag
from airgpu_nb.spec import GpuRequest, PromotionSpec

GOLDEN = Path(__file__).parent / "golden"
AWKWARD = {
    "quote": "it's \"both\" quotes",
    "newline": "line one\nline two\r\n\ttabbed",
    "unicode": "naïve café — 日本語 🚀",
    "code_like": "'); import os; os.system('id'); ('",
    "backslash": "C:\\new\\table",
    "empty": "",
    "big": 2**70,
    "neg_float": -1.5e-300,
    "flag": False,
    "nothing": None,
}


def stable(text: str) -> str:
    """Version stamps and the checksum (which covers them) are kept out of golden files."""
    text = text.replace(f"airgpu-nb {__version__}", "airgpu-nb VERSION")
    return re.sub(r"sha256=[0-9a-f]{64}", "sha256=CHECKSUM", text)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if not path.exists():  # the jupytext habit: create when missing, review, commit
        path.write_text(stable(text), encoding="utf-8")
    assert stable(text) == path.read_text(encoding="utf-8")


def test_local_dag_matches_golden_file():
    spec = PromotionSpec(dag_id="train_classifier", notebook_name="train_classifier.ipynb",
                         source="notebooks/train_classifier.ipynb", schedule="@daily",
                         parameters=(("epochs", 3), ("learning_rate", 0.01)))
    golden("local_daily.py", render_dag(spec))


def test_awkward_values_render_as_literals_that_read_back_exactly():
    spec = PromotionSpec(dag_id="awk.ward-1", notebook_name="we ird.ipynb",
                         parameters=tuple(AWKWARD.items()), tags=("a'b", "ü"),
                         gpu=GpuRequest(count="all"), allow_cpu=True)
    source = render_dag(spec)
    golden("local_awkward.py", source)
    tree = ast.parse(source)
    dag_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and getattr(n.func, "id", None) == "DAG")
    keywords = {k.arg: k.value for k in dag_call.keywords}
    assert ast.literal_eval(keywords["params"]) == AWKWARD
    assert ast.literal_eval(keywords["tags"]) == ["a'b", "ü"]
    assert ast.literal_eval(keywords["dag_id"]) == "awk.ward-1"
    # nothing the user typed became a name, a call or an import
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"os", "system", "id"}


def test_rendering_is_deterministic():
    spec = PromotionSpec(dag_id="x", notebook_name="x.ipynb", parameters=(("b", 1), ("a", 2)))
    assert render_dag(spec) == render_dag(spec)


def test_literal_refuses_values_that_do_not_read_back():
    assert literal({"a": [1, "b"]}) == "{'a': [1, 'b']}"
    for bad in (float("nan"), object(), {1, 2}.__iter__()):
        with pytest.raises(SpecError):
            literal(bad)


def test_checksum_tells_generated_edited_and_foreign_files_apart():
    source = render_dag(PromotionSpec(dag_id="x", notebook_name="x.ipynb"))
    assert checksum_status(source) is True
    assert checksum_status(source.replace("retries", "retries ", 1)) is False
    assert checksum_status("from airflow import DAG\n") is None


@pytest.mark.parametrize("name", ["evil\nimport os.ipynb", "evil\rimport os.ipynb",
                                  "evil\u2028x.ipynb", "evil\x0bimport os.ipynb"])
def test_a_notebook_name_with_line_breaks_cannot_escape_the_header_comments(name):
    source = render_dag(PromotionSpec(dag_id="x", notebook_name=name))
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "os" not in imported
    header = source.split('"""', 1)[0]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
