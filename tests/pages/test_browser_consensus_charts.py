"""The Consensus page's charts in a real browser (headless Chromium against `streamlit run app.py`):
many random prompts still get a tall plot with a labelled y axis, the log axis is labelled in
decades, and the heatmap's axes name the tokens. Sizes are measured on the rendered SVG.

The README's screenshots (consensus_many_prompts.png: 64 prompts with two picked,
consensus_heatmap.png) land in $GPTLAB_SCREENSHOTS or the test's tmp folder; the others
(24 and 64 prompts, log y) always in the tmp folder.
"""
from __future__ import annotations

import pytest

from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _enter, _no_exception, _open, _press, _settle, _shots, browser, page, pytestmark, server, server_console)

MIN_PLOT_PX = 200  # the plot area alone, without axes and legend

AXES_JS = """el => Array.from(el.querySelectorAll('g.role-axis[aria-label]')).map(g => ({
    label: g.getAttribute('aria-label'),
    ticks: Array.from(g.querySelectorAll('.role-axis-label text')).map(t => t.textContent)}))"""


def _axes(chart) -> dict[str, dict]:
    """The chart's axes as drawn: 'x' and 'y', each with Vega's description and its tick labels."""
    return {a["label"][0].lower(): a for a in chart.evaluate(AXES_JS)}


def _plot_box(chart) -> dict:
    """The plot area's bounding box (the root frame's background: the space inside the axes)."""
    return chart.locator("g.role-frame.root > g > path.background").first.bounding_box()


def _random_run(page, server, n: int, matrix: bool = False) -> None:
    _open(page, server, "consensus", "spinbutton", "Iterations N")
    page.get_by_text("random tokens (N x L)").click()
    _settle(page)
    _enter(page, "spinbutton", "Random prompts N", str(n))
    _enter(page, "spinbutton", "Tokens per prompt L", "16")
    _enter(page, "spinbutton", "Iterations N", "3")
    if matrix:  # off in a new session
        page.get_by_text("Token cosine matrices").click()
        _settle(page)
    _press(page, page.get_by_role("button", name="Run", exact=True), page.get_by_role("button", name="Metric .npy"))
    page.wait_for_timeout(1000)  # vega-embed draws after the script run
    _no_exception(page)


@pytest.mark.parametrize("n", [64, 24, 10])
def test_many_random_prompts_get_a_tall_plot_with_a_y_axis(server, page, tmp_path, n):
    _random_run(page, server, n, matrix=(n == 64))
    chart = page.locator("[data-testid=stVegaLiteChart]").first
    box = _plot_box(chart)
    assert box["height"] >= MIN_PLOT_PX, box
    axes = _axes(chart)
    assert axes["y"]["label"].startswith("Y-axis titled '1 - mean |cos(h0, hj)|'")
    assert len(axes["y"]["ticks"]) >= 3, axes["y"]  # a labelled axis, not a flat line
    assert axes["x"]["ticks"][0] == "0" and axes["x"]["ticks"][-1] == "12"  # whole layer-steps
    legend = chart.locator("g.role-legend").first.bounding_box()
    assert legend["x"] >= box["x"] + box["width"]  # beside the plot, not inside its height
    entries = chart.locator("g.role-legend .role-legend-label text")
    if n <= 10:  # a colour and a legend entry each, every one of them shown
        assert entries.count() == n and [entries.nth(i).text_content()[:3] for i in range(n)] == [
            f"{b}: "[:3] for b in range(n)]
    else:
        assert f"mean of {n} prompts" in chart.inner_text()
    chart.screenshot(path=str(tmp_path / f"consensus_{n}_prompts.png"))
    if n != 64:
        return

    # log y: a label at every decade
    page.get_by_text("Log y").click()
    _settle(page)
    page.wait_for_timeout(1000)
    chart = page.locator("[data-testid=stVegaLiteChart]").first
    axes = _axes(chart)
    assert "log scale" in axes["y"]["label"]
    ticks = axes["y"]["ticks"]
    assert ticks[-1] == "1" and all(t == "1" or t.startswith("1e-") for t in ticks) and len(ticks) >= 2, ticks
    assert _plot_box(chart)["height"] >= MIN_PLOT_PX
    chart.screenshot(path=str(tmp_path / "consensus_64_log.png"))

    # two prompts picked: drawn in their own colours, named in the legend
    page.get_by_text("Log y").click()
    _settle(page)
    for name in ("3: ", "17: "):
        page.get_by_role("combobox", name="Show prompts").click()
        page.keyboard.type(name)  # the list filters as one types
        page.get_by_role("option").filter(has_text=name).first.click()
        page.keyboard.press("Escape")
        _settle(page)
    page.mouse.move(0, 0)  # no line hovered in the screenshot
    page.wait_for_timeout(1000)
    chart = page.locator("[data-testid=stVegaLiteChart]").first
    legend = chart.locator("g.role-legend").first.text_content()
    assert "3: " in legend and "17: " in legend
    chart.screenshot(path=str(_shots(tmp_path) / "consensus_many_prompts.png"))

    # the heatmap names its tokens on both axes
    heat = page.locator("[data-testid=stVegaLiteChart]").nth(1)
    axes = _axes(heat)
    assert len(axes["x"]["ticks"]) == 16 and len(axes["y"]["ticks"]) == 16
    assert not any(t.isdigit() for t in axes["x"]["ticks"])  # tokens, not positions
    assert not any("\ufffd" in t for t in axes["x"]["ticks"] + axes["y"]["ticks"])
    heat.screenshot(path=str(_shots(tmp_path) / "consensus_heatmap.png"))
