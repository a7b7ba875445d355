"""The "explain a completion" panel of the Features page: generate from a prompt, then show what
each layer's transcoder features did to produce the completion, in words, with scores.

core.interp.completion computes (a generator of events: started, generated, one event per layer,
finished); this panel streams those events into a progress bar and keeps the finished result in
session state, where each listed feature has a button that opens its card.
"""
from __future__ import annotations

import html
from typing import Callable

import pandas as pd
import streamlit as st

from core.errors import LabError, first_line, is_out_of_memory, shorten
from core.generation.sampler import sampler_for
from core.interp.completion import (CompletionExplained, CompletionExplanation, CompletionStarted, Generated,
                                    LayerExplained, StepExplained, completion_settings, explain_completion)
from core.interp.config import EXPLAIN_MAX_NEW_TOKENS, EXPLAIN_TOP_FEATURES, EXPLAIN_TOP_FEATURES_MAX
from core.interp.explain import BUILTIN, Explainer, load_explainer
from core.interp.store import FeatureStore
from core.interp.transcoder import TranscoderSet
from core.models.loading import LoadedModel
from pages.parts.common import visible
from pages.parts.features_card import attribution_html, md_escape
from core.interp.jobs import usable_path
from pages.parts.features_jobs_view import device_options

RESULT_KEY = "feat_x_result"     # {"result": CompletionExplanation, "set": folder, "model": spec}
_OPENED_KEY = "_feat_x_opened"   # per layer table, the row last turned into an open card
_RUNS_KEY = "_feat_x_runs"       # explanations made in this session (names each result's tables)
DEFAULT_PROMPT = "ROMEO:"
SEED_MAX = 2**31 - 1
MAX_NEW_TOKENS_MAX = 1024     # the page's bound; the model's context is the real limit
EXPLAINERS = {BUILTIN: "Built-in (offline)", "lm": "Language model"}
OUT_OF_MEMORY = ("The device ran out of memory explaining the completion; ask for fewer new tokens, or pick a smaller "
                 "model or another device in the sidebar.")


def xkey(name: str) -> str:
    return f"feat_x_{name}"


@st.cache_resource(max_entries=1, show_spinner="Loading the explainer model…")
def _lm_explainer(spec: str, device: str, trust_remote_code: bool) -> Explainer:
    return load_explainer(spec, device=device, trust_remote_code=trust_remote_code)


def get_explainer(kind: str, spec: str, device: str, trust_remote_code: bool = False) -> Explainer:
    """The built-in explainer, or a language model (cached: loading flan-t5 takes a while) whose
    repository code runs only when the user ticked ``trust_remote_code``."""
    if kind == BUILTIN:
        return load_explainer(BUILTIN)
    spec = (spec or "").strip()
    if not spec:
        raise LabError("Enter the explainer model: a hub id such as google/flan-t5-base, or a local folder.")
    usable_path(spec, "The explainer model")  # a name the file system cannot even look up fails here, in words
    try:
        return _lm_explainer(spec, device, bool(trust_remote_code))
    except LabError:
        raise
    except Exception as e:  # transformers' own errors for a name that is no model: one line, no traceback
        raise LabError(f"Could not load the explainer model '{shorten(spec, 80)}' ({shorten(first_line(e), 160)}); "
                       f"enter a hub id such as google/flan-t5-base, or a local model folder.") from None


def completion_html(res: CompletionExplanation) -> str:
    return (f'<div style="white-space: pre-wrap; font-family: monospace; font-size: 0.9rem; line-height: 1.7;">'
            f'<span style="color: #888;">{html.escape(res.prompt)}</span>'
            f'<span style="background: rgba(44, 160, 44, 0.18); border-radius: 3px;">{html.escape(res.completion)}'
            f'</span></div>')


def features_frame(layer) -> pd.DataFrame:
    return pd.DataFrame({
        "feature": [fa.feature for fa in layer.features],
        "attribution": [fa.attribution for fa in layer.features],
        "max activation": [fa.max_activation for fa in layer.features],
        "explanation": [fa.explanation or "" for fa in layer.features],
        "AUC here": [fa.completion_auc for fa in layer.features],
        "n here": [fa.completion_n or None for fa in layer.features],
        "held-out AUC": [fa.score for fa in layer.features],
        "held-out n": [fa.score_n or None for fa in layer.features],
        "at tokens": [" ".join(repr(tok) for _, tok, _, _ in fa.positions[:3]) for fa in layer.features],
    })


