"""Generate's Interventions panel: pick heads, attention layers, MLPs, whole layers and transcoder
features to ablate, features to steer; see the completion with and without, side by side, and how
each token of the original completion changed in log-probability.

Other views open it pre-set (the attention view's "ablate this head", a feature card's "steer with
this feature") by leaving a :data:`PRESET_KEY` dict in session state and switching to Generate;
the panel moves it into its widgets before drawing them. The engine is
:func:`core.interventions.compare_generation`; nothing here touches the model.
"""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core.errors import LabError
from core.generation.config import DRAWN_SEEDS, SamplingConfig
from core.interventions.config import ABLATION_MODES, COMPARE_NEW_TOKENS, STEER_DEFAULT, STEER_RANGE
from core.interventions.spec import Interventions, from_flags
from core.models.loading import LoadedModel
from pages.parts.common import attempt

PRESET_KEY = "iv_preset"        # {"heads": ["L.H"], "steer": "L.F", "strength": x}: set by other views
RESULT_KEY = "iv_result"        # the last comparison (core.interventions.run.Comparison)
GENERATE_PAGE = "pages/generate.py"
KEEP = dict(persist_state="session")


def open_generate_with(heads: list[str] | None = None, steer: str | None = None,
                       strength: float = STEER_DEFAULT) -> None:
    """Switch to Generate with its Interventions panel set to ablate ``heads`` or steer with ``steer``."""
    st.session_state[PRESET_KEY] = dict(heads=list(heads or []), steer=steer, strength=float(strength))
    st.switch_page(GENERATE_PAGE)


def _apply_preset(lm: LoadedModel) -> bool:
    ss = st.session_state
    preset = ss.pop(PRESET_KEY, None)
    if not preset:
        return False
    heads = [h for h in preset.get("heads", []) if h in head_options(lm)]
    if heads:
        ss["iv_heads"] = sorted(set(ss.get("iv_heads", [])) | set(heads), key=head_options(lm).index)
    if preset.get("steer"):
        ss["iv_steer"] = preset["steer"]
        ss["iv_strength"] = float(preset.get("strength", STEER_DEFAULT))
    return True


def head_options(lm: LoadedModel) -> list[str]:
    return [f"{layer}.{head}" for layer in range(lm.stack.n_layer) for head in range(lm.stack.n_head)]


def panel_specs(heads, attn, mlps, layers, features: str, mode: str, steer: str, strength: float) -> Interventions:
    """The panel's choices as :class:`Interventions` (features typed as ``L.F, L.F``)."""
    suffix = ":mean" if mode == "mean" else ""
    ablate = ([f"head:{h}{suffix}" for h in heads] + [f"attn:{i}{suffix}" for i in attn]
              + [f"mlp:{i}{suffix}" for i in mlps] + [f"layer:{i}{suffix}" for i in layers]
              + [f"feature:{f.strip()}{suffix}" for f in features.split(",") if f.strip()])
    steering = [f"{steer.strip()}={float(strength):g}"] if steer.strip() and float(strength) != 0 else []
    return from_flags(ablate, steering)


