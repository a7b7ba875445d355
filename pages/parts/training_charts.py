"""Charts of training runs: metrics.jsonl records of one or more runs, overlaid and coloured by run.

:func:`metrics_frame`, :func:`smooth`, :func:`x_values` and :func:`loss_frame` are plain pandas
(checked without Streamlit); the draw functions turn them into Altair charts and skip a metric that
no run reported (MFU and GPU memory are null on the CPU) with a caption instead of an empty plot.

What a reader must be able to tell apart at a glance: runs by colour (one palette of clearly distinct
colours, each run keeping its colour in every chart, in the order the runs were picked), train and
validation by line style (solid, and dashed with a dot at each validation), named in a legend drawn
with line symbols. Legends sit below the plots and every plot has a fixed height, so ten runs with
long names never squeeze a chart. The x axis is the step, the tokens seen or the training time; a
smoothing weight (TensorBoard's debiased exponential moving average) calms noisy curves, the raw
curve staying faintly behind the smoothed one.
"""
from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

MAX_POINTS = 2000  # per run and chart; longer histories are thinned (validation points always kept)
COLUMNS = ["step", "tokens", "time", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "gpu_mem_gb"]
# Tableau 10: ten colours told apart by most eyes (and in most colour-vision deficiencies); more runs reuse them
RUN_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
              "#bab0ac"]
X_AXES = {"step": "step", "tokens": "tokens seen", "time": "training time"}  # metrics.jsonl field -> label
X_FORMATS = {"step": ",~f", "tokens": "~s", "time": ",~f"}  # 10 (not 10.000000), 41k, 2.5
LOSS_FORMAT = ".4~f"
DEFAULT_X = "step"
SMOOTHING_MAX = 0.99
DEFAULT_SMOOTHING = 0.0  # raw curves until asked: the values on screen are the ones in metrics.jsonl
SMOOTHED = ("train_loss", "grad_norm", "tokens_per_s", "mfu")  # per-step series; validation is sparse, lr exact
LOSS_HEIGHT = 320        # px of the loss plot itself; its legend goes below
SMALL_HEIGHT = 170
FIT_WIDTH = alt.AutoSizeParams(type="fit-x", contains="padding")
LEGEND_LABEL_LIMIT = 320  # px of a run name in a legend before it is cut with an ellipsis
# field -> (title, axis format, why it can be empty)
SMALL_CHARTS = {
    "lr": ("Learning rate", ".1e", "no learning-rate values logged yet"),
    "grad_norm": ("Gradient norm", ".3", "no gradient norms logged yet"),
    "tokens_per_s": ("Tokens / s", ",.0f", "no throughput logged yet"),
    "mfu": ("MFU", ".1%", "not reported: MFU needs a GPU from the peak-FLOPs table (null on the CPU)"),
    "gpu_mem_gb": ("GPU memory (GB)", ".2f", "not reported: GPU memory is null for runs on the CPU"),
}


