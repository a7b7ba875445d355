"""The Consensus page's charts and tables: long-format frames of a run record, the Altair charts drawn
from them, and the PNG download of a chart.

A run record is the page's dict (see pages/consensus.py): ``{"label", "kind": "run" | "decode" | "sim",
"result", "tokens", ...}``. Frames are plain pandas (checked without Streamlit); only
:func:`chart_download` draws a widget.
"""
from __future__ import annotations

import re

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.consensus.engine import ConsensusDecodeResult
from core.consensus.metrics import STAT_NAMES
from core.errors import shorten

HEATMAP_TOKENS = 128          # tokens shown in the cosine heatmap at most
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
            label = f"{k}" + (f" → {texts[b][k]!r}" if k < len(texts[b]) else " (running)")
            rows.append(pd.DataFrame({"prompt": names[b], "token": label, "index": k, "step": result.steps[ok],
                                      "value": vals[ok].astype(np.float64)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["prompt", "token", "index", "step", "value"])


def _y(name: str, log: bool) -> alt.Y:
    scale = alt.Scale(type="symlog", constant=1e-6) if log else alt.Scale(zero=False)
    return alt.Y("value:Q", title=AXIS_TITLES[name], scale=scale)


def line_chart(frame: pd.DataFrame, name: str, log: bool, color: str, detail: str | None = None,
               x_title: str = "layer-step") -> alt.Chart:
    enc = dict(x=alt.X("step:Q", title=x_title), y=_y(name, log),
               color=alt.Color(f"{color}:N", sort=list(pd.unique(frame[color])),  # first-seen order, not A-Z
                               legend=alt.Legend(orient="bottom", columns=1, labelLimit=400)),
               tooltip=[c for c in ("run", "prompt", "token", "step") if c in frame.columns]
               + [alt.Tooltip("value:Q", format=".6g")])
    if detail:
        enc["detail"] = f"{detail}:N"
    return alt.Chart(frame).mark_line(point=len(frame) < 60).encode(**enc).properties(height=320)


def record_chart(record: dict, name: str, log: bool) -> alt.Chart:
    """One run: one line per prompt (per initial condition for a simulation; per new token for decoding)."""
    if record["kind"] == "decode":
        frame = traces_frame(record)
        first = prompt_names(record["result"])[0]
        return line_chart(frame[frame["prompt"] == first], "metric", log, "token")
    x_title = "integration step" if record["kind"] == "sim" else "layer-step"
    return line_chart(series_frame(record, name), name, log, "prompt", x_title=x_title)


def overlay_chart(records: list[dict], name: str, log: bool) -> alt.Chart:
    frame = pd.concat([series_frame(r, name) for r in records], ignore_index=True)
    return line_chart(frame, name, log, "run", detail="prompt",
                      x_title="layer-step (integration step for simulations)")


def heatmap_frame(record: dict, b: int, col: int) -> pd.DataFrame:
    result = record["result"]
    T = result.lengths[b]
    shown = min(T, HEATMAP_TOKENS)
    cos = result.matrix[b, :shown, :shown, col]  # (shown, shown)
    names = (record["tokens"][b][:shown] if record.get("tokens") else [f"x{i}" for i in range(shown)])
    i, j = np.meshgrid(np.arange(shown), np.arange(shown), indexing="ij")
    return pd.DataFrame({"i": i.reshape(-1), "j": j.reshape(-1), "cos": cos.reshape(-1).astype(np.float64),
                         "token i": np.asarray(names, dtype=object)[i.reshape(-1)],
                         "token j": np.asarray(names, dtype=object)[j.reshape(-1)]})


def heatmap_chart(frame: pd.DataFrame) -> alt.Chart:
    return (alt.Chart(frame).mark_rect()
            .encode(x=alt.X("j:O", title="token j"), y=alt.Y("i:O", title="token i"),
                    color=alt.Color("cos:Q", title="cos", scale=alt.Scale(domain=[-1, 1], scheme="redblue",
                                                                        reverse=True)),
                    tooltip=["i", "token i", "j", "token j", alt.Tooltip("cos:Q", format=".4f")])
            .properties(height=360))


def decodings_frame(record: dict) -> pd.DataFrame:
    result = record["result"]
    data = {"prompt": prompt_names(result)}
    for it, texts in sorted(result.decodings.items()):
        data[f"after iteration {it}"] = [t if t is not None else "" for t in texts]
    return pd.DataFrame(data)


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


def chart_download(chart: alt.Chart, name: str, key: str) -> None:
    """The chart as a PNG, rendered by vl-convert (no browser needed) when the button is pressed:
    rendering takes about a second, and the page reruns on every widget change."""
    def png() -> bytes:
        import vl_convert

        with alt.data_transformers.enable("default", max_rows=None):  # altair refuses 5,000+ rows by default
            spec = chart.to_dict()
        return vl_convert.vegalite_to_png(png_safe(spec), scale=2)

    st.download_button("Chart (PNG)", png, file_name=f"{name}.png", mime="image/png", key=key, on_click="ignore")