def interventions_panel(lm: LoadedModel | None) -> None:
    """The panel, under the generation controls (autoregressive models)."""
    if lm is None:
        return
    ss = st.session_state
    preset = _apply_preset(lm)
    layers = list(range(lm.stack.n_layer))
    # open once something was asked of the panel, and stay open: a changed `expanded` would fold it mid-use
    ss["_iv_open"] = bool(preset or ss.get("iv_go") or RESULT_KEY in ss or ss.get("_iv_open"))
    with st.expander("Interventions: ablate and steer", expanded=ss["_iv_open"]):
        st.caption("Zero (or mean-) ablate components and add feature directions while generating; Run compares the "
                   "completion with and without them. Same as `--ablate` / `--steer` on `python -m core generate`.")
        c = st.columns(4)
        heads = c[0].multiselect("Heads", head_options(lm), key="iv_heads", **KEEP, placeholder="layer.head",
                                 help="Zero a head's output (its slice of blocks.L.attn.hook_z).")
        attn = c[1].multiselect("Attention layers", layers, key="iv_attn", **KEEP,
                                help="Zero the layer's whole attention output (hook_attn_out).")
        mlps = c[2].multiselect("MLP layers", layers, key="iv_mlp", **KEEP,
                                help="Zero the layer's MLP output (hook_mlp_out).")
        whole = c[3].multiselect("Whole layers", layers, key="iv_layer", **KEEP,
                                 help="Zero both: the block passes its input through unchanged.")
        c = st.columns(4)
        features = c[0].text_input("Features to ablate", key="iv_features", **KEEP, placeholder="1.42, 2.7",
                                   help="Transcoder features as layer.feature: the layer's transcoder replaces its MLP "
                                        "with these features off (needs the model's transcoder set).")
        mode = c[1].radio("Ablate with", ABLATION_MODES, key="iv_mode", horizontal=True, **KEEP,
                          help="zero, or the component's mean over the prompt's tokens.")
        steer = c[2].text_input("Steer with feature", key="iv_steer", **KEEP, placeholder="layer.feature",
                                help="Add this transcoder feature's decoder direction to the layer's MLP output at "
                                     "every position.")
        ss.setdefault("iv_strength", 0.0)   # a preset may have set it: no second default here
        strength = c[3].slider("Steering strength", *STEER_RANGE, step=0.5, key="iv_strength", **KEEP,
                               help="SCALE in --steer L.F=SCALE; 0 leaves the model as it is.")
        c = st.columns([1, 1, 1, 3], vertical_alignment="bottom")
        n_new = c[0].number_input("Tokens to compare", 1, 512, COMPARE_NEW_TOKENS, key="iv_new_tokens", **KEEP)
        greedy = c[1].toggle("Greedy", True, key="iv_greedy", **KEEP,
                             help="Off: both runs sample with the same seed, so they differ by the interventions only.")
        seed = c[2].number_input("Seed", 0, DRAWN_SEEDS - 1, 0, key="iv_seed", **KEEP, disabled=greedy)
        go = c[3].button("Run with and without", key="iv_go", type="primary")
        if go:
            _run(lm, st.session_state.get("gen_prompt", ""), heads, attn, mlps, whole, features, mode, steer,
                 strength, int(n_new), bool(greedy), int(seed))
        comparison = ss.get(RESULT_KEY)
        if comparison is not None:
            show_comparison(comparison)


def _run(lm, prompt, heads, attn, mlps, whole, features, mode, steer, strength, n_new, greedy, seed) -> None:
    from core.interventions.run import compare_generation

    try:
        iv = panel_specs(heads, attn, mlps, whole, features, mode, steer, strength)
    except LabError as e:
        st.error(str(e))
        return
    if not iv:
        st.error("Nothing to compare: pick a head, layer or feature to ablate, or a feature and a strength to steer.")
        return
    cfg = SamplingConfig(max_new_tokens=n_new, greedy=greedy, seed=None if greedy else seed)
    with st.spinner("Generating with and without the interventions…"):
        comparison, error = attempt(compare_generation, lm, prompt, cfg, iv)
    if error:
        st.error(error)
        return
    st.session_state[RESULT_KEY] = comparison


def delta_frame(comparison) -> pd.DataFrame:
    shown = [t.replace("\n", "↵").replace("\t", "⇥") for t in comparison.tokens]   # line breaks visible in a cell
    return pd.DataFrame({"position": list(range(len(comparison.tokens))), "token": shown,
                         "logprob without": comparison.logprob_before, "logprob with": comparison.logprob_after,
                         "change": comparison.delta})


def show_comparison(comparison) -> None:
    specs = ", ".join(r["spec"] for r in comparison.interventions)
    st.markdown(f"**With:** `{specs}`")
    left, right = st.columns(2, border=True)
    left.caption("Without interventions")
    left.code(comparison.original.text, language=None, wrap_lines=True)
    right.caption("With interventions")
    right.code(comparison.intervened.text, language=None, wrap_lines=True)
    if not comparison.tokens:
        return
    frame = delta_frame(comparison)
    st.caption("Change in log-probability of each token of the original completion (with − without), same prefix.")
    chart = alt.Chart(frame).mark_bar().encode(
        x=alt.X("position:O", axis=alt.Axis(labelExpr="datum.value")),
        y=alt.Y("change:Q", title="Δ log-probability"),
        color=alt.condition("datum.change < 0", alt.value("#d62728"), alt.value("#2ca02c")),
        tooltip=["position", "token", alt.Tooltip("logprob without:Q", format=".3f"),
                 alt.Tooltip("logprob with:Q", format=".3f"), alt.Tooltip("change:Q", format=".3f")])
    st.altair_chart(chart.properties(height=220), width="stretch")
    st.dataframe(frame, hide_index=True, key="iv_delta_table")
