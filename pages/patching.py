"""Activation patching: a clean and a corrupted prompt of the same length; for every (layer, position)
of the residual stream, the share of the clean answer's logit difference restored by copying the
clean activation into the corrupted run, as a heatmap. The engine is
:func:`core.interventions.patching_sweep`; this page draws.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.interventions.config import PATCH_CLEAN, PATCH_CORRUPTED, PATCH_POINTS
from core.models.hooks import ACT_NAMES
from core.models.loading import LoadedModel
from pages.parts.common import attempt, current_model, ensure_frame

RESULT_KEY = "patch_result"
KEEP = dict(persist_state="session")


def heatmap_frame(result) -> pd.DataFrame:
    L, T = result.restored.shape
    labels = [f"{i}:{t}" for i, t in enumerate(result.tokens)]
    layer, pos = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "position": [labels[p] for p in pos.ravel()],
                         "restored": result.restored.ravel(), "logit difference": result.logit_diff.ravel()})


def heatmap(result) -> alt.Chart:
    labels = [f"{i}:{t}" for i, t in enumerate(result.tokens)]
    return alt.Chart(heatmap_frame(result)).mark_rect().encode(
        x=alt.X("position:N", sort=labels, title="position (corrupted prompt's token)"),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("restored:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True),
                        title="share restored"),
        tooltip=["layer", "position", alt.Tooltip("restored:Q", format=".3f"),
                 alt.Tooltip("logit difference:Q", format=".3f")]
    ).properties(height=max(200, 26 * result.restored.shape[0]))


def token_id(lm: LoadedModel, text: str) -> int | None:
    """The single token ``text`` encodes to (None when blank); more than one token is refused."""
    from core.errors import LabError

    if not text:
        return None
    ids = lm.tokenizer.encode(text, add_special_tokens=False)  # the token itself, without the model's BOS
    if len(ids) != 1:
        raise LabError(f"'{text}' is {len(ids)} tokens for this tokenizer; give one token (mind the leading space).")
    return ids[0]


def run_sweep(lm: LoadedModel, clean: str, corrupted: str, point: str, answer: str, wrong: str):
    from core.interventions import patching_sweep

    return patching_sweep(lm, clean, corrupted, point=point, answer=token_id(lm, answer), wrong=token_id(lm, wrong))


def page() -> None:
    ss = st.session_state
    st.title("Activation patching")
    st.caption("Run the corrupted prompt, copy one (layer, position) activation from the clean run, and measure how "
               "much of the clean answer's logit difference comes back: 1 = all of it, 0 = none.")
    lm = current_model()
    clean = st.text_input("Clean prompt", PATCH_CLEAN, key="patch_clean", **KEEP)
    corrupted = st.text_input("Corrupted prompt", PATCH_CORRUPTED, key="patch_corrupted", **KEEP,
                              help="The same number of tokens as the clean prompt, differing in a few.")
    c = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    point = c[0].selectbox("Patch", PATCH_POINTS, key="patch_point", **KEEP,
                           format_func=lambda p: ACT_NAMES[p].replace("{layer}", "L"))
    answer = c[1].text_input("Answer token", key="patch_answer", **KEEP, placeholder="clean top token",
                             help="Blank: the clean run's most likely next token.")
    wrong = c[2].text_input("Against token", key="patch_wrong", **KEEP, placeholder="corrupted top token",
                            help="Blank: the corrupted run's most likely next token (its second if they agree).")
    go = c[3].button("Patch", key="patch_go", type="primary", disabled=lm is None)
    if lm is None:
        return
    if go:
        with st.spinner("Patching every layer and position…"):
            result, error = attempt(run_sweep, lm, clean, corrupted, point, answer.strip("\n"), wrong.strip("\n"))
        if error:
            st.error(error)
        else:
            ss[RESULT_KEY] = result
    result = ss.get(RESULT_KEY)
    if result is None or result.restored.shape[0] != lm.stack.n_layer:
        return
    m = st.columns(3)
    m[0].metric("Logit difference, clean", f"{result.clean_diff:.3f}")
    m[1].metric("Logit difference, corrupted", f"{result.corrupted_diff:.3f}")
    m[2].metric("Measured", f"{result.answer[1]!r} vs {result.wrong[1]!r}")
    st.altair_chart(heatmap(result), width="stretch", key="patch_heatmap")
    if np.isnan(result.restored).all():
        st.info("The clean and corrupted runs give the same logit difference, so there is nothing to restore; "
                "change the corrupted prompt or the tokens compared.")


ensure_frame()
page()