def show_result(res: CompletionExplanation, open_card: Callable[[int, int], None], can_open: bool,
                run: int = 0) -> None:
    """The explained completion; selecting a feature's row calls ``open_card(layer, feature)`` (which
    reruns the page on its Features tab)."""
    st.html(completion_html(res))
    cols = st.columns(2)
    q, i = res.quality, res.interpretability
    cols[0].metric(f"Quality: {q.name}", q.shown, help=q.definition)
    cols[0].caption(f"n = {q.n:,} {'generated tokens' if q.name == 'perplexity' else 'graded completion'}")
    cols[1].metric("Interpretability (AUC)", i.shown, help=i.definition)
    cols[1].caption(f"n = {i.n:,} token judgements by {res.explainer}'s "
                    f"{'rule detector' if res.explainer == BUILTIN else 'yes/no answers'}"
                    if i.n else "n/a: no cited feature has an explanation (collect and describe the set)")
    with st.container(border=True, key=xkey("total")):
        st.markdown("**Total description**")
        st.markdown(md_escape(res.total_description))
        st.caption(f"{res.explainer} · {res.objective} model · {res.seconds:.1f}s")
    if can_open:
        st.caption("Each layer cites the features that drove the completion most (by attribution) and the tokens "
                   "they fired on; select a feature's row to open its card.")
    if res.steps:
        show_steps(res)
    for layer in res.layers:
        with st.container(border=True, key=xkey(f"layer_{layer.layer}")):
            st.markdown(f"**Layer {layer.layer}** · {layer.share:.0%} of the attribution")
            st.markdown(md_escape(layer.description))
            st.html(attribution_html(res.tokens, layer.per_token, res.n_prompt))
            df = features_frame(layer)
            key = xkey(f"features_{run}_{layer.layer}")  # a new result: fresh tables, no old selection
            event = st.dataframe(df, hide_index=True, key=key, on_select="rerun" if can_open else "ignore",
                                 selection_mode="single-row",
                                 column_config={"attribution": st.column_config.NumberColumn(format="%+.4f"),
                                                "max activation": st.column_config.NumberColumn(format="%.3g"),
                                                "AUC here": st.column_config.NumberColumn(
                                                    format="%.2f", help="How well the explanation predicts where the "
                                                    "feature fired on this text."),
                                                "held-out AUC": st.column_config.NumberColumn(
                                                    format="%.2f", help="Detection AUC of the explanation on "
                                                    "held-out corpus windows.")})
            if can_open:
                rows = list(event.selection.rows)
                seen = st.session_state.setdefault(_OPENED_KEY, {})
                if rows and seen.get(key) != rows[0]:
                    seen[key] = rows[0]
                    open_card(layer.layer, int(df.iloc[rows[0]]["feature"]))


def steps_frame(res: CompletionExplanation) -> pd.DataFrame:
    """One row per (denoising step, driving feature): what each step revealed and why."""
    rows = []
    for step in res.steps:
        revealed = " ".join(visible(tok) for _, tok in step.revealed)
        for rank, sf in enumerate(step.features or [None]):
            rows.append({"step": step.step, "revealed": revealed if rank == 0 else "",
                         "layer": sf.layer if sf else None, "feature": sf.feature if sf else None,
                         "attribution": sf.attribution if sf else None,
                         "explanation": (sf.explanation or "(no explanation)") if sf else "(no feature drove it)"})
    return pd.DataFrame(rows)


def show_steps(res: CompletionExplanation) -> None:
    """A diffusion completion step by step: each denoising step's revealed tokens and the features
    (of any layer) with the largest attribution to them, and the state a chosen step read."""
    with st.container(border=True, key=xkey("steps_view")):
        st.markdown(f"**Step by step** · {len(res.steps)} denoising steps revealed the completion")
        st.caption("Each step read the text as the steps before it left it (masks where nothing was revealed yet) "
                   "and revealed some tokens; the features listed drove those tokens most (activation x effect on "
                   "their log-probability), over every layer.")
        st.dataframe(steps_frame(res), hide_index=True, key=xkey("steps_view_table"),
                     column_config={"attribution": st.column_config.NumberColumn(format="%+.4f"),
                                    "explanation": st.column_config.TextColumn(width="large")})
        chosen = st.select_slider("Step", [s.step for s in res.steps], key=xkey("steps_view_pick"),
                                  help="The text as this step read it, and the tokens it revealed.")
        step = next(s for s in res.steps if s.step == chosen)
        st.code(res.prompt + step.read, language=None, wrap_lines=True)
        st.caption(f"Step {step.step} revealed {' '.join(visible(t) for _, t in step.revealed)} · mean "
                   f"log-probability {step.mean_logprob:.3f}")


