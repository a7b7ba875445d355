"""The running app in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; never a browser download) against `streamlit run app.py` on localhost.

Each page is opened, its main action done with the default model, and checked for the expected
elements and for the absence of Streamlit's exception box. Screenshots land in
$GPTLAB_SCREENSHOTS (the README's docs/screenshots when set) or the test's tmp folder.
"""
from __future__ import annotations

import os
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


def test_server_listens_on_localhost_only(server):
    _, port = server
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("ss is not available")
    addrs = {line.split()[3].rsplit(":", 1)[0] for line in out.stdout.splitlines() if line.strip()}
    assert addrs and addrs <= {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}, addrs


def test_home_shows_the_model_card(server, page, tmp_path):
    url, _ = server
    page.goto(url)
    page.get_by_text("Parameters").first.wait_for(timeout=90_000)
    _settle(page)
    body = page.inner_text("body")
    assert "GPT Lab" in body and "Parameters" in body and "Generate" in body
    _checked_screenshot(page, tmp_path, "home")


def test_generate_streams_tokens_and_shows_the_token_view(server, page, tmp_path):
    _open(page, server, "generate", "textbox", "Prompt")
    _enter(page, "textbox", "Prompt", "ROMEO:")
    _enter(page, "spinbutton", "Max new tokens", "12")
    _press(page, page.get_by_role("button", name="Generate"), page.get_by_text("Prompt perplexity"))
    body = page.inner_text("body")
    assert "Stopped by" in body and "max new tokens" in body
    assert page.locator("span[title]").count() >= 12  # one coloured span per generated token
    _checked_screenshot(page, tmp_path, "generate")


def test_consensus_run_draws_the_live_chart(server, page, tmp_path):
    _open(page, server, "consensus", "spinbutton", "Iterations N")
    _enter(page, "spinbutton", "Iterations N", "2")
    _press(page, page.get_by_role("button", name="Run", exact=True), page.get_by_role("button", name="Metric .npy"))
    assert page.locator("[data-testid=stVegaLiteChart]").count() >= 1  # the metric chart
    page.get_by_text("default N=2").first.wait_for(timeout=30_000)  # the run, labelled for overlays
    # downloads are made when pressed (deferred): the server must hand over real files
    with page.expect_download(timeout=60_000) as metric:
        page.get_by_role("button", name="Metric .npy").click()
    head = Path(metric.value.path()).read_bytes()[:6]
    assert head == b"\x93NUMPY" and metric.value.suggested_filename == "consensus.npy"
    with page.expect_download(timeout=60_000) as chart:
        page.get_by_role("button", name="Chart (PNG)").first.click()
    assert Path(chart.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _checked_screenshot(page, tmp_path, "consensus")


def test_training_launch_and_stop_a_tiny_run(server, page, tmp_path):
    _open(page, server, "training", "spinbutton", "Max steps")
    _enter(page, "spinbutton", "Max steps", "3000")
    _enter(page, "spinbutton", "Validate every", "20")
    page.get_by_role("button", name="Launch").click()
    page.get_by_text("Launched run").wait_for(timeout=60_000)
    page.get_by_role("button", name="Stop").first.wait_for(timeout=60_000)
    page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=180_000)  # live curves appear
    page.wait_for_timeout(6000)  # and grow for a few refreshes
    page.screenshot(path=str(_shots(tmp_path) / "training.png"), full_page=True)
    page.get_by_role("button", name="Stop").first.click()
    page.get_by_role("button", name="Resume").first.wait_for(timeout=240_000)  # stopped at a step boundary, with a checkpoint
    _no_exception(page)


def test_features_card_and_explain_a_completion(server, page, tmp_path):
    url, _ = server
    page.goto(f"{url}/features")
    page.get_by_text("Top contexts").first.wait_for(timeout=120_000)  # the shipped set opens a card
    _settle(page)
    page.wait_for_timeout(3000)  # the card's tables and charts finish drawing
    body = page.inner_text("body")
    assert "Top contexts" in body and "Explain a completion" in body
    _checked_screenshot(page, tmp_path, "features")
    page.get_by_role("tab", name="Explain a completion").click()
    page.get_by_test_id("stTabs").get_by_test_id("stBaseButton-primary").wait_for(timeout=60_000)
    _settle(page)
    _press(page, page.get_by_test_id("stTabs").get_by_test_id("stBaseButton-primary"),
           page.get_by_text("Total description").first, timeout=120_000)
    _checked_screenshot(page, tmp_path, "features_explain")


def test_two_sessions_generate_and_run_consensus_at_the_same_time(server, browser, tmp_path):
    """Two browser sessions on one server (one shared model): a seeded generation in one and a
    re-initialising consensus run in the other, started together. The generation must be exactly
    the engine's text for that seed, which it would not be if the other session's re-initialised
    weights leaked into the shared model."""
    from core.generation.autoregressive import SamplingConfig, generate
    from core.models.loading import load_model

    url, _ = server
    prompt, seed, n_tokens = "JULIET:", 7, 60
    want = generate(load_model("default"), prompt, SamplingConfig(seed=seed, max_new_tokens=n_tokens)).text
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1100}) for _ in range(2)]
    try:
        gen, cons = (ctx.new_page() for ctx in contexts)
        gen.goto(f"{url}/generate")
        cons.goto(f"{url}/consensus")
        gen.get_by_role("textbox", name="Prompt").wait_for(timeout=90_000)
        cons.get_by_role("spinbutton", name="Iterations N").wait_for(timeout=90_000)
        _settle(gen)
        _settle(cons)
        _enter(gen, "textbox", "Prompt", prompt)
        _enter(gen, "spinbutton", "Max new tokens", str(n_tokens))
        _enter(gen, "spinbutton", "Seed", str(seed))
        _enter(cons, "spinbutton", "Iterations N", "2")
        cons.get_by_role("combobox", name="Re-initialise weights").click()
        cons.get_by_role("option", name="after each block (--const-reset)").click()
        _settle(gen)
        _settle(cons)

        gen.get_by_role("button", name="Generate").click()
        cons.get_by_role("button", name="Run", exact=True).click()

        gen.get_by_text("Prompt perplexity").wait_for(timeout=90_000)
        cons.get_by_role("button", name="Metric .npy").wait_for(timeout=90_000)
        _settle(gen)
        _settle(cons)
        shown = gen.locator('[data-testid="stCode"]').first.inner_text()
        assert " ".join(shown.split()) == " ".join(want.split())
        assert f"seed {seed}" in gen.inner_text("body")
        cons.get_by_text("default N=2 const-reset seed=42").first.wait_for(timeout=30_000)
        assert "Prompt perplexity" not in cons.inner_text("body")
        assert cons.locator("[data-testid=stVegaLiteChart]").count() >= 1
        _checked_screenshot(gen, tmp_path, "two_sessions_generate")
        _checked_screenshot(cons, tmp_path, "two_sessions_consensus")
    finally:
        for ctx in contexts:
            ctx.close()


def test_server_console_stays_quiet(server, server_console):
    """Runs last, after every page's main action: the server's console holds no traceback (errors
    reach users as sentences, and nothing fails behind their back) and no file-watcher flood (the
    inotify watcher drowned the console in "queue overflowed" lines while torch was imported from
    the README's .venv)."""
    console = server_console.read_text(errors="replace")
    assert "You can now view your Streamlit app" in console
    assert "Traceback" not in console, console[-3000:]
    assert "Inotify queue overflowed" not in console, console[-3000:]
