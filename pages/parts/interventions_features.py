"""Two actions on a feature card: "try it on your text" (type text, see the feature's activation on
each token) and "steer with this feature" (Generate opens with the feature set to steer).
The engine is :func:`core.interventions.feature_activations`."""
from __future__ import annotations

import html

import streamlit as st

from core.interp.transcoder import TranscoderSet, load_transcoder_set
from core.interventions.config import STEER_DEFAULT
from pages.parts.common import attempt, load_outcome
from pages.parts.features_card import FIRE_RGB, _span, activation_alpha
from pages.parts.interventions_generate import open_generate_with

TRY_KEY = "feat_try_text"
TRIED_KEY = "feat_tried"          # {(folder, layer, feature, text): (tokens, acts)} of the last try


@st.cache_resource(max_entries=2, show_spinner="Loading transcoders…")
def _set(folder: str, device: str) -> TranscoderSet:
    return load_transcoder_set(folder, device)


def activations_html(tokens: list[str], acts: list[float]) -> str:
    """The text as highlighted tokens, each one's activation on hover and in a thin row below."""
    scale = max([a for a in acts if a > 0], default=0.0)
    spans = [_span(t, activation_alpha(a, scale), FIRE_RGB, f"activation {a:.4g}") for t, a in zip(tokens, acts)]
    return (f'<div class="feature-try" style="font-family: monospace; font-size: 0.9rem; line-height: 1.9; '
            f'white-space: pre-wrap;">{"".join(spans)}</div>'
            f'<div style="color: #888; font-size: 0.75rem;">max activation {html.escape(f"{scale:.4g}")}</div>')


def feature_actions(folder: str | None, layer: int, feature: int) -> None:
    """Under a feature card: try it on typed text; steer Generate with it."""
    lm, _ = load_outcome()
    if lm is None or folder is None:
        return
    st.markdown("**Try it on your text**")
    c = st.columns([4, 1], vertical_alignment="bottom")
    text = c[0].text_input("Text", key=TRY_KEY, placeholder="Type any text to see this feature's activation on each token",
                           label_visibility="collapsed")
    if c[1].button("Show activations", key="feat_try_go"):
        tset, error = attempt(_set, folder, str(lm.stack.device))
        if error is None:
            from core.interventions import feature_activations
            tried, error = attempt(feature_activations, lm, tset, layer, feature, text)
        if error:
            st.error(error)
        else:
            st.session_state[TRIED_KEY] = ((folder, layer, feature, text), tried)
    tried = st.session_state.get(TRIED_KEY)
    if tried is not None and tried[0] == (folder, layer, feature, text):
        st.html(activations_html(*tried[1]))
    if st.button("Steer with this feature", key="feat_steer", icon=":material/tune:",
                 help=f"Open Generate with this feature set to steer (strength {STEER_DEFAULT:g}; change it there)."):
        open_generate_with(steer=f"{layer}.{feature}", strength=STEER_DEFAULT)
