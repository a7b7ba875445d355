"""Charts of training runs: metrics.jsonl records of one or more runs, overlaid and coloured by run.

:func:`metrics_frame` and :func:`loss_frame` are plain pandas (checked without Streamlit); the
draw functions turn them into Altair charts and skip a metric that no run reported (MFU and GPU
memory are null on the CPU) with a caption instead of an empty plot.
"""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

MAX_POINTS = 2000  # per run and chart; longer histories are thinned (validation points always kept)
COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "gpu_mem_gb"]
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


def loss_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long format for the loss charts: run, step, tokens, split (train / validation), loss."""
    long = df.melt(id_vars=["run", "step", "tokens"], value_vars=["train_loss", "val_loss"],
                   var_name="split", value_name="loss").dropna(subset=["loss"])
    long["split"] = long["split"].map({"train_loss": "train", "val_loss": "validation"})
    return long.reset_index(drop=True)


def _loss_chart(long: pd.DataFrame, x: str, title: str, log: bool) -> alt.LayerChart:
    """Training loss as a line, validation as a dashed line with a dot at each validation step."""
    x_title = "step" if x == "step" else "tokens seen"
    base = alt.Chart(long).encode(
        x=alt.X(f"{x}:Q", title=x_title),
        y=alt.Y("loss:Q", title="loss", scale=alt.Scale(type="log") if log else alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run"),
        strokeDash=alt.StrokeDash("split:N", title="split", sort=["train", "validation"]),
        tooltip=["run", "split", "step", alt.Tooltip("tokens:Q", format=","), alt.Tooltip("loss:Q", format=".4f")])
    train = base.transform_filter(alt.datum.split == "train").mark_line()
    val = base.transform_filter(alt.datum.split == "validation").mark_line(point=alt.OverlayMarkDef(size=30))
    return alt.layer(train, val, title=title)


def _metric_chart(df: pd.DataFrame, field: str, title: str, fmt: str) -> alt.Chart:
    data = df[["run", "step", field]].dropna(subset=[field])
    return alt.Chart(data, title=title).mark_line().encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y(f"{field}:Q", title=None, axis=alt.Axis(format=fmt), scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run", legend=None),
        tooltip=["run", "step", alt.Tooltip(f"{field}:Q", format=fmt)])


def draw_charts(df: pd.DataFrame, log_loss: bool = False) -> None:
    """Loss against step and against tokens (``log_loss``: log scale), then the throughput and
    optimiser charts."""
    if df.empty:
        st.caption("No metrics yet: the run is preparing its data or has not reached its first logged step.")
        return
    long = loss_frame(df)
    left, right = st.columns(2)
    left.altair_chart(_loss_chart(long, "step", "Loss by step", log_loss), key="tr_chart_loss_step")
    right.altair_chart(_loss_chart(long, "tokens", "Loss by tokens seen", log_loss), key="tr_chart_loss_tokens")
    cells = iter(st.columns(3) + st.columns(3))
    for field, (title, fmt, empty) in SMALL_CHARTS.items():
        cell = next(cells)
        if df[field].notna().any():
            cell.altair_chart(_metric_chart(df, field, title, fmt), key=f"tr_chart_{field}")
        else:
            cell.caption(f"**{title}**: {empty}.")
