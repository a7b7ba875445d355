"""The Generate page in a real browser (headless Chromium against `streamlit run app.py`, fixtures
from browser_kit.py): a click on a token of the token view opens its alternatives, and compare
mode at 1400 px shows every figure and button whole. Screenshots land in $GPTLAB_SCREENSHOTS (the
README's docs/screenshots when set) or the test's tmp folder: generate_inspect.png, generate_compare.png.
"""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _checked_screenshot, _enter, _open, _press, _settle, browser, page, pytestmark, server, server_console)

PROMPT, SEED, N_TOKENS = "ROMEO:", 5, 30

# elements whose text is cut short (ellipsis or clipping): wider content than box
CUT_JS = """(selector) => [...document.querySelectorAll(selector)].flatMap((el) =>
  [el, ...el.querySelectorAll('*')].filter((e) => e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0)
    .map((e) => el.innerText.trim()))"""


@pytest.fixture(scope="module")
def expected():
    from core.generation.autoregressive import SamplingConfig, generate
    from core.models.loading import load_model

    lm = load_model("default")
    return len(lm.tokenizer.encode(PROMPT)), generate(lm, PROMPT, SamplingConfig(max_new_tokens=N_TOKENS, seed=SEED))


def test_click_on_a_generated_token_opens_its_alternatives(server, page, tmp_path, expected):
    P, want = expected
    _open(page, server, "generate", "textbox", "Prompt")
    _enter(page, "textbox", "Prompt", PROMPT)
    _enter(page, "spinbutton", "Max new tokens", str(N_TOKENS))
    _enter(page, "spinbutton", "Seed", str(SEED))
    _press(page, page.get_by_role("button", name="Generate"), page.get_by_text("Token to inspect:", exact=True).first)
    strip = page.locator(".gl-strip")
    # the token strip is a custom component: its frontend draws it after the script has finished
    expect(strip.locator(".gl-tok[data-i]")).to_have_count(P - 1 + len(want.tokens), timeout=30_000)  # every token but the first scored
    assert strip.locator(".gl-sel").get_attribute("data-i") == str(P)  # the first new token, until a click

    index = 7
    token = want.tokens[index]
    strip.locator(f'.gl-tok[data-i="{P + index}"]').click()
    page.get_by_text(f"generated token #{index} (position {P + index})").wait_for(timeout=30_000)
    _settle(page)
    assert strip.locator(".gl-sel").get_attribute("data-i") == str(P + index)
    assert f"p = {token.prob:.4g}" in page.inner_text("body")  # the engine's probability of the clicked token
    chart = page.locator("[data-testid=stVegaLiteChart]").first
    chart.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)  # vega draws after the element appears
    labels = chart.locator("svg text").evaluate_all("(els) => els.map((e) => e.textContent)")
    ids = [token.token_id] + [tid for tid, _, _ in token.alternatives if tid != token.token_id]
    drawn = [next((i for i, label in enumerate(labels) if label.endswith(f"[{tid}]")), None) for tid in ids]
    assert None not in drawn, (ids, labels)        # every alternative labelled
    assert drawn == sorted(drawn)                  # in order, the chosen token's first
    chart.scroll_into_view_if_needed()
    _checked_screenshot(page, tmp_path, "generate_inspect")


def test_compare_mode_at_1400px_cuts_no_figure_or_button(server, page, tmp_path):
    _open(page, server, "generate", "textbox", "Prompt")
    page.get_by_text("Compare two settings side by side").click()
    page.get_by_text("Settings B").wait_for(timeout=30_000)
    _settle(page)
    _enter(page, "textbox", "Prompt", PROMPT)
    for box in page.get_by_role("spinbutton", name="Max new tokens").all():
        box.fill("12")
        page.keyboard.press("Tab")
        _settle(page)
    _press(page, page.get_by_role("button", name="Generate"), page.get_by_text("Output B"))
    page.get_by_text("Stopped by").nth(1).wait_for(timeout=60_000)
    _settle(page)
    assert page.locator('[data-testid="stMetricValue"]').count() == 8
    assert page.evaluate(CUT_JS, '[data-testid="stMetricValue"]') == []
    assert page.evaluate(CUT_JS, '[data-testid="stMetricLabel"]') == []
    assert page.evaluate(CUT_JS, '[data-testid="stMain"] button') == []
    page.get_by_text("Output A").scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    _checked_screenshot(page, tmp_path, "generate_compare")
