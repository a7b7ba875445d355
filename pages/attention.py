"""Attention: every head's attention pattern on a prompt, as a layers x heads grid; click a head (or
pick it) to enlarge it with its tokens, and ablate it, here (the patterns after zeroing it) or in
Generate (its Interventions panel opens with the head selected).

Patterns are ``blocks.{L}.attn.hook_pattern`` from :func:`core.interventions.attention_patterns`;
the engine computes, this page draws.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.interventions.config import ATTENTION_MAX_TOKENS
from core.models.loading import LoadedModel
from pages.parts.common import attempt, current_model, ensure_frame
from pages.parts.interventions_generate import open_generate_with

PROMPT_KEY = "att_prompt"
RESULT_KEY = "att_result"        # {"prompt", "tokens", "patterns" (L, H, T, T), "ablated": [L.H]}
LAYER_KEY, HEAD_KEY = "att_layer", "att_head"
DEFAULT_PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def grid_frame(patterns: np.ndarray, tokens: list[str], max_tokens: int = ATTENTION_MAX_TOKENS) -> pd.DataFrame:
    """Long-form rows (layer, head, query, key, weight) of the first ``max_tokens`` tokens, for the grid."""
    L, H, T, _ = patterns.shape
    n = min(T, max_tokens)
    layer, head, q, k = np.meshgrid(np.arange(L), np.arange(H), np.arange(n), np.arange(n), indexing="ij")
    w = patterns[:, :, :n, :n]
    keep = k <= q if np.allclose(np.triu(patterns[0, 0], 1), 0) else np.ones_like(k, bool)  # causal: no upper half
    return pd.DataFrame({"layer": layer[keep], "head": head[keep], "query": q[keep], "key": k[keep],
                         "weight": w[keep].astype(np.float32)})


def grid_chart(frame: pd.DataFrame) -> alt.Chart:
    n_heads = int(frame["head"].max()) + 1 if len(frame) else 1
    cell = int(min(140, max(40, 720 // n_heads)))                 # the grid fills about 720 px across
    pick = alt.selection_point(name="head", fields=["layer", "head"], on="click")
    base = alt.Chart(frame).mark_rect().encode(
        x=alt.X("key:O", axis=None), y=alt.Y("query:O", axis=None),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), legend=None),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.75)),
        tooltip=["layer", "head"]).properties(width=cell, height=cell).add_params(pick)
    return base.facet(row=alt.Row("layer:O", title="layer"), column=alt.Column("head:O", title="head"),
                      spacing=4)


def head_chart(pattern: np.ndarray, tokens: list[str]) -> alt.Chart:
    T = pattern.shape[0]
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    q, k = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    frame = pd.DataFrame({"query": [labels[i] for i in q.ravel()], "key": [labels[j] for j in k.ravel()],
                          "weight": pattern.ravel()})
    return alt.Chart(frame).mark_rect().encode(
        x=alt.X("key:N", sort=labels, title="key (attended to)"),
        y=alt.Y("query:N", sort=labels, title="query (attending)"),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues", domain=[0, 1])),
        tooltip=["query", "key", alt.Tooltip("weight:Q", format=".3f")]).properties(height=max(240, 18 * T))


def compute(lm: LoadedModel, prompt: str, ablated: list[str]) -> dict:
    from core.interventions import attention_patterns, from_flags, prepare

    fns = prepare(lm, from_flags([f"head:{h}" for h in ablated])) if ablated else None
    tokens, patterns = attention_patterns(lm, prompt, fns)
    return dict(prompt=prompt, tokens=tokens, patterns=patterns, ablated=list(ablated))


def _selected_from_chart(event) -> tuple[int, int] | None:
    try:
        picked = event.selection["head"]
    except (AttributeError, KeyError, TypeError):
        return None
    if picked:
        return int(picked[0]["layer"]), int(picked[0]["head"])
    return None


def page() -> None:
    ss = st.session_state
    st.title("Attention")
    st.caption("Every head's attention pattern (blocks.L.attn.hook_pattern): rows are the attending tokens, columns "
               "the tokens attended to. Click a head in the grid, or pick it below, to enlarge it.")
    lm = current_model()
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key=PROMPT_KEY, height=80, persist_state="session")
    if lm is None:
        return
    if st.button("Show attention", key="att_go", type="primary"):
        result, error = attempt(compute, lm, prompt, [])
        if error:
            st.error(error)
        else:
            ss[RESULT_KEY] = result
    result = ss.get(RESULT_KEY)
    if result is None:
        return
    L, H, T, _ = result["patterns"].shape
    if L != lm.stack.n_layer or H != lm.stack.n_head:
        ss.pop(RESULT_KEY)          # drawn for another model
        return
    if result["ablated"]:
        st.info(f"Patterns with head(s) {', '.join(result['ablated'])} zero-ablated.")
    if T > ATTENTION_MAX_TOKENS:
        st.caption(f"The grid shows the first {ATTENTION_MAX_TOKENS} of {T} tokens; the enlarged head shows all.")
    event = st.altair_chart(grid_chart(grid_frame(result["patterns"], result["tokens"])), on_select="rerun",
                            key="att_grid")
    clicked = _selected_from_chart(event)
    if clicked is not None and clicked != ss.get("_att_clicked"):
        ss[LAYER_KEY], ss[HEAD_KEY] = clicked
        ss["_att_clicked"] = clicked
    c = st.columns([1, 1, 2, 2], vertical_alignment="bottom")
    layer = c[0].selectbox("Layer", list(range(L)), key=LAYER_KEY)
    head = c[1].selectbox("Head", list(range(H)), key=HEAD_KEY)
    here = c[2].button("Ablate this head here", key="att_ablate",
                       help="Zero this head's output (hook_z) and show the patterns of every later head again.")
    there = c[3].button("Ablate it in Generate", key="att_generate",
                        help="Open Generate with this head selected in its Interventions panel.")
    if here:
        ablated = sorted(set(result["ablated"]) | {f"{layer}.{head}"})
        new, error = attempt(compute, lm, result["prompt"], ablated)
        if error:
            st.error(error)
        else:
            ss[RESULT_KEY] = new
            st.rerun()          # draw the grid above from the ablated patterns too
    if there:
        open_generate_with(heads=[f"{layer}.{head}"])
    st.subheader(f"Layer {layer}, head {head}")
    st.altair_chart(head_chart(result["patterns"][layer, head], result["tokens"]), width="stretch", key="att_head_chart")


ensure_frame()
page()
