"""Notebook 01's explorer in a real browser: JupyterLab serves a copy of the notebook on 127.0.0.1, headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by selenium) runs the explorer's cell as a student
would (Shift+Enter), drags the ν slider and sees the figure change.

Bounded: every wait has a deadline inside :data:`BUDGET` seconds, and the server's whole process group is ended
at teardown. Nothing leaves the machine: the server listens on 127.0.0.1 only, the page loads only from it, and
Chromium runs with its background services off, every host name but 127.0.0.1 unresolvable and a proxy on a
closed loopback port for anything else. Without Chromium the test is skipped, except under CI (``CI`` set),
where it fails: ``.ci/run`` installs Chromium with apt-get before the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_counterexample.ipynb"
#: seconds the whole test may take (server start, page load, kernel start, two runs of the explorer)
BUDGET = 240
#: the code the explorer's cell runs (the test finds the cell by it)
EXPLORER_CALL = "explorer.show("

pytestmark = pytest.mark.browser


def _need(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = (f"{name} not found: install Debian's chromium and chromium-driver "
                   "(apt-get install -y chromium chromium-driver; .ci/run does this)")
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI must run the browser test", pytrace=False)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            pytest.fail(f"the browser test ran past its {BUDGET} s budget", pytrace=False)
        return left


def _settings(folder: Path) -> None:
    """JupyterLab user settings: render every cell (no windowing), never fetch news or check for updates."""
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 01; yields the notebook's URL."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK.name)
    _settings(tmp_path / "lab-settings")
    port, token = _free_port(), "golore-lab-browser-test"
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), MPLBACKEND="module://matplotlib_inline.backend_inline",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.news_url=None", "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
         "--ServerApp.allow_root=True",
         # should the test process die without its teardown, the server stops by itself: idle kernels are culled
         # after BUDGET seconds, and a server without kernels and activity shuts down a minute later
         f"--MappingKernelManager.cull_idle_timeout={BUDGET}", "--MappingKernelManager.cull_interval=30",
         "--MappingKernelManager.cull_connected=True", "--ServerApp.shutdown_no_activity_timeout=60"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{(tmp_path / 'jupyter.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("jupyter lab did not answer within 90 s:\n" + (tmp_path / "jupyter.log").read_text())
            time.sleep(0.5)
        yield f"{base}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium under chromedriver, kept off the network."""
    chromium, chromedriver = _need("chromium"), _need("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1100",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--disable-features=Translate,MediaRouter",
                 "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver, log_output=str(tmp_path / "driver.log")))
    try:
        yield driver
    finally:
        driver.quit()


def _explorer_cell(driver):
    from selenium.webdriver.common.by import By

    for cell in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell"):
        if EXPLORER_CALL in cell.find_element(By.CSS_SELECTOR, ".jp-InputArea").text:
            return cell
    return None


def _figure(cell) -> str:
    """The src of the figure in the explorer's output widget ('' while there is none); fails at once on an error."""
    from selenium.webdriver.common.by import By

    errors = cell.find_elements(By.CSS_SELECTOR, '.jp-OutputArea [data-mime-type="application/vnd.jupyter.stderr"]')
    if any("Error" in e.text for e in errors):
        pytest.fail("the explorer's cell raised:\n" + "\n".join(e.text for e in errors), pytrace=False)
    images = cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea .widget-output img")
    return images[0].get_attribute("src") if images else ""


def test_moving_a_slider_redraws_the_figure(browser, lab, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    redrawing = (StaleElementReferenceException,)   # the output widget swaps its <img> between two reads: poll again
    deadline = Deadline(BUDGET)
    start = time.perf_counter()
    browser.set_page_load_timeout(deadline.left())
    browser.get(lab)
    try:
        cell = WebDriverWait(browser, deadline.left(), poll_frequency=0.5).until(lambda d: _explorer_cell(d))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
        cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()  # select the cell (command mode)
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        first = WebDriverWait(browser, deadline.left(), poll_frequency=0.5,
                              ignored_exceptions=redrawing).until(lambda d: _figure(cell))
        loaded = time.perf_counter() - start
        slider = next(s for s in cell.find_elements(By.CSS_SELECTOR, ".widget-slider")
                      if "noise level" in s.find_element(By.CSS_SELECTOR, ".widget-label").text)
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout").text
        handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
        moved = time.perf_counter()
        ActionChains(browser).click_and_hold(handle).move_by_offset(-80, 0).release().perform()
        WebDriverWait(browser, min(deadline.left(), 90), poll_frequency=0.25,   # a re-run takes seconds
                      ignored_exceptions=redrawing).until(lambda d: _figure(cell) not in ("", first))
        redrawn = time.perf_counter() - moved
        new_readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout").text
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        raise
    finally:
        if os.environ.get("GOLORE_LAB_BROWSER_SCREENSHOT"):
            browser.save_screenshot(os.environ["GOLORE_LAB_BROWSER_SCREENSHOT"])
    assert float(new_readout) < float(readout), (readout, new_readout)  # dragged left: a lower noise level
    print(f"\nbrowser test: page + kernel + first figure {loaded:.1f} s; ν {readout} -> {new_readout}, "
          f"redrawn in {redrawn:.1f} s; total {time.perf_counter() - start:.1f} s")
