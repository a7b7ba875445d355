"""The shipped masked-diffusion model in a real browser (headless Chromium at 1400 px, see
browser_kit.py): picked in the sidebar beside `default`, it generates offline on the Generate page
(the text its seed gives, with the denoising states), and the Features page explains one of its
completions step by step with its own shipped transcoders."""
from __future__ import annotations

from dataclasses import replace

from core.generation.diffusion import generate as denoise
from core.models.loading import load_model
from pages.parts.generate_diffusion import D
from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _checked_screenshot, _enter, _no_exception, _open, _press, _settle, _shots, browser, page, pytestmark, server,
    server_console)


def test_the_sidebar_offers_both_shipped_models(server, page):
    url, _ = server
    page.goto(url)
    box = page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").first
    box.wait_for(timeout=90_000)
    _settle(page)
    box.click()
    options = page.get_by_role("option").all_inner_texts()
    assert options[:2] == ["default", "diffusion"], options
    page.keyboard.press("Escape")


def test_the_diffusion_default_generates_on_the_generate_page(server, page, tmp_path):
    _open(page, server, "generate?model=diffusion", "textbox", "Prompt")
    assert "is a masked-diffusion model" in page.inner_text("body")
    _enter(page, "textbox", "Prompt", "ROMEO:")
    _enter(page, "spinbutton", "Seed", "3")
    _press(page, page.get_by_role("button", name="Generate"), page.get_by_text("Masks left", exact=True),
           timeout=120_000)
    _no_exception(page)
    body = page.inner_text("body")
    assert "Model diffusion" in body and "seed 3" in body, body[:3000]
    # the page's text is the engine's for the page's settings (its defaults) and that seed
    want = denoise(load_model("diffusion"), "ROMEO:", replace(D, seed=3))
    shown = page.get_by_test_id("stCode").first.inner_text()
    assert " ".join(shown.split()) == " ".join(want.text.split())
    _checked_screenshot(page, tmp_path, "generate_diffusion")


def test_the_features_page_explains_a_diffusion_completion_step_by_step(server, page, tmp_path):
    _open(page, server, "features?model=diffusion", "tab", "Explain a completion")
    page.get_by_role("tab", name="Explain a completion").click()
    button = page.get_by_test_id("stTabs").get_by_test_id("stBaseButton-primary")
    button.wait_for(timeout=60_000)
    _settle(page)
    _press(page, button, page.get_by_text("Total description").first, timeout=180_000)
    _no_exception(page)
    body = page.inner_text("body")
    assert "Layer 0" in body and "Layer 3" in body
    page.get_by_text("Total description").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(_shots(tmp_path) / "features_explain_diffusion.png"))
