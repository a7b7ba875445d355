"""The Features page in a real browser (headless Chromium at 1400 px, see browser_kit.py), for what
only a browser shows: no metric label cut short with "...", the first card a newcomer sees is the
best-explained feature (not the most frequent one), each score is shown with its sample size, the
explained completion shows its two scores, and the import/export panel opens. Screenshots of each
state land beside the other browser tests' ($GPTLAB_SCREENSHOTS or the test's tmp folder)."""
from __future__ import annotations

import re

from core.interp import FeatureStore, store_path
from core.models.loading import DEFAULT_DIR
from tests.pages.browser_kit import (  # noqa: F401  (fixtures are found by name)
    _checked_screenshot, _no_exception, _press, _settle, _shots, browser, page, pytestmark, server, server_console)

# Every metric or widget label cut short: Streamlit draws a label in a box with text-overflow: ellipsis,
# whose scrollWidth does not grow with the hidden text, so the text's own width (a Range over its
# contents) is compared with the box's.
CUT_LABELS = """() => Array.from(document.querySelectorAll(
        '[data-testid="stMetricLabel"], [data-testid="stWidgetLabel"]')).flatMap(label =>
    [label, ...label.querySelectorAll('*')].filter(el => getComputedStyle(el).textOverflow === 'ellipsis')
        .filter(el => { const r = document.createRange(); r.selectNodeContents(el);
                        return r.getBoundingClientRect().width > el.getBoundingClientRect().width + 0.01; })
        .map(() => label.innerText))"""


def _cut(page) -> list[str]:
    return sorted(set(page.evaluate(CUT_LABELS)))


def test_features_page_labels_order_and_scores(server, page, tmp_path):
    url, _ = server
    page.goto(f"{url}/features")
    page.get_by_text("Top contexts").first.wait_for(timeout=120_000)
    _settle(page)
    page.get_by_test_id("stMetricLabel").filter(has_text="Mean activation").wait_for(timeout=60_000)
    page.wait_for_timeout(3000)
    labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
    assert {"FVE", "Dead", "Loss recovered", "Live", "Frequency", "Mean activation"} <= set(labels), labels
    assert _cut(page) == []
    _checked_screenshot(page, tmp_path, "features_scores")
    page.get_by_text("Top contexts").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(_shots(tmp_path) / "features_card_scores.png"))

    with FeatureStore(store_path(DEFAULT_DIR / "transcoders"), readonly=True) as store:
        best = store.features(0, order_by="score")[0]
        by_freq = store.features(0, order_by="density")[0]
        rows = store.scores(0, best.feature)
    body = page.inner_text("body")
    # the first card is the best-scored feature of layer 0, not the most frequent one
    assert re.search(rf"Feature {best.feature} · layer 0\b", body), body[:2000]
    assert best.feature != by_freq.feature and best.score > 0.5
    n = rows["builtin"]["detection"].n
    assert f"detection AUC {best.score:.2f} (n={n}: " in body
    assert "Dead: on " in body and "Live: on " in body

    page.get_by_role("tab", name="Explain a completion").click()
    button = page.get_by_test_id("stTabs").get_by_test_id("stBaseButton-primary")
    button.wait_for(timeout=60_000)
    _settle(page)
    _press(page, button, page.get_by_text("Total description").first, timeout=120_000)
    page.wait_for_timeout(1500)
    labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
    scores = [t for t in labels if t.startswith(("Quality", "Interpretability"))]
    assert scores == ["Quality: perplexity", "Interpretability (AUC)"], labels
    assert _cut(page) == []
    body = page.inner_text("body")
    assert re.search(r"n = \d+ generated tokens", body) and re.search(r"n = [\d,]+ token judgements", body)
    _no_exception(page)
    page.get_by_text("Total description").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(_shots(tmp_path) / "features_explain_scores.png"))  # the view as scrolled

    page.get_by_text("Import and export (SAELens, Neuronpedia)").click()
    page.get_by_role("button", name="Export").wait_for(timeout=30_000)
    _settle(page)
    page.get_by_role("button", name="Export").scroll_into_view_if_needed()
    _no_exception(page)
    assert _cut(page) == []
    _checked_screenshot(page, tmp_path, "features_import_export")