def run_explanation(lm: LoadedModel, tset: TranscoderSet, store: FeatureStore | None, prompt: str, settings,
                    explainer: Explainer, top_features: int) -> CompletionExplanation | None:
    """Stream one explanation into a progress bar and a live view; the result, or None after st.error."""
    bar = st.progress(0.0, text="Generating…")
    live = st.empty()
    view = live.container()
    events = explain_completion(lm, tset, prompt, store=store, explainer=explainer, settings=settings,
                                top_features=top_features)
    result, total, done = None, 2, 0
    try:
        for ev in events:
            if isinstance(ev, CompletionStarted):
                total = len(ev.layers) + 1
            elif isinstance(ev, Generated):
                done += 1
                bar.progress(done / total, text=f"Generated {ev.n_tokens} tokens; attributing…")
                view.markdown(f"**Completion:** {md_escape(ev.completion)}")
            elif isinstance(ev, LayerExplained):
                done += 1
                le = ev.explanation
                bar.progress(min(1.0, done / total), text=f"Layer {le.layer} described")
                view.markdown(f"**Layer {le.layer}:** {md_escape(le.description)}")
            elif isinstance(ev, StepExplained):
                bar.progress(min(1.0, ev.step.step / max(ev.total_steps, 1)),
                             text=f"Denoising step {ev.step.step} of {ev.total_steps} explained")
            elif isinstance(ev, CompletionExplained):
                result = ev.result
    except LabError as e:
        st.error(str(e))
    except Exception as e:  # the device failing, or a bug: still one line, never a traceback
        st.error(OUT_OF_MEMORY if is_out_of_memory(e) else
                 f"Explaining the completion failed: {type(e).__name__}: {first_line(e)}")
    finally:
        events.close()
        bar.empty()
        live.empty()
    return result


def completion_panel(lm: LoadedModel, tset: TranscoderSet, store: FeatureStore | None, set_folder: str,
                     open_card: Callable[[int, int], None]) -> None:
    keep = dict(persist_state="session")
    st.caption("Generate from a prompt, then find the transcoder features that drove each layer (activation x "
               "effect on the generated tokens, token by token) and describe each layer and the whole.")
    if store is None:
        st.caption(":orange[No feature store for this set]: features are named by address only and the measured "
                   "score is n/a. Collect one below.")
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key=xkey("prompt"), height=80, **keep)
    diffusion = sampler_for(lm).denoises
    cols = st.columns(5 if diffusion else 4)
    max_new = cols[0].number_input("Max new tokens", 1, MAX_NEW_TOKENS_MAX, EXPLAIN_MAX_NEW_TOKENS, step=1,
                                   key=xkey("max_new"), **keep,
                                   help="Tokens to generate; prompt plus completion must fit the model's context.")
    greedy = cols[1].toggle("Greedy", True, key=xkey("greedy"), **keep,
                            help="Always the most likely token; off: sample with the temperature and seed.")
    temperature = cols[2].number_input("Temperature", 0.05, 5.0, 1.0, step=0.05, key=xkey("temperature"),
                                       disabled=greedy, **keep)
    seed = cols[3].number_input("Seed", 0, SEED_MAX, 0, step=1, key=xkey("seed"), disabled=greedy, **keep)
    steps = None
    if diffusion:
        steps = cols[4].number_input("Denoising steps", 1, 1024, 24, step=1, key=xkey("steps"), **keep)
    cols = st.columns([2, 3, 1, 1], vertical_alignment="bottom")
    kind = cols[0].radio("Explainer", list(EXPLAINERS), format_func=EXPLAINERS.get, key=xkey("explainer"),
                         horizontal=True, **keep,
                         help="Built-in: templated from the evidence, no model needed. Language model: a seq2seq "
                              "(flan-t5) or causal LM by hub id or local folder, if it is on this machine.")
    builtin = kind == BUILTIN
    spec = cols[1].text_input("Explainer model", key=xkey("lm"), disabled=builtin, **keep,
                              placeholder="google/flan-t5-base or /path/to/model")
    device = cols[2].selectbox("Explainer device", device_options(), key=xkey("device"), disabled=builtin)
    top = cols[3].number_input("Features per layer", 1, EXPLAIN_TOP_FEATURES_MAX, EXPLAIN_TOP_FEATURES, step=1,
                               key=xkey("top"), **keep)
    trust = st.checkbox("Trust the explainer's code", False, key=xkey("trust"), disabled=builtin,
                        help="Let transformers run Python code shipped with the explainer model's repository (some "
                             "models need it). Off unless ticked: tick it only for models whose authors you trust.")
    if st.button("Explain", key=xkey("run"), type="primary", icon=":material/psychology:"):
        st.session_state.pop(RESULT_KEY, None)
        if not prompt.strip():
            st.error("Enter a prompt to explain; it is empty.")
        else:
            try:
                settings = completion_settings(lm, max_new, temperature=None if greedy else temperature,
                                               seed=None if greedy else int(seed), steps=steps)
                explainer = get_explainer(kind, spec, device, trust and not builtin)
            except LabError as e:
                st.error(str(e))
            else:
                result = run_explanation(lm, tset, store, prompt, settings, explainer, int(top))
                if result is not None:
                    run = st.session_state.get(_RUNS_KEY, 0) + 1
                    st.session_state[_RUNS_KEY] = run
                    st.session_state[RESULT_KEY] = {"result": result, "set": set_folder, "model": lm.spec,
                                                    "run": run}
    saved = st.session_state.get(RESULT_KEY)
    if saved and saved["set"] == set_folder and saved["model"] == lm.spec:
        show_result(saved["result"], open_card, can_open=store is not None, run=saved.get("run", 0))
