"""The Consensus page's charts and tables: long-format frames of a run record, the Altair charts drawn
from them (through the shared pieces of pages/parts/charts.py), and the two widgets that go with
them: the picker of lines to draw over a summary (:func:`pick_lines`) and the logit-lens table
(:func:`show_decodings`).

A run record is the page's dict (see pages/consensus.py): ``{"label", "kind": "run" | "decode" | "sim",
"result", "tokens", ...}``. Frames and charts are plain pandas and Altair (checked without a browser).
"""
from __future__ import annotations

import json
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.consensus.engine import ConsensusDecodeResult
from core.consensus.metrics import STAT_NAMES
from core.errors import shorten
from pages.parts.common import visible  # noqa: F401  (re-exported: the tests and pages name it here)
from pages.parts.charts import (FAINT_COLOUR, PALETTE, SUMMARY_COLOUR, colours, first_seen, legend, log_values,
                                styled, thin, y_axis)

HEATMAP_TOKENS = 128          # tokens shown in the cosine heatmap at most
HEATMAP_HEIGHT = 420          # px of the heatmap chart, axes included
HEAT_STEP_KEY = "cons_heat_step"
EACH_MAX = 10                 # up to this many lines each get a colour; more are drawn as mean and min-max band
MAX_FAINT_ROWS = 40_000       # points of the faint individual lines behind a summary (thinned beyond)
MAX_PICK_OPTIONS = 1000       # lines offered to pick (a decoding run may have 100,000 new tokens)
AXIS_TITLES = {"metric": "1 - mean |cos(h0, hj)|", "mean_cosine": "mean pairwise cosine",
               "mean_dot": "mean pairwise dot", "effective_rank": "effective rank",
               "centroid_distance": "distance to centroid"}


def prompt_names(result) -> list[str]:
    return [f"{b}: {shorten(p, 32, ' ')}" for b, p in enumerate(result.prompts)]


def series_frame(record: dict, name: str) -> pd.DataFrame:
    """Long format ``prompt, step, value`` of one series over the computed columns."""
    result = record["result"]
    p = result.columns_done
    values = result.series(name)[:, :p]  # (B, p)
    B = values.shape[0]
    frame = pd.DataFrame({"run": record["label"], "prompt": np.repeat(prompt_names(result), p),
                          "step": np.tile(result.steps[:p], B), "value": values.reshape(-1).astype(np.float64)})
    return frame[np.isfinite(frame["value"])]


