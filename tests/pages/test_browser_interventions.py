"""Interventions in a real browser (headless Chromium against `streamlit run app.py`, see browser_kit):
steer a generation from Generate's Interventions panel and see both completions, and open the
attention view, enlarge a head by clicking the grid, ablate it."""
from __future__ import annotations

from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _checked_screenshot, _enter, _no_exception, _open, _press, _settle, browser, page, pytestmark, server,
    server_console)


def test_generate_steers_a_generation_and_shows_both_completions(server, page, tmp_path):
    _open(page, server, "generate", "textbox", "Prompt")
    _enter(page, "textbox", "Prompt", "ROMEO:")
    page.get_by_text("Interventions: ablate and steer").click()
    page.get_by_role("textbox", name="Steer with feature").wait_for(timeout=30_000)
    _enter(page, "textbox", "Steer with feature", "1.3")
    thumb = page.get_by_role("slider", name="Steering strength")
    thumb.focus()
    for _ in range(40):                                   # step 0.5: 20.0
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Tab")                            # commit the slider
    _settle(page)
    _enter(page, "spinbutton", "Tokens to compare", "8")
    _press(page, page.get_by_role("button", name="Run with and without"), page.get_by_text("With interventions"))
    body = page.inner_text("body")
    assert "Without interventions" in body and "1.3=20" in body
    page.locator("[data-testid=stCode]").nth(1).wait_for(timeout=30_000)   # both completions, drawn after the labels
    _checked_screenshot(page, tmp_path, "interventions-generate")


def test_attention_view_enlarges_a_clicked_head_and_ablates_it(server, page, tmp_path):
    _open(page, server, "attention", "textbox", "Prompt")
    _press(page, page.get_by_role("button", name="Show attention"), page.get_by_text("Layer 0, head 0"))
    charts = page.locator("[data-testid=stVegaLiteChart]")
    charts.nth(1).wait_for(timeout=60_000)                # vega draws after the script run ends
    assert charts.count() == 2                            # the grid and the enlarged head
    grid = charts.first.locator("canvas, svg").first
    box = grid.bounding_box()
    # click inside the grid's last cell (bottom right: the last layer's last head)
    page.mouse.click(box["x"] + box["width"] - 40, box["y"] + box["height"] - 40)
    _settle(page)
    _no_exception(page)
    page.get_by_text("Layer 3, head 3").wait_for(timeout=30_000)   # the default model: 4 layers of 4 heads
    page.get_by_role("button", name="Ablate this head here").click()
    page.get_by_text("head(s) 3.3 zero-ablated").wait_for(timeout=60_000)
    _settle(page)
    _checked_screenshot(page, tmp_path, "interventions-attention")


def test_patching_view_draws_the_restored_logit_difference(server, page, tmp_path):
    _open(page, server, "patching", "textbox", "Clean prompt")
    _press(page, page.get_by_role("button", name="Patch"), page.locator("[data-testid=stVegaLiteChart]").first)
    chart = page.locator("[data-testid=stVegaLiteChart]").first
    chart.locator("canvas, svg").first.wait_for(timeout=60_000)   # vega draws after the script run ends
    assert chart.bounding_box()["height"] > 150
    _checked_screenshot(page, tmp_path, "interventions-patching")
