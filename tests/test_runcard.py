"""The panel's **Promote and run**, headless: fill the form, click, wait on the run card, against
the real LocalExecutor deployment of `tests/deployment.py` (fixtures `deployment`/`configured`)."""

from __future__ import annotations

import html
import secrets
import threading
import time
from pathlib import Path

import pytest
from deployment import free_port

from airgpu_nb.runcard import CARD_CLASS, STATE_CLASS, RunCard
from airgpu_nb.widgets import RUN_BUTTON_CLASS, PromotionForm, PromotionPanel
from conftest import write_notebook

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

RUN_TIMEOUT_S = 180


def _form(nb: Path, dags: Path, dag_id: str) -> PromotionForm:
    form = PromotionForm(nb, dags_dir=str(dags), options={"retries": 0})
    form.dag_id.value = dag_id
    form.allow_cpu.value = True
    return form


def _ended(card: RunCard) -> RunCard:
    assert card.wait(RUN_TIMEOUT_S), f"the card is still {card.state}: {card.progress.value}"
    return card


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Exceptions that escape a background thread (a traceback in the kernel)."""
    seen: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: seen.append(f"{args.exc_type.__name__}: {args.exc_value}"))
    return seen


def test_promote_and_run_adds_a_card_per_click_that_ends_in_success(
        configured, tmp_path, thread_errors) -> None:
    deployment = configured
    nb = write_notebook(tmp_path / "card_nb.ipynb", "print(word * 2)", parameters="word = 'a'")
    form = _form(nb, deployment.dags, "card_ok")
    assert RUN_BUTTON_CLASS in form.run_button._dom_classes
    assert form.run_button.disabled is False
    form.param_rows[0][1].value = "'b c'"
    started = time.monotonic()
    form.run_button.click()
    clicked = time.monotonic() - started
    assert (deployment.dags / "card_ok.py").is_file()  # promoted by the same path as Promote
    assert "Could not promote" not in form.result.value
    assert len(form.cards) == 1 and form.runs_box.children == (form.cards[0].widget,)
    first = form.cards[0]
    assert not first.finished, "the click waited for the run: the kernel would be blocked"
    assert CARD_CLASS in first.widget._dom_classes
    assert STATE_CLASS in first.state_label._dom_classes
    form.run_button.click()  # a second run of the same DAG: a second card
    assert len(form.cards) == 2 and len(form.runs_box.children) == 2
    for card in form.cards:
        _ended(card)
    print(f"\nclick returned in {clicked:.1f}s; both runs ended after "
          f"{time.monotonic() - started:.1f}s")
    assert thread_errors == []
    for card in form.cards:
        assert card.state == "success", (card.error, card.result, deployment.tail("scheduler"))
        assert "success" in card.state_label.value
        assert card.result.conf == {"word": "b c"}
        executed = Path(card.result.executed_notebook)
        assert executed.is_file() and executed.is_relative_to(deployment.outputs)
        assert html.escape(str(executed)) in card.details.value
        assert "telemetry" in card.details.value and "no GPU sampled" in card.details.value
        assert f"href='{deployment.url}/dags/card_ok/runs/manual__" in card.link.value
        assert "try 1 of 1" in card.attempt.value
        assert card.elapsed.value.endswith(" s")
        assert "GPU util" in card.report.value  # `airgpu report`'s table of the executed notebook
    assert form.cards[0].run_id != form.cards[1].run_id


def test_a_failing_notebook_ends_the_card_failed_naming_the_cell(configured, tmp_path,
                                                                   thread_errors) -> None:
    deployment = configured
    nb = write_notebook(tmp_path / "card_fail.ipynb", "x = 1",
                        "raise ValueError('boom from the card')")
    form = _form(nb, deployment.dags, "card_fails")
    form.run_button.click()
    card = _ended(form.cards[0])
    assert card.state == "failed", (card.error, deployment.tail("scheduler"))
    assert "failed" in card.state_label.value
    assert "cell 3 raised ValueError: boom from the card" in card.details.value
    executed = card.result.executed_notebook
    assert executed and Path(executed).is_relative_to(deployment.outputs)
    assert html.escape(executed) in card.details.value
    assert thread_errors == []


# -- no deployment needed ------------------------------------------------------------------------

def test_without_a_deployment_the_button_is_disabled_and_says_what_to_set(
        monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("AIRGPU_AIRFLOW_URL", "AIRGPU_AIRFLOW_TOKEN", "AIRGPU_AIRFLOW_USERNAME",
                "AIRGPU_AIRFLOW_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    nb = write_notebook(tmp_path / "nb.ipynb", "pass")
    form = _form(nb, tmp_path / "dags", "no_deployment")
    assert form.button.disabled is False  # Promote alone still works
    assert form.run_button.disabled is True
    tip = form.run_button.tooltip
    assert "AIRGPU_AIRFLOW_URL" in tip and "AIRGPU_AIRFLOW_TOKEN" in tip
    form.run_button.click()  # a disabled button's click from code does nothing either
    assert form.cards == [] and not (tmp_path / "dags").exists()
    # Configured: enabled, and an invalid form disables it again.
    monkeypatch.setenv("AIRGPU_AIRFLOW_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AIRGPU_AIRFLOW_TOKEN", "tok")
    form.dag_id.value = "bad id!"
    assert form.run_button.disabled is True
    form.dag_id.value = "good_id"
    assert form.run_button.disabled is False


def test_the_api_down_ends_the_card_with_one_line_and_no_traceback(
        monkeypatch, tmp_path, thread_errors) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    token = "tok-" + secrets.token_hex(8)
    monkeypatch.setenv("AIRGPU_AIRFLOW_URL", url)
    monkeypatch.setenv("AIRGPU_AIRFLOW_TOKEN", token)
    monkeypatch.delenv("AIRGPU_AIRFLOW_USERNAME", raising=False)
    nb = write_notebook(tmp_path / "nb.ipynb", "pass")
    panel = PromotionPanel(nb, dags_dir=str(tmp_path / "dags"), options={"retries": 0},
                           probe=lambda: None)
    form = panel.form
    form.allow_cpu.value = True
    form.run_button.click()
    card = form.cards[0]
    assert card.wait(15), card.state
    panel.close()
    assert card.state == "error" and "error" in card.state_label.value
    assert card.error is not None and "\n" not in card.error
    assert url in card.error and "unreachable" in card.error and token not in card.error
    assert html.escape(card.error) in card.progress.value
    assert "Traceback" not in card.progress.value and thread_errors == []
    assert (tmp_path / "dags" / "nb.py").is_file()  # promoted all the same
    assert form.run_button.disabled is False  # another try is one click away