def traces_frame(record: dict) -> pd.DataFrame:
    """Consensus decoding: ``prompt, token, step, value`` for every computed point of every trace."""
    result: ConsensusDecodeResult = record["result"]
    B, K, P = result.traces.shape
    names = prompt_names(result)
    rows = []
    for b in range(B):
        for k in range(K):
            vals = result.traces[b, k]
            ok = np.isfinite(vals)
            if not ok.any():
                continue
            texts = record.get("new_texts") or [[] for _ in range(B)]
            label = f"{k}" + (f" → {visible(texts[b][k])}" if k < len(texts[b]) else " (running)")
            rows.append(pd.DataFrame({"prompt": names[b], "token": label, "index": k, "step": result.steps[ok],
                                      "value": vals[ok].astype(np.float64)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["prompt", "token", "index", "step", "value"])


def _shown(frame: pd.DataFrame, log: bool) -> pd.DataFrame:
    """``frame`` with the column ``y`` a chart draws: the value, floored for a log axis."""
    return frame.assign(y=log_values(frame["value"]) if log else frame["value"].to_numpy(np.float64))


def _tooltip(frame: pd.DataFrame) -> list:
    return ([c for c in ("run", "prompt", "token", "step") if c in frame.columns]
            + [alt.Tooltip("value:Q", format=".6g")])


def step_axis(title: str) -> alt.X:
    """Layer-steps are whole numbers: no 0.5 ticks, labels without decimals."""
    return alt.X("step:Q", title=title, axis=alt.Axis(format="~d", tickMinStep=1))


def summary_frame(frame: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Per step (and per ``by``, e.g. run): the mean, min and max of ``y`` across the lines and
    how many lines there are."""
    keys = ([by] if by else []) + ["step"]
    out = frame.groupby(keys, sort=False)["y"].agg(mean="mean", low="min", high="max", lines="count").reset_index()
    return out


def lines_chart(frame: pd.DataFrame, y_title: str, log: bool, group: str = "prompt",
                picks: Sequence[str] = (), x_title: str = "layer-step", mark_step: int | None = None,
                what: str = "prompts") -> alt.LayerChart:
    """Lines of ``frame`` (``group, step, value``), one per ``group`` value.

    Up to :data:`EACH_MAX` lines each get a colour and a legend entry. More are summarised: their
    mean as a dark line and their min-max band, every line faint behind (hovering one brings it
    forward with its tooltip), and the ``picks`` drawn in distinct colours. ``mark_step`` draws a
    dashed rule there (the layer-step the heatmap shows)."""
    frame = _shown(frame, log)
    names = first_seen(frame[group])
    x = step_axis(x_title)
    y = y_axis("y", y_title, log, frame["y"])
    layers = []
    if len(names) <= EACH_MAX:
        layers.append(alt.Chart(frame).mark_line(point=len(frame) < 60, strokeWidth=2).encode(
            x=x, y=y, tooltip=_tooltip(frame),
            color=alt.Color(f"{group}:N", scale=alt.Scale(domain=names, range=colours(len(names))),
                            legend=legend(None))))
    else:
        picks = [p for p in picks if p in set(names)]
        mean_name = f"mean of {len(names)} {what} (band: min to max)"
        summary = summary_frame(frame).assign(**{group: mean_name})
        hover = alt.selection_point(name="hover", fields=[group], on="pointerover", nearest=True, empty=False,
                                    clear="pointerout")
        faint = thin(frame, group, MAX_FAINT_ROWS)
        layers.append(alt.Chart(faint).mark_line(strokeWidth=1).encode(
            x=x, y=alt.Y("y:Q"), detail=f"{group}:N", color=alt.value(FAINT_COLOUR),
            opacity=alt.condition(hover, alt.value(1.0), alt.value(0.25)), tooltip=_tooltip(frame)))
        layers.append(alt.Chart(faint).mark_point(size=40, opacity=0, filled=True).encode(
            x=x, y=alt.Y("y:Q"), tooltip=_tooltip(frame)).add_params(hover))
        layers.append(alt.Chart(summary).mark_area(opacity=0.18, color=SUMMARY_COLOUR).encode(
            x=x, y=alt.Y("low:Q"), y2=alt.Y2("high:Q"),
            tooltip=["step", alt.Tooltip("low:Q", title="min", format=".6g"),
                     alt.Tooltip("high:Q", title="max", format=".6g")]))
        domain, rng = [mean_name, *picks], [SUMMARY_COLOUR, *colours(len(picks))]
        colour = alt.Color(f"{group}:N", scale=alt.Scale(domain=domain, range=rng), legend=legend(None))
        layers.append(alt.Chart(summary).mark_line(strokeWidth=2.5).encode(
            x=x, y=alt.Y("mean:Q"), color=colour,
            tooltip=["step", alt.Tooltip("mean:Q", format=".6g"), "lines"]))
        if picks:
            chosen = frame[frame[group].isin(picks)]
            layers.append(alt.Chart(chosen).mark_line(strokeWidth=2).encode(
                x=x, y=alt.Y("y:Q"), color=colour, tooltip=_tooltip(frame)))
        layers[0] = layers[0].encode(y=y)  # the first layer carries the axis
    if mark_step is not None:
        layers.append(alt.Chart(pd.DataFrame({"step": [int(mark_step)], "what": ["the heatmap's layer-step"]}))
                      .mark_rule(strokeDash=[5, 4], color="#6b7280").encode(x="step:Q", tooltip=["what", "step"]))
    return styled(alt.layer(*layers))


def run_groups(record: dict) -> list[str]:
    """The lines a run's chart draws: its prompts (initial conditions for a simulation)."""
    return prompt_names(record["result"])


def record_chart(record: dict, name: str, log: bool, picks: Sequence[str] = (),
                 mark_step: int | None = None) -> alt.LayerChart:
    """One run: a line per prompt (per initial condition for a simulation; per new token of the first
    prompt for decoding), summarised beyond :data:`EACH_MAX`."""
    if record["kind"] == "decode":
        return traces_chart(record, 0, log, picks)
    sim = record["kind"] == "sim"
    return lines_chart(series_frame(record, name), AXIS_TITLES[name], log, "prompt", picks,
                       x_title="integration step" if sim else "layer-step", mark_step=mark_step,
                       what="initial conditions" if sim else "prompts")


def _traces_of(record: dict, b: int) -> pd.DataFrame:
    frame = traces_frame(record)
    return frame[frame["prompt"] == prompt_names(record["result"])[b]]


def trace_names(record: dict, b: int) -> list[str]:
    """The lines of prompt ``b``'s traces chart: one per new token."""
    return first_seen(_traces_of(record, b)["token"])


def traces_chart(record: dict, b: int, log: bool, picks: Sequence[str] = ()) -> alt.LayerChart:
    """Consensus decoding: prompt ``b``'s trace of the reference metric for each new token."""
    frame = _traces_of(record, b)
    return lines_chart(frame, AXIS_TITLES["metric"], log, "token", picks, what="new tokens")


def overlay_chart(records: list[dict], name: str, log: bool) -> alt.LayerChart:
    """Several runs in one chart: each run's mean over its prompts as a line in the run's colour,
    with its min-max band across prompts."""
    frame = _shown(pd.concat([series_frame(r, name) for r in records], ignore_index=True), log)
    runs = first_seen(frame["run"])
    summary = summary_frame(frame, by="run")
    scale = alt.Scale(domain=runs, range=colours(len(runs)))
    x = step_axis("layer-step (integration step for simulations)")
    # one legend for band and line (a legend=None on either drops both): its symbols drawn opaque
    colour = alt.Color("run:N", scale=scale, legend=alt.Legend(
        title="runs: mean, band min–max", orient="right", labelLimit=260, symbolType="stroke",
        symbolStrokeWidth=3, symbolOpacity=1))
    band = alt.Chart(summary).mark_area(opacity=0.15).encode(
        x=x, y=y_axis("low", AXIS_TITLES[name], log, frame["y"]), y2="high:Q", color=colour)
    line = alt.Chart(summary).mark_line(strokeWidth=2).encode(
        x=x, y="mean:Q", color=colour, tooltip=["run", "step", alt.Tooltip("mean:Q", format=".6g"),
                                                alt.Tooltip("low:Q", title="min", format=".6g"),
                                                alt.Tooltip("high:Q", title="max", format=".6g"), "lines"])
    return styled(alt.layer(band, line))


def heat_step(record: dict) -> int:
    """The layer-step the heatmap shows: the slider's value, the last recorded step at first."""
    result = record["result"]
    steps = [int(s) for s in result.steps[:result.columns_done]]
    chosen = st.session_state.get(HEAT_STEP_KEY)
    return chosen if chosen in steps else steps[-1]


def heatmap_frame(record: dict, b: int, col: int) -> pd.DataFrame:
    result = record["result"]
    T = result.lengths[b]
    shown = min(T, HEATMAP_TOKENS)
    cos = result.matrix[b, :shown, :shown, col]  # (shown, shown)
    names = [visible(t) for t in record["tokens"][b][:shown]] if record.get("tokens") else [
        f"x{i}" for i in range(shown)]
    i, j = np.meshgrid(np.arange(shown), np.arange(shown), indexing="ij")
    return pd.DataFrame({"i": i.reshape(-1), "j": j.reshape(-1), "cos": cos.reshape(-1).astype(np.float64),
                         "token i": np.asarray(names, dtype=object)[i.reshape(-1)],
                         "token j": np.asarray(names, dtype=object)[j.reshape(-1)]})


def heatmap_chart(frame: pd.DataFrame) -> alt.Chart:
    """The T x T cosines, each axis labelled with the tokens (whitespace visible), in order."""
    n = int(frame["i"].max()) + 1 if len(frame) else 0
    labels = frame.drop_duplicates("i").sort_values("i")["token i"].tolist()
    # position -> token text; a Vega expression array, JSON-quoted (a token may hold quotes or backslashes)
    expr = "[" + ", ".join(json.dumps(t, ensure_ascii=False) for t in labels) + "][datum.value]"
    size = 12 if n <= 24 else 10 if n <= 48 else 8
    axis = dict(labelExpr=expr, labelFontSize=size, labelLimit=90, labelOverlap="greedy" if n > 64 else False)
    chart = (alt.Chart(frame).mark_rect()
             .encode(x=alt.X("j:O", title="token j", axis=alt.Axis(labelAngle=-60, **axis)),
                     y=alt.Y("i:O", title="token i", axis=alt.Axis(**axis)),
                     color=alt.Color("cos:Q", title="cos", scale=alt.Scale(domain=[-1, 1], scheme="redblue",
                                                                         reverse=True)),
                     tooltip=["i", "token i", "j", "token j", alt.Tooltip("cos:Q", format=".4f")]))
    return styled(chart, height=HEATMAP_HEIGHT)


def decodings_frame(record: dict, b: int = 0) -> pd.DataFrame:
    """Logit lens of prompt ``b``, aligned per input position: the input token, then the argmax
    token at that position after each chosen iteration (the lens's guess at the *next* token)."""
    result = record["result"]
    T = result.lengths[b]
    inputs = record.get("tokens")
    data = {"position": np.arange(T),
            "input token": [visible(t) for t in inputs[b]] if inputs else [""] * T}
    lens = getattr(result, "lens_tokens", None) or {}
    for it in sorted(result.decodings):
        tokens = (lens.get(it) or [None] * len(result.prompts))[b]
        if tokens is not None:
            data[f"after iteration {it}"] = [visible(t) for t in tokens]
        elif result.decodings[it][b] is not None:  # a run made before per-position decodings: its text, whole
            data[f"after iteration {it}"] = [visible(result.decodings[it][b])] + [""] * (T - 1)
        else:
            data[f"after iteration {it}"] = [""] * T  # not reached (a stopped run)
    return pd.DataFrame(data)


def pick_lines(names: Sequence[str], key: str, what: str, where=None) -> list[str]:
    """With more than :data:`EACH_MAX` lines, a chart shows their summary: this multiselect brings
    chosen ones forward, each in its own colour (none when there are few enough to draw them all)."""
    if len(names) <= EACH_MAX:
        return []
    options = list(names)[:MAX_PICK_OPTIONS]
    st.session_state[key] = [x for x in st.session_state.get(key, []) if x in set(options)]
    return (where or st).multiselect(
        f"Show {what}", options, key=key, max_selections=len(PALETTE),
        placeholder=f"mean and min–max band of {len(names)} {what}; pick some to draw them",
        help=f"More than {EACH_MAX} {what} are drawn as their mean and min–max band, each one faint "
             f"behind (hover a line to see which); the ones picked here get their own colour.")


def show_decodings(record: dict) -> None:
    """The logit-lens table of one prompt (a picker when there are several)."""
    result = record["result"]
    names = prompt_names(result)
    b = 0
    if len(names) > 1:
        b = st.selectbox("Logit lens of prompt", range(len(names)), key="cons_lens_prompt",
                         format_func=names.__getitem__)
    st.dataframe(decodings_frame(record, b), hide_index=True)


def csv_bytes(record: dict) -> bytes:
    """Long format: one row per prompt and recorded step, a column per statistic."""
    result = record["result"]
    if record["kind"] == "decode":
        frame = traces_frame(record).rename(columns={"value": "metric", "index": "new_token"}).drop(columns="token")
        return frame.to_csv(index=False).encode()
    p = result.columns_done
    B = len(result.prompts)
    frame = pd.DataFrame({"prompt": np.repeat(np.arange(B), p), "prompt_text": np.repeat(result.prompts, p),
                          "step": np.tile(result.steps[:p], B)})
    for name in STAT_NAMES:
        frame[name] = result.series(name)[:, :p].reshape(-1)
    return frame.to_csv(index=False).encode()
