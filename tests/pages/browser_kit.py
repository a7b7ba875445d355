"""The kit for real-browser tests (fixtures and helpers shared by every tests/pages/test_browser*.py): headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; never a browser download) against `streamlit run app.py` on localhost.

Each page is opened, its main action done with the default model, and checked for the expected
elements and for the absence of Streamlit's exception box. Long runs are cut off the ways a user
cuts them off (Stop, Run again, leaving the page) and the page must answer within a second. Screenshots land in
$GPTLAB_SCREENSHOTS (the README's docs/screenshots when set) or the test's tmp folder.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_console(tmp_path_factory) -> Path:
    """Where the server's console output goes (one file for the module's server)."""
    return tmp_path_factory.mktemp("server") / "console.log"


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_console):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTLAB_RUNS": str(tmp_path_factory.mktemp("runs"))}
    console = server_console.open("wb")  # a file, not a pipe: a pipe nobody reads blocks the server when full
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + server_console.read_text(errors="replace")[-2000:])
    yield url, port
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    console.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1100})
    pg = ctx.new_page()
    yield pg
    ctx.close()


def _shots(tmp_path) -> Path:
    out = Path(os.environ.get("GPTLAB_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _settle(page, timeout=60_000):
    """Wait until Streamlit has finished running the script (no running indicator)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_function(
        "() => { const w = document.querySelector('[data-testid=\"stStatusWidget\"]');"
        " return !w || !(w.innerText.includes('Running') || w.innerText.includes('Stop')); }",
        timeout=timeout)
    page.wait_for_timeout(500)


def _enter(page, role, name, value, tries=4):
    """Type a value into a widget and make sure it stuck. Streamlit commits a field on blur and
    reruns the script; a rerun already under way when the field is filled can redraw it with the
    old value, so the value is checked after the page settles and typed again if it was lost."""
    box = page.get_by_role(role, name=name)
    for _ in range(tries):
        box.fill(value)
        page.keyboard.press("Tab")
        _settle(page)
        if box.input_value() == value:
            return
    raise AssertionError(f"{name} did not keep {value!r} (shows {box.input_value()!r})")


def _open(page, server, path, role, name):
    """Go to one of the app's pages on the ``server`` and wait until the widget (role, name) is
    drawn and the script has finished its run."""
    url, _ = server
    page.goto(f"{url}/{path}")
    page.get_by_role(role, name=name).wait_for(timeout=90_000)
    _settle(page)


def _press(page, button, until, timeout=90_000):
    """Click ``button`` and wait until ``until`` (a locator) shows and the script has finished."""
    button.click()
    until.wait_for(timeout=timeout)
    _settle(page)


def _no_exception(page):
    assert page.locator('[data-testid="stException"]').count() == 0


def _checked_screenshot(page, tmp_path, name):
    """No exception box on the page; then its screenshot, as ``name``.png."""
    _no_exception(page)
    page.screenshot(path=str(_shots(tmp_path) / f"{name}.png"), full_page=True)