def metrics_frame(records: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per logged step and run: ``run`` plus :data:`COLUMNS` (missing values are NaN)."""
    parts = []
    for run, rows in records.items():
        if not rows:
            continue
        df = pd.DataFrame.from_records(rows)
        df = df.reindex(columns=COLUMNS).apply(pd.to_numeric, errors="coerce")
        df = df.dropna(subset=["step"]).drop_duplicates("step", keep="last").sort_values("step")
        if len(df) > MAX_POINTS:
            every = -(-len(df) // MAX_POINTS)
            keep = (pd.Series(range(len(df)), index=df.index) % every == 0) | df["val_loss"].notna()
            keep.iloc[-1] = True
            df = df[keep]
        df.insert(0, "run", run)
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=["run", *COLUMNS])
    return pd.concat(parts, ignore_index=True)


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard's smoothing: an exponential moving average with ``weight`` on the past, divided
    by ``1 - weight**n`` so the first points are not pulled towards zero. Missing values stay
    missing and are skipped; ``weight`` 0 returns the values unchanged."""
    if weight <= 0:
        return values.astype(float)
    out, last, n = [], 0.0, 0
    for v in values.astype(float):
        if math.isnan(v):
            out.append(math.nan)
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return pd.Series(out, index=values.index, dtype=float)


def smoothed(df: pd.DataFrame, weight: float) -> pd.DataFrame:
    """``df`` with each run's :data:`SMOOTHED` series smoothed (the raw train loss kept as ``train_raw``)."""
    out = df.copy()
    out["train_raw"] = out["train_loss"]
    if weight > 0 and not out.empty:
        for field in SMOOTHED:
            out[field] = out.groupby("run", sort=False)[field].transform(lambda s: smooth(s, weight))
    return out


def time_unit(seconds: float) -> tuple[str, float]:
    """``(unit, divisor)`` that shows a run's training time in readable numbers."""
    if seconds >= 2 * 3600:
        return "h", 3600.0
    if seconds >= 120:
        return "min", 60.0
    return "s", 1.0


def x_axis(x: str, title: str) -> alt.X:
    return alt.X("x:Q", title=title, axis=alt.Axis(format=X_FORMATS[x]))


def x_values(df: pd.DataFrame, x: str) -> tuple[pd.DataFrame, str]:
    """``(df with an ``x`` column to plot against, the axis title)`` for the axis ``x`` of :data:`X_AXES`."""
    out = df.copy()
    if x == "time":
        unit, div = time_unit(float(out["time"].max()) if out["time"].notna().any() else 0.0)
        out["x"] = out["time"] / div
        return out, f"{X_AXES[x]} ({unit})"
    out["x"] = out[x]
    return out, X_AXES[x]


def loss_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long format for the loss chart: run, step, tokens, time, x, split (train / validation), loss,
    raw (the unsmoothed value: the same as loss for validation), last (each run's newest train point)."""
    keep = [c for c in ("run", "step", "tokens", "time", "x") if c in df.columns]
    train = df[keep + ["train_loss", "train_raw" if "train_raw" in df.columns else "train_loss"]].copy()
    train.columns = keep + ["loss", "raw"]
    train["split"] = "train"
    val = df[keep + ["val_loss"]].copy()
    val.columns = keep + ["loss"]
    val["raw"] = val["loss"]
    val["split"] = "validation"
    long = pd.concat([train, val], ignore_index=True).dropna(subset=["loss"])
    newest = long[long["split"] == "train"].groupby("run", sort=False)["step"].transform("max")
    long["last"] = (long["split"] == "train") & (long["step"] == newest.reindex(long.index))
    return long[keep + ["split", "loss", "raw", "last"]].reset_index(drop=True)


def run_colors(runs: list[str]) -> alt.Scale:
    """The colour of each run, the same in every chart: the palette in the order the runs were picked."""
    return alt.Scale(domain=list(runs), range=[RUN_COLORS[i % len(RUN_COLORS)] for i in range(len(runs))])


def _loss_chart(long: pd.DataFrame, runs: list[str], x: str, x_title: str, title: str, log: bool,
                weight: float) -> alt.LayerChart:
    """Training loss as a solid line, validation as a dashed line with a dot at each validation."""
    legend = dict(orient="bottom", direction="horizontal", labelLimit=LEGEND_LABEL_LIMIT, symbolStrokeWidth=3,
                  symbolSize=500, symbolType="stroke", symbolOpacity=1)
    base = alt.Chart(long).encode(
        x=x_axis(x, x_title),
        y=alt.Y("loss:Q", title="loss", axis=alt.Axis(format=LOSS_FORMAT),
                scale=alt.Scale(type="log") if log else alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run", scale=run_colors(runs), legend=alt.Legend(**legend, columns=2)),
        tooltip=["run", "split", "step", alt.Tooltip("tokens:Q", format=","), alt.Tooltip("time:Q", format=",.1f"),
                 alt.Tooltip("loss:Q", format=".4f"), alt.Tooltip("raw:Q", format=".4f", title="raw")])
    dash = alt.StrokeDash("split:N", title="", sort=["train", "validation"],
                          scale=alt.Scale(domain=["train", "validation"], range=[[1, 0], [6, 4]]),
                          legend=alt.Legend(**legend, symbolStrokeColor="#555"))
    train = base.transform_filter(alt.datum.split == "train")
    val = base.transform_filter(alt.datum.split == "validation")
    layers = []
    if weight > 0:  # the raw curve, faint, behind the smoothed one
        layers.append(train.mark_line(opacity=0.25, strokeWidth=1).encode(y=alt.Y("raw:Q"), strokeDash=dash,
                                                                          tooltip=alt.value(None)))
    layers.append(train.mark_line(strokeWidth=2).encode(strokeDash=dash))
    layers.append(val.mark_line(strokeWidth=2).encode(strokeDash=dash))
    layers.append(val.mark_circle(size=45, opacity=1))  # a dot at each validation (no dash: lines only in that legend)
    # where each run is now: a line needs two points, so a run's first logged step would show nothing without it
    layers.append(train.transform_filter(alt.datum.last).mark_circle(size=30, opacity=1))
    # fit-x: the width follows the page, the height is the plot's own and the legend adds to it (Streamlit's
    # default, fit, squeezes plot and legend into the height, so every run more took rows from the plot)
    return alt.layer(*layers, title=title).properties(height=LOSS_HEIGHT, autosize=FIT_WIDTH)


def _metric_chart(df: pd.DataFrame, runs: list[str], field: str, title: str, fmt: str, x: str,
                  x_title: str) -> alt.Chart:
    data = df[["run", "step", "x", field]].dropna(subset=[field])
    return alt.Chart(data, title=title).mark_line(point=len(data) <= len(runs)).encode(  # one point each: dots
        x=x_axis(x, x_title),
        y=alt.Y(f"{field}:Q", title=None, axis=alt.Axis(format=fmt), scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run", scale=run_colors(runs), legend=None),
        tooltip=["run", "step", alt.Tooltip(f"{field}:Q", format=fmt)]).properties(height=SMALL_HEIGHT,
                                                                                   autosize=FIT_WIDTH)


def draw_charts(df: pd.DataFrame, log_loss: bool = False, x: str = DEFAULT_X, weight: float = DEFAULT_SMOOTHING,
                runs: list[str] | None = None) -> None:
    """The loss (``log_loss``: log scale) against ``x`` (a key of :data:`X_AXES`), smoothed with
    ``weight``, then the throughput and optimiser charts; ``runs`` in the order their colours go."""
    if df.empty:
        st.caption("No metrics yet: the run is preparing its data or has not reached its first logged step.")
        return
    runs = list(runs) if runs else list(dict.fromkeys(df["run"]))
    data, x_title = x_values(smoothed(df, weight), x)
    title = f"Loss by {X_AXES[x]}"
    st.altair_chart(_loss_chart(loss_frame(data), runs, x, x_title, title, log_loss, weight), key="tr_chart_loss")
    cells = iter(st.columns(3) + st.columns(3))
    for field, (chart_title, fmt, empty) in SMALL_CHARTS.items():
        cell = next(cells)
        if data[field].notna().any():
            cell.altair_chart(_metric_chart(data, runs, field, chart_title, fmt, x, x_title), key=f"tr_chart_{field}")
        else:
            cell.caption(f"**{chart_title}**: {empty}.")
