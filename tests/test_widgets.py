"""The panel's logic, headless: fill the form, click, read the files and the result area."""

from __future__ import annotations

import html
import threading
from pathlib import Path

import nbformat
import pytest

from airgpu_nb.dashboard import DASHBOARD_CLASS, GpuDashboard
from airgpu_nb.widgets import BUTTON_CLASS, RESULT_CLASS, PromotionForm, PromotionPanel
from conftest import write_notebook


@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    return write_notebook(tmp_path / "Train Model.ipynb", "print(epochs, label)",
                          parameters="epochs = 8\nrate = 0.01\nlabel = 'it\\'s \"x\"\\n2'")


def test_form_is_prefilled_from_the_parameters_cell(notebook: Path, tmp_path: Path) -> None:
    form = PromotionForm(notebook, dags_dir=str(tmp_path / "dags"))
    rows = {k.value: v.value for k, v, _ in form.param_rows}
    assert rows == {"epochs": "8", "rate": "0.01", "label": repr("it's \"x\"\n2")}
    assert form.dag_id.value == "Train_Model"
    assert form.parameters() == {"epochs": 8, "rate": 0.01, "label": "it's \"x\"\n2"}
    assert BUTTON_CLASS in form.button._dom_classes
    assert RESULT_CLASS in form.result._dom_classes
    assert form.button.disabled is False


def test_invalid_input_disables_promote_as_you_type(notebook: Path, tmp_path: Path) -> None:
    form = PromotionForm(notebook, dags_dir=str(tmp_path / "dags"))
    form.dag_id.value = "bad id!"
    assert form.button.disabled is True
    assert "invalid DAG id" in form.messages.value
    form.dag_id.value = "good_id"
    assert form.button.disabled is False and form.messages.value == ""
    form.schedule.value = "cron"
    assert form.button.disabled is True  # cron chosen, nothing typed yet
    form.cron.value = "61 2 * * *"
    assert form.button.disabled is True and "invalid schedule" in form.messages.value
    form.cron.value = "0 2 * * *"
    assert form.button.disabled is False
    form.gpus.value = "-1"
    assert form.button.disabled is True
    form.gpus.value = "all"
    form.add_parameter("1st", "3")
    assert form.button.disabled is True and "invalid parameter name" in form.messages.value
    form.param_rows[-1][0].value = "epochs"
    assert "listed twice" in form.messages.value
    form.remove_parameter(form.param_rows[-1][0])
    assert form.button.disabled is False
    form.button.click()  # nothing happens while invalid... and here it is valid: files appear
    assert (tmp_path / "dags" / "good_id.py").is_file()


def test_only_the_targets_fields_are_shown(notebook: Path, tmp_path: Path) -> None:
    form = PromotionForm(notebook, dags_dir=str(tmp_path))
    shown = {name for name, c in form._fields.items() if c.layout.display != "none"}
    assert shown == {"gpus"}
    form.target.value = "kubernetes"
    shown = {name for name, c in form._fields.items() if c.layout.display != "none"}
    assert shown == {"gpus", "mig", "image", "node_selector", "tolerations"}
    form.mig.value = "1g.10gb"
    assert form.gpus.disabled is True
    form.target.value = "docker"
    assert form.mig.layout.display == "none" and form.image.layout.display is None
    assert form.settings()["mig"] is None  # a hidden MIG choice is not sent


def test_click_promotes_writes_files_and_describes_the_result(notebook, tmp_path) -> None:
    dags = tmp_path / "dags"
    form = PromotionForm(notebook, dags_dir=str(dags))
    form.dag_id.value = "panel_dag"
    form.schedule.value = "@daily"
    form.allow_cpu.value = True
    form.param_rows[0][1].value = "3"  # epochs
    form.add_parameter("note", "hello world")
    assert form.button.disabled and "'note' is not set in the parameters cell" in \
        html.unescape(form.messages.value)  # as `airgpu promote -p note ...` says
    form.allow_new_parameters.value = True
    form.button.click()
    dag_file, prepared = dags / "panel_dag.py", dags / "panel_dag.ipynb"
    assert dag_file.is_file() and prepared.is_file()
    text = form.result.value
    assert "panel_dag" in text and str(dag_file) in text and str(prepared) in text
    assert "imports cleanly in Airflow&#x27;s DagBag (panel_dag)" in text
    assert "airflow dags test panel_dag" in text
    assert "Traceback" not in text
    settings = nbformat.read(prepared, as_version=4).metadata["airgpu"]["settings"]
    assert settings["parameters"] == {"epochs": 3, "rate": 0.01, "label": "it's \"x\"\n2",
                                      "note": "hello world"}
    assert settings["schedule"] == "@daily" and settings["allow_cpu"] is True
    assert "@daily" in dag_file.read_text()
    assert form.button.disabled is False  # ready for the next click


