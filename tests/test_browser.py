"""The panel in a real JupyterLab, driven in headless Chromium: run all, click Promote, check the
DAG file and the result area. Leaves a screenshot in test-artifacts/."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from celery_stack import free_port

from conftest import ROOT, write_notebook

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


class Lab:
    def __init__(self, url: str, token: str, root: Path, log: Path) -> None:
        self.url, self.token, self.root, self.log = url, token, root, log


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab from the project's venv on 127.0.0.1 with a token and throwaway config."""
    root = tmp_path / "root"
    root.mkdir()
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jconfig"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jruntime"),
           "IPYTHONDIR": str(tmp_path / "ipython"),
           "JUPYTER_PLATFORM_DIRS": "1"}
    news = tmp_path / "jconfig" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no "get Jupyter news?" toast over the screenshot
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = tmp_path / "jupyter.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser",
             "--ServerApp.ip=127.0.0.1", f"--port={port}", "--port-retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class="
             "jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"JupyterLab exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"JupyterLab did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Lab(url, token, root, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its kernels (its own process group), also after a failure."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def open_and_run_all(page, lab: Lab, notebook: str) -> str:
    """Open a notebook of the lab's root, wait until its kernel really executes code (the
    session context says so, not the indicator) and run all cells; the kernel's name."""
    page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell."
                           "currentWidget && window.jupyterapp.shell.currentWidget."
                           "sessionContext", timeout=120_000)
    name = page.evaluate("""async () => {
        const widget = window.jupyterapp.shell.currentWidget;
        await widget.context.ready;
        await widget.sessionContext.ready;
        const kernel = widget.sessionContext.session.kernel;
        await kernel.info;  // the kernel answered kernel_info: it executes code now
        return kernel.name;
    }""")
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext"
                           ".session.kernel.connectionStatus === 'connected'", timeout=60_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    return name


def test_one_click_promotion_in_jupyterlab(lab: Lab, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's Chromium is missing: run `make sysdeps` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # The notebook to promote lives outside the server's root, as a user's might.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = write_notebook(outside / "nightly train.ipynb", "print(epochs)",
                            parameters="epochs = 4")
    dags = tmp_path / "dags"
    write_notebook(lab.root / "panel.ipynb", "%load_ext airgpu_nb",
                   f"%airgpu panel --notebook '{target}' --dags-dir '{dags}' --allow-cpu")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "jupyterlab-panel.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            assert open_and_run_all(page, lab, "panel.ipynb") == "python3"
            button = page.locator(".airgpu-promote-button")
            button.wait_for(state="visible", timeout=120_000)
            assert page.locator(".airgpu-gpu-dashboard").is_visible()
            page.wait_for_function("() => !document.querySelector('.airgpu-promote-button')"
                                   ".disabled", timeout=30_000)
            button.click()
            result = page.locator(".airgpu-result")
            page.wait_for_function(
                "() => { const r = document.querySelector('.airgpu-result');"
                " return r && /DagBag: .*(imports|error|skipped|crashed)|Could not promote/"
                ".test(r.innerText); }", timeout=180_000)
            text = result.inner_text()
            result.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-panel-failure.png"), full_page=True)
            raise
        finally:
            browser.close()

    dag_file = dags / "nightly_train.py"
    assert dag_file.is_file(), f"{text}\n{lab.log.read_text()[-2000:]}"
    assert str(dag_file) in text
    assert "imports cleanly" in text and "airflow dags test nightly_train" in text
    prepared = nbformat.read(dags / "nightly_train.ipynb", as_version=4)
    assert prepared.metadata["airgpu"]["settings"]["allow_cpu"] is True
    assert shot.stat().st_size > 10_000


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_promote_and_run_in_jupyterlab_until_the_card_shows_success(configured, lab: Lab,
                                                                    tmp_path: Path) -> None:
    """The deployment's settings reach the kernel through the server's environment (`configured`
    is set up before `lab`)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's Chromium is missing: run `make sysdeps` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    deployment = configured
    target = write_notebook(tmp_path / "lab run.ipynb", "print(epochs)", parameters="epochs = 2")
    write_notebook(lab.root / "run_panel.ipynb", "%load_ext airgpu_nb",
                   f"%airgpu panel --notebook '{target}' --dags-dir '{deployment.dags}' "
                   "--allow-cpu --retries 0 --dag-id lab_run")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            open_and_run_all(page, lab, "run_panel.ipynb")
            button = page.locator(".airgpu-promote-run-button")
            button.wait_for(state="visible", timeout=120_000)
            page.wait_for_function("() => !document.querySelector('.airgpu-promote-run-button')"
                                   ".disabled", timeout=30_000)
            button.click()
            page.wait_for_function(
                "() => { const s = document.querySelector('.airgpu-run-card .airgpu-run-state');"
                " return s && /success|failed|error/.test(s.innerText); }", timeout=300_000)
            card = page.locator(".airgpu-run-card")
            text = card.inner_text()
            card.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-run-card.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-run-card-failure.png"),
                            full_page=True)
            raise
        finally:
            browser.close()
    assert "success" in text, f"{text}\n{deployment.tail('scheduler')}"
    assert str(deployment.outputs) in text and "telemetry" in text
