"""Consensus runs are kept: in a real browser, a run made on the page is still there after a
reload, with the model picked in the sidebar and the page's settings (see browser_kit.py for the
server and browser fixtures)."""
from __future__ import annotations

from pathlib import Path

from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _checked_screenshot, _enter, _open, _press, _settle, browser, page, pytestmark, server, server_console)


def _pick_model(page, spec: str) -> None:
    """The sidebar's picker: "other…", then the spec typed in."""
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.locator('[data-testid="stSelectbox"]').first.click()
    page.keyboard.type("other")  # the list is long (every family's known ids) and drawn as it scrolls: filter it
    page.get_by_role("option", name="other…").click()
    _settle(page)
    _enter(page, "textbox", "Model spec or path", spec)


def _open_chips(page) -> list[str]:
    """The run names shown as chips in the "Open runs" multiselect."""
    box = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Open runs")
    return [t.get_attribute("aria-label") for t in box.locator("[data-tag]").all()]


def test_a_reload_brings_back_the_saved_runs_and_the_chosen_model(server, page, tmp_path, tiny_gptlab_dir: Path):
    url, _ = server
    _open(page, server, "consensus", "spinbutton", "Iterations N")
    _pick_model(page, str(tiny_gptlab_dir))
    _settle(page)
    _enter(page, "spinbutton", "Iterations N", "3")
    _press(page, page.get_by_role("button", name="Run", exact=True), page.get_by_role("button", name="Metric .npy"))
    chips = _open_chips(page)
    assert len(chips) == 1, chips
    name = chips[0]
    assert "cons_open=" + name in page.url and "model=" in page.url and "cons_iterations=3" in page.url
    _checked_screenshot(page, tmp_path, "consensus_runs_before_reload")

    page.reload()
    page.get_by_role("spinbutton", name="Iterations N").wait_for(timeout=90_000)
    page.get_by_role("button", name="Metric .npy").wait_for(timeout=90_000)
    _settle(page)
    assert _open_chips(page) == [name]
    assert page.get_by_role("textbox", name="Model spec or path").input_value() == str(tiny_gptlab_dir)
    assert page.get_by_role("spinbutton", name="Iterations N").input_value() == "3"
    assert page.locator("[data-testid=stVegaLiteChart]").count() >= 2  # the run and the overlay
    assert page.get_by_text("N=3").count() >= 1  # the run's label
    _checked_screenshot(page, tmp_path, "consensus_runs_after_reload")
    # the run is a folder of the server's runs root, listed in the table of saved runs
    page.get_by_text("All saved runs (1)").click()
    _settle(page)
    assert page.get_by_text(name).count() >= 1
    _checked_screenshot(page, tmp_path, "consensus_runs_table")

    # leaving the page and coming back keeps them too
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Home").click()
    page.get_by_text("Parameters").first.wait_for(timeout=90_000)
    _settle(page)
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Consensus").click()
    page.get_by_role("button", name="Metric .npy").wait_for(timeout=90_000)
    _settle(page)
    assert _open_chips(page) == [name]
    assert page.get_by_role("spinbutton", name="Iterations N").input_value() == "3"

    # the same address in a new tab (another day) opens the same run and model
    other = page.context.new_page()
    other.goto(page.url)
    other.get_by_role("button", name="Metric .npy").wait_for(timeout=90_000)
    _settle(other)
    assert _open_chips(other) == [name]
    assert other.get_by_role("textbox", name="Model spec or path").input_value() == str(tiny_gptlab_dir)
    other.close()