def test_errors_are_plain_words_in_the_result_area(notebook: Path, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "mine.py").write_text("# my own DAG\n")
    form = PromotionForm(notebook, dags_dir=str(dags))
    form.dag_id.value = "mine"
    form.button.click()
    assert "Could not promote" in form.result.value
    assert "not generated by airgpu-nb; use --force" in form.result.value
    assert "Traceback" not in form.result.value
    assert (dags / "mine.py").read_text() == "# my own DAG\n"
    form.force.value = True
    form.button.click()
    assert "Promoted DAG" in form.result.value and "airgpu" in (dags / "mine.py").read_text()


def test_prefilled_options_carry_through_to_promote(notebook: Path, tmp_path: Path) -> None:
    form = PromotionForm(notebook, dags_dir=str(tmp_path), options={
        "dag_id": "pre", "schedule": "@hourly", "retries": 4, "tags": ["team"],
        "parameters": {"rate": 0.5}, "gpus": 2})
    assert form.schedule.value == "@hourly" and form.gpus.value == "2"
    assert {k.value: v.value for k, v, _ in form.param_rows}["rate"] == "0.5"
    settings = form.settings()
    assert settings["retries"] == 4 and settings["tags"] == ["team"] and settings["gpus"] == 2


def fake_inventory(utils: list[int]) -> dict:
    return {"driver_version": "550.1", "cuda_driver_version": "12.4", "devices": [
        {"index": i, "name": f"Fake GPU {i}", "uuid": f"GPU-{i}", "memory_total_mb": 1000,
         "memory_used_mb": 250 * (i + 1), "utilization_pct": u, "mig_mode": False,
         "mig_devices": []} for i, u in enumerate(utils)]}


def test_dashboard_has_a_bar_per_gpu_and_the_thread_updates_values() -> None:
    calls = []
    seen = threading.Event()

    def probe() -> dict:
        calls.append(1)
        if len(calls) >= 3:
            seen.set()
        return fake_inventory([10 * len(calls), 5])

    dashboard = GpuDashboard(interval_s=0.02, probe=probe)
    assert DASHBOARD_CLASS in dashboard.widget._dom_classes
    assert sorted(dashboard.bars) == [0, 1]
    util0, mem0, _ = dashboard.bars[0]
    assert util0.value == 10 and mem0.value == 25.0
    dashboard.start()
    assert dashboard.start_button.disabled and not dashboard.stop_button.disabled
    assert seen.wait(5), "the refresh thread never read the GPUs"
    dashboard.stop()
    assert not dashboard.running and not dashboard.start_button.disabled
    assert util0.value >= 30 and dashboard.bars[1][1].value == 50.0
    count = len(calls)
    threading.Event().wait(0.1)
    assert len(calls) == count  # stopped means stopped


def test_dashboard_without_a_gpu_says_so_and_does_not_start(notebook: Path) -> None:
    panel = PromotionPanel(notebook, probe=lambda: None)
    assert panel.dashboard.bars == {}
    assert "No GPU" in panel.dashboard.status.value
    panel.dashboard.start_if_gpus()
    assert not panel.dashboard.running
    panel.close()


def test_kubernetes_fields_reach_the_dag_through_the_cli_parser(notebook, tmp_path) -> None:
    form = PromotionForm(notebook, dags_dir=str(tmp_path / "dags"))
    form.target.value = "kubernetes"
    form.mig.value = "1g.10gb"
    form.image.value = "registry.example/train:1"
    form.node_selector.value = "pool=gpu"
    form.tolerations.value = "nvidia.com/gpu=present:NoSchedule"
    form.button.click()
    assert "Promoted DAG" in form.result.value, form.result.value
    source = (tmp_path / "dags" / "Train_Model.py").read_text()
    for expected in ("1g.10gb", "registry.example/train:1", "pool", "NoSchedule"):
        assert expected in source


def test_the_form_shows_what_promotion_will_carry_before_the_click(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("a\n1\n")
    notebook = write_notebook(tmp_path / "reads.ipynb",
                              "import numpy\nrows = open('data/train.csv').read()")
    form = PromotionForm(notebook, dags_dir=str(tmp_path / "dags"))
    shown = form.carried.value
    assert "data/train.csv" in shown and "numpy" in shown
    assert not (tmp_path / "dags").exists()  # shown, not written
