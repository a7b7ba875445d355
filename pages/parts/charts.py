"""Chart pieces any page can share: a fixed plot height with the legend beside the plot (never
inside it), distinct colours, a log y axis labelled in decades, and one look on screen and in the
PNG download.

Why: a legend inside a fixed-height chart eats the plot (eight entries left a 40 px plot, twenty-four
a flat line without a y axis), and a symlog axis labels only 0 and the maximum, so a convergence
rate cannot be read off. Here the plot area is always :data:`PLOT_HEIGHT` pixels tall, the legend
sits to its right, and a log axis carries a tick and a label at every power of ten from the data's
largest value down to :data:`LOG_FLOOR`.

Charts are drawn with ``theme=None`` and carry their own look (:func:`styled`), so the PNG that
vl-convert renders from the same spec has the same colours, axes and layers as the screen.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

PLOT_HEIGHT = 340             # px of the chart; Streamlit fits axes and padding inside, the plot gets about 280
PNG_WIDTH = 940               # px of a downloaded PNG (on screen the chart is as wide as its column)
LOG_FLOOR = 1e-8              # log axes: values at or below it (zero, rounding noise below zero) sit on this line
# Tableau's ten and twenty colours, written out so the screen and the PNG agree on them.
PALETTE = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6",
           "#9d755d", "#bab0ac"]
PALETTE_20 = ["#4c78a8", "#9ecae9", "#f58518", "#ffbf79", "#54a24b", "#88d27a", "#b79a20", "#f2cf5b",
              "#439894", "#83bcb6", "#e45756", "#ff9d98", "#79706e", "#bab0ac", "#d67195", "#fcbfd2",
              "#b279a2", "#d6a5c9", "#9e765f", "#d8b5a5"]
SUMMARY_COLOUR = "#1f2937"    # the mean line and its band
FAINT_COLOUR = "#9ca3af"      # the individual lines behind a summary
FONT = "Source Sans Pro, sans-serif"


def colours(n: int) -> list[str]:
    """``n`` distinct colours (ten, or twenty when more are asked; beyond that they repeat)."""
    base = PALETTE if n <= len(PALETTE) else PALETTE_20
    return [base[i % len(base)] for i in range(n)]


def legend(title: str | None = None) -> alt.Legend:
    """Beside the plot, one entry a line, labels long enough for a prompt."""
    return alt.Legend(title=title, orient="right", labelLimit=260, symbolType="stroke", symbolStrokeWidth=3)


def decades(low: float, high: float) -> list[float]:
    """Powers of ten from the one at or below ``low`` to the one at or above ``high``."""
    lo = math.floor(math.log10(low))
    hi = max(math.ceil(math.log10(high)), lo + 1)
    return [10.0 ** k for k in range(lo, hi + 1)]


def log_values(values: pd.Series | np.ndarray) -> np.ndarray:
    """Values as a log axis draws them: at least :data:`LOG_FLOOR`."""
    return np.maximum(np.asarray(values, dtype=np.float64), LOG_FLOOR)


# Labels as people write them: 1, 10, 100, 1000, then 1e4; 1e-1, 1e-2, ... below 1.
DECADE_LABEL = ("datum.value >= 1 && datum.value <= 1000 ? format(datum.value, 'd') "
                ": replace(format(datum.value, '.0e'), '+', '')")


def y_axis(field: str, title: str, log: bool, shown: pd.Series | np.ndarray | None = None) -> alt.Y:
    """The y encoding of ``field``: linear (not forced to include 0), or log with a tick and a label
    at every decade that ``shown`` (the drawn values, already floored) spans."""
    if not log:
        return alt.Y(f"{field}:Q", title=title, scale=alt.Scale(zero=False))
    shown = np.asarray(shown if shown is not None else [1.0], dtype=np.float64)
    shown = shown[np.isfinite(shown)]
    low, high = (float(shown.min()), float(shown.max())) if shown.size else (LOG_FLOOR, 1.0)
    ticks = decades(max(low, LOG_FLOOR), max(high, LOG_FLOOR))
    if low <= LOG_FLOOR:
        title += f" (≤ {LOG_FLOOR:.0e} drawn at {LOG_FLOOR:.0e})".replace("e-0", "e-")
    return alt.Y(f"{field}:Q", title=title,
                 scale=alt.Scale(type="log", domain=[ticks[0], ticks[-1]], nice=False),
                 axis=alt.Axis(values=ticks, labelExpr=DECADE_LABEL, grid=True, tickCount=len(ticks)))


def styled(chart: alt.TopLevelMixin, height: int = PLOT_HEIGHT) -> alt.TopLevelMixin:
    """The fixed plot height and the look both the screen and the PNG get."""
    return (chart.properties(height=height)
            .configure(font=FONT)
            .configure_axis(labelFontSize=12, titleFontSize=13, titleFontWeight="normal", gridColor="#e5e7eb",
                            domainColor="#6b7280", tickColor="#6b7280", labelColor="#374151", titleColor="#111827")
            .configure_legend(labelFontSize=12, titleFontSize=12, titleFontWeight="normal", labelColor="#374151")
            .configure_view(strokeWidth=0))


def draw(chart: alt.TopLevelMixin, where=None, key: str | None = None) -> None:
    """``chart`` across its column, in its own look (no Streamlit theme: the PNG matches)."""
    (where or st).altair_chart(chart, width="stretch", theme=None, key=key)


# Characters vl-convert's text shaping panics on (a Rust panic aborts the whole server process):
# C0 controls other than tab / newline / carriage return, and the noncharacters U+FFFE and U+FFFF.
_PNG_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def png_safe(spec):
    """A Vega-Lite spec with every string made safe for vl-convert (a prompt may hold a NUL)."""
    if isinstance(spec, str):
        return _PNG_UNSAFE.sub("\ufffd", spec)
    if isinstance(spec, list):
        return [png_safe(x) for x in spec]
    if isinstance(spec, dict):
        return {k: png_safe(v) for k, v in spec.items()}
    return spec


def png_bytes(chart: alt.TopLevelMixin, width: int = PNG_WIDTH) -> bytes:
    """``chart`` as a PNG: the same spec as on screen, at a fixed width (vl-convert has no column)."""
    import vl_convert

    with alt.data_transformers.enable("default", max_rows=None):  # altair refuses 5,000+ rows by default
        spec = chart.to_dict()
    spec["width"] = width
    spec["autosize"] = {"type": "fit", "contains": "padding"}  # as Streamlit sizes it: axes inside the height
    return vl_convert.vegalite_to_png(png_safe(spec), scale=2)


def chart_download(chart: alt.TopLevelMixin, name: str, key: str, label: str = "Chart (PNG)") -> None:
    """A download button for the chart as a PNG, rendered by vl-convert (no browser needed) when the
    button is pressed: rendering takes about a second, and the page reruns on every widget change."""
    st.download_button(label, lambda: png_bytes(chart), file_name=f"{name}.png", mime="image/png", key=key,
                       on_click="ignore")


def first_seen(values: Sequence) -> list:
    """Distinct values in the order they first appear (a legend in run order, not A-Z)."""
    return list(pd.unique(pd.Series(list(values), dtype=object)))


def thin(frame: pd.DataFrame, by: str, max_rows: int) -> pd.DataFrame:
    """At most about ``max_rows`` rows, keeping every ``k``-th x of each ``by`` group (and its last)."""
    if len(frame) <= max_rows:
        return frame
    groups = frame.groupby(by, sort=False)
    every = -(-len(frame) // max_rows)
    pos = groups.cumcount()
    last = pos == groups[by].transform("size") - 1
    return frame[(pos % every == 0) | last]

