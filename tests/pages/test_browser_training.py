"""The Training dashboard in a real browser (headless Chromium at 1400 x 1100, see browser_kit.py):
two tiny runs launched from the form, overlaid in one loss chart whose plot keeps its height and its
width with both runs and both splits in the legend below it, the x axis switched to tokens and to
training time, smoothing turned up, and the "Launched" banner gone a few seconds after a launch.
The screenshot (training_dashboard.png) lands in $GPTLAB_SCREENSHOTS or the test's tmp folder."""
from __future__ import annotations

import re
import time
from pathlib import Path

from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _enter, _no_exception, _open, _settle, _shots, browser, page, pytestmark, server, server_console)

from core.training.runs import list_runs
from pages.parts.training_charts import LOSS_HEIGHT

TINY = {"Layers": "1", "Heads": "2", "d_model": "32", "Block size": "32", "Batch size": "4", "Max steps": "24",
        "Validate every": "6", "Log every": "2", "Preview every": "12", "Save every": "0"}


def launch(page, seed: str) -> None:
    for name, value in {**TINY, "Seed": seed}.items():
        _enter(page, "spinbutton", name, value)
    page.get_by_role("button", name="Launch").click()
    page.get_by_text("Launched run").first.wait_for(timeout=60_000)


# n run panels shown, each offering Resume and none Stop ("Stopped:" captions aside)
PANELS_FINISHED = """n => { const panels = [...document.querySelectorAll('[class*="st-key-tr_panel_"]')];
                            return panels.length == n
                                   && panels.every(p => p.innerText.includes('Resume') && !/\\bStop\\b/.test(p.innerText)); }"""


def wait_until_finished(page, n: int, timeout: float = 600) -> None:
    """Until the runs folder the page names holds ``n`` finished runs (read from their status files, not
    from the page, which keeps stale copies of its elements while it redraws), then until the page has
    redrawn them: ``n`` run panels, each offering Resume and none Stop."""
    root = Path(re.search(r"Runs folder: (\S+)", page.inner_text("body")).group(1))
    deadline = time.monotonic() + timeout
    while sum(r.state == "finished" for r in list_runs(root)) < n:
        assert time.monotonic() < deadline, [(r.id, r.state, r.reason) for r in list_runs(root)]
        time.sleep(1)
    page.wait_for_function(PANELS_FINISHED, arg=n, timeout=120_000)
    _settle(page)
    assert page.evaluate(PANELS_FINISHED, n)


def show_controls_and_chart(page) -> None:
    """Scroll so that the run picker, the chart controls and the loss chart fill the window."""
    page.locator("[data-testid=stMultiSelect]").filter(has_text="Show runs").evaluate(
        "el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)


def loss_chart(page):
    return page.locator("[data-testid=stVegaLiteChart]").first


def drawn_box(locator, timeout_s: float = 20.0) -> dict:
    """The element's box once it is drawn: a chart redrawn after a click is briefly replaced, and
    a box asked for in that moment is None."""
    deadline = time.monotonic() + timeout_s
    while (box := locator.bounding_box()) is None:
        assert time.monotonic() < deadline, "the chart was not drawn again"
        locator.page.wait_for_timeout(50)
    return box


def test_dashboard_overlays_two_runs_with_a_legend_below_fixed_height_plots(server, page, tmp_path):
    _open(page, server, "training", "spinbutton", "Max steps")
    launch(page, "1")
    launched = time.monotonic()
    # the banner goes by itself after a few seconds (the live view refreshes while it is up)
    page.get_by_text("Launched run").first.wait_for(state="detached", timeout=30_000)
    assert time.monotonic() - launched < 20
    wait_until_finished(page, 1)
    _settle(page)
    page.get_by_text("New run").first.click()  # the form folded away after the launch
    page.get_by_role("spinbutton", name="Max steps").wait_for(timeout=30_000)
    _settle(page)
    launch(page, "2")
    wait_until_finished(page, 2)  # both shown: a launch adds its run to the others
    _settle(page)
    page.wait_for_timeout(1500)  # the charts finish drawing

    chart = drawn_box(loss_chart(page))
    picker = page.locator("[data-testid=stMultiSelect]").filter(has_text="Show runs").bounding_box()
    assert abs(chart["width"] - picker["width"]) < 4  # the chart spans the page, as wide as the run picker above it
    assert LOSS_HEIGHT + 60 <= chart["height"] <= LOSS_HEIGHT + 300, chart  # the plot's height, axis and legend below
    layout = loss_chart(page).evaluate("""el => {
        const box = e => e.getBoundingClientRect();
        const svg = el.querySelector('svg');
        return {axes: [...svg.querySelectorAll('.role-axis')].map(e => box(e).bottom),
                legends: [...svg.querySelectorAll('.role-legend')].map(e => [box(e).top, e.textContent])};
    }""")
    assert len(layout["legends"]) == 2  # runs, and train / validation
    assert all(top >= max(layout["axes"]) - 1 for top, _ in layout["legends"])  # below the plot, never beside it
    legend_text = " ".join(text for _, text in layout["legends"])
    assert "train" in legend_text and "validation" in legend_text and legend_text.count("-ar-tiny") == 2
    body = page.inner_text("body")
    assert "Smoothing" in body and "X axis" in body and "training time" in body
    _no_exception(page)
    show_controls_and_chart(page)
    page.screenshot(path=str(_shots(tmp_path) / "training_dashboard.png"))

    # the x axis and the smoothing redraw the same chart at the same size
    for label in ("tokens seen", "training time"):
        page.get_by_text(label, exact=True).first.click()
        _settle(page)
        box = drawn_box(loss_chart(page))
        assert abs(box["height"] - chart["height"]) < 2 and abs(box["width"] - chart["width"]) < 2
    # line layers drawn (Vega draws one group per layer and run, named after the layer)
    line_layers = "el => new Set([...el.querySelectorAll('svg .mark-line')].map(e => e.getAttribute('class'))).size"
    assert loss_chart(page).evaluate(line_layers) == 2  # train and validation
    assert loss_chart(page).evaluate("el => el.querySelectorAll('svg .mark-line').length") == 4  # ... of both runs
    slider = page.get_by_role("slider", name="Smoothing")
    slider.focus()
    for _ in range(60):
        page.keyboard.press("ArrowRight")
    _settle(page)
    assert page.get_by_test_id("stSliderThumbValue").first.inner_text() == "0.60"
    page.wait_for_function(f"() => ({line_layers})(document.querySelector('[data-testid=stVegaLiteChart]')) == 3",
                           timeout=30_000)  # the raw curve joins, faint, behind the smoothed one
    box = drawn_box(loss_chart(page))
    assert abs(box["height"] - chart["height"]) < 2
    _no_exception(page)
    show_controls_and_chart(page)
    page.screenshot(path=str(_shots(tmp_path) / "training_smoothed.png"))
