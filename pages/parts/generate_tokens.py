"""Generate page, the token view: the prompt and the completion as tokens, each coloured by how
likely the model found it, every scored token clickable to inspect the alternatives the model
weighed there.

Why log-probability: a small model spreads its mass over thousands of tokens, so nearly every
token it picks has a probability under 0.2, and a linear scale painted almost the whole text red.
The colour runs over log10 p from 1 down to 10^-4 (or over the token's rank among the recorded
alternatives), so "likely", "plausible" and "surprising" stay apart.

Why a component: the strip is drawn by a small inline ``st.components.v2`` component (no build
step) that sends the clicked position back; the page keeps it in session state under
:func:`pick_key`, which is also how tests choose a token. Prompt tokens are scored too (one forward
pass over the prompt, :func:`core.generation.autoregressive.score_continuation`), so the prompt's
surprising words show as well; the first prompt token has no prefix and stays unscored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import altair as alt
import pandas as pd
import streamlit as st

from core.errors import LabError
from core.generation.autoregressive import GenerationResult, TokenInfo, encode_prompt, score_continuation
from core.models.loading import LoadedModel
from pages.parts.common import visible

COLOUR_BY = ("log-probability", "rank")
LOGP_FLOOR = math.log(1e-4)     # this probability and anything less is as red as it gets
LEGEND_PROBS = (1.0, 0.1, 0.01, 0.001, 0.0001)
RANK_BANDS = ((1, "1"), (2, "2"), (5, "3-5"), (20, "6-20"))  # (highest rank in the band, label); beyond: "> n"
RANK_HUES = (120, 90, 60, 35)
UNSCORED_BG = "#eceef1"
STRIP = "gptlab_token_strip"
STRIP_CSS = """
.gl-strip { white-space: pre-wrap; font-family: "Source Code Pro", monospace; font-size: .92rem; line-height: 1.9;
            padding: .4rem 0; color: #111; }
.gl-tok { border-radius: 3px; margin-right: 1px; padding: 1px 0; }
.gl-tok[data-i] { cursor: pointer; }
.gl-tok[data-i]:hover { outline: 1px solid #555; }
.gl-tok.gl-sel { outline: 2px solid #1f4e9c; outline-offset: 1px; }
.gl-tok.gl-prompt { opacity: .75; }
"""
STRIP_JS = """
export default function(component) {
  const { data, setTriggerValue, parentElement } = component;
  let root = parentElement.querySelector('.gl-strip');
  if (!root) { root = document.createElement('div'); root.className = 'gl-strip'; parentElement.appendChild(root); }
  root.replaceChildren();
  for (const tok of data.tokens) {
    const span = document.createElement('span');
    span.className = 'gl-tok' + (tok.prompt ? ' gl-prompt' : '') + (tok.i === data.selected ? ' gl-sel' : '');
    span.textContent = tok.t;
    span.style.background = tok.bg;
    span.title = tok.tip;
    if (tok.i !== null) {
      span.dataset.i = tok.i;
      span.onclick = () => setTriggerValue('pick', tok.i);
    }
    root.appendChild(span);
  }
}
"""


@dataclass
class Scored:
    """One token of the view: ``info`` is None for the unscored first prompt token."""

    position: int                  # in prompt + completion
    text: str
    token_id: int
    info: TokenInfo | None
    in_prompt: bool
    special: bool = False          # a start token (BOS) the tokenizer put before the prompt's text


def rank_of(token: TokenInfo) -> int | None:
    """The token's rank among the recorded alternatives (1 = the most likely); None when it was not
    among them (or none were recorded)."""
    return next((i + 1 for i, (tid, _, _) in enumerate(token.alternatives) if tid == token.token_id), None)


def logprob_colour(logprob: float) -> str:
    """Green (p = 1) through yellow (p = 0.01) to red (p <= 1e-4), on log p; light enough for dark text."""
    t = min(max(1.0 - logprob / LOGP_FLOOR, 0.0), 1.0)
    return f"hsl({120 * t:.0f}, 75%, 76%)"


def rank_colour(rank: int | None) -> str:
    """Green for the model's first choice, then yellow-green, yellow, orange; red beyond the recorded ones."""
    if rank is not None:
        for (top, _), hue in zip(RANK_BANDS, RANK_HUES):
            if rank <= top:
                return f"hsl({hue}, 75%, 76%)"
    return "hsl(0, 75%, 76%)"


def token_colour(token: TokenInfo | None, colour_by: str) -> str:
    if token is None:
        return UNSCORED_BG
    return rank_colour(rank_of(token)) if colour_by == "rank" else logprob_colour(token.logprob)


def prompt_scores(lm: LoadedModel | None, result: GenerationResult, record: dict) -> list[TokenInfo] | None:
    """The prompt's tokens 1.. scored with the model (kept in the run's record: one forward pass per
    result); None when the model that made the result is no longer loaded."""
    if "prompt_tokens" in record:
        return record["prompt_tokens"]
    if lm is None or lm.name != result.model:
        return None
    try:
        ids = encode_prompt(lm, result.prompt)
        scored, _ = score_continuation(lm, ids[:1], ids[1:], int(result.settings.get("n_alternatives", 5)))
    except LabError:
        return None
    record["prompt_tokens"] = scored
    return scored


def view_tokens(lm: LoadedModel | None, result: GenerationResult, record: dict) -> list[Scored]:
    """The prompt's tokens (scored where the model is at hand) and the generated ones, in order."""
    out: list[Scored] = []
    scored = prompt_scores(lm, result, record)
    if scored is not None and lm is not None:
        first = encode_prompt(lm, result.prompt)[0]
        n_bos = len(lm.tokenizer.prefix_ids)
        out.append(Scored(0, lm.tokenizer.token_str(first), first, None, True, special=n_bos > 0))
        out += [Scored(i + 1, t.text, t.token_id, t, True, special=i + 1 < n_bos) for i, t in enumerate(scored)]
    P = len(out)
    out += [Scored(P + t.index, t.text, t.token_id, t, False) for t in result.tokens]
    return out


def tip(s: Scored) -> str:
    where = "prompt" if s.in_prompt else f"generated #{s.info.index}" if s.info else ""
    if s.special and s.info is None:
        return (f"{visible(s.text)}  id {s.token_id}  (the tokenizer's start token, put before every prompt as the "
                f"model expects: nothing before it to predict it)")
    if s.info is None:
        return f"{visible(s.text)}  id {s.token_id}  (first prompt token: nothing before it to predict it)"
    rank = rank_of(s.info)
    n = len(s.info.alternatives)
    rank_text = f"rank {rank}" if rank else f"rank > {n}" if n else "rank not recorded"
    return (f"{visible(s.text)}  {where}  p = {s.info.prob:.4g}  log p = {s.info.logprob:.2f}  {rank_text}  "
            f"id {s.token_id}  (click to inspect)")


def strip_data(tokens: list[Scored], colour_by: str, selected: int | None, prompt_text: str | None) -> dict:
    """What the strip component draws: one entry per token; an unscored prompt (model not loaded)
    is one grey entry."""
    entries = []
    if prompt_text is not None:
        entries.append({"t": prompt_text.replace("\n", "↵\n"), "bg": UNSCORED_BG, "tip": "the prompt", "i": None,
                        "prompt": True})
    for s in tokens:
        entries.append({"t": s.text.replace("\n", "↵\n") or "∅", "bg": token_colour(s.info, colour_by),
                        "tip": tip(s), "i": None if s.info is None else s.position, "prompt": s.in_prompt})
    return {"tokens": entries, "selected": selected}


def pick_key(slot: str, run: int) -> str:
    """Session-state key holding the position of the token inspected in ``slot`` for run ``run``."""
    return f"gen_{slot}_inspect_{run}"


def token_strip(slot: str, run: int, data: dict) -> None:
    """Draw the strip; a click stores the clicked position under :func:`pick_key` before the rerun."""
    strip = st.components.v2.component(STRIP, css=STRIP_CSS, js=STRIP_JS, isolate_styles=False)
    key = f"gen_{slot}_strip_{run}"

    def picked() -> None:
        value = (st.session_state.get(key) or {}).get("pick")
        if value is not None:
            st.session_state[pick_key(slot, run)] = int(value)

    strip(key=key, data=data, on_pick_change=picked)


def legend_html(colour_by: str, n_alternatives: int) -> str:
    def swatch(bg: str, text: str) -> str:
        return (f'<span style="background:{bg};color:#111;padding:0 .5em;margin-right:3px;border-radius:3px">'
                f'{text}</span>')
    if colour_by == "rank":
        bands = [(top, label) for top, label in RANK_BANDS if top <= max(n_alternatives, 1)]
        items = "".join(swatch(rank_colour(top), label) for top, label in bands)
        items += swatch(rank_colour(None), f"> {n_alternatives}")
        what = "Rank of each token among the model's most likely tokens at its position"
    else:
        items = "".join(swatch(logprob_colour(math.log(p)), f"{p:g}") for p in LEGEND_PROBS)
        what = "Probability of each token under the model, on a log scale (raw softmax, before sampling filters)"
    return (f'<div style="font-size:.85em">{what}: {items}{swatch(UNSCORED_BG, "not scored")} '
            f'Click a token to inspect it.</div>')


# -- the inspector ----------------------------------------------------------------------------------

def alternatives_frame(token: TokenInfo) -> pd.DataFrame:
    """The chosen token first, then the most likely tokens at that position by rank (the chosen one
    appears once, flagged); ``rank`` is "> n" when it was not among the n recorded."""
    rank = rank_of(token)
    chosen = {"rank": str(rank) if rank else f"> {len(token.alternatives)}", "token": visible(token.text),
              "id": token.token_id, "probability": token.prob, "log p": token.logprob, "chosen": True}
    rows = [chosen] + [{"rank": str(i + 1), "token": visible(text), "id": tid, "probability": prob,
                        "log p": math.log(prob) if prob > 0 else float("-inf"), "chosen": False}
                       for i, (tid, text, prob) in enumerate(token.alternatives) if tid != token.token_id]
    return pd.DataFrame(rows, columns=["rank", "token", "id", "probability", "log p", "chosen"])


def chart_labels(token: TokenInfo) -> list[str]:
    """One label per row of :func:`alternatives_frame`: the token's text quoted (leading spaces show
    in any font) and its id (look-alike tokens stay apart)."""
    texts = [token.text] + [text for tid, text, _ in token.alternatives if tid != token.token_id]
    ids = [token.token_id] + [tid for tid, _, _ in token.alternatives if tid != token.token_id]
    return [f"{json.dumps(t, ensure_ascii=False)} [{i}]" for t, i in zip(texts, ids)]


def alternatives_chart(frame: pd.DataFrame, labels: list[str]) -> alt.Chart:
    """Bars of probability, one row per label in the frame's order (the chosen token on top); every
    label drawn in full."""
    data = frame.assign(label=labels)
    top = max(1e-9, float(data["probability"].max()))
    y = alt.Y("label:N", sort=labels, title=None, axis=alt.Axis(labelLimit=0, labelOverlap=False, labelFontSize=12))
    x = alt.X("probability:Q", scale=alt.Scale(zero=True, domain=[0, top * 1.18]), title="probability")
    bars = alt.Chart().mark_bar().encode(
        x=x, y=y,
        color=alt.Color("chosen:N", scale=alt.Scale(domain=[True, False], range=["#e4572e", "#4c78a8"]), legend=None),
        tooltip=["rank", "token", "id", alt.Tooltip("probability:Q", format=".4g"), alt.Tooltip("log p:Q", format=".2f")])
    values = alt.Chart().mark_text(align="left", dx=3, fontSize=11).encode(
        x=x, y=y, text=alt.Text("probability:Q", format=".2g"))  # a tiny bar still says its probability
    # a step per row, not a height: Streamlit squeezed a fixed-height band axis to nothing
    return alt.layer(bars, values, data=data, title="Alternatives (the chosen token in red, on top)").properties(
        height=alt.Step(24))


def token_inspector(slot: str, tokens: list[Scored], run: int, selected: int) -> None:
    """The alternatives at the selected position: a table and a chart, the chosen token first."""
    by_position = {s.position: s for s in tokens if s.info is not None}
    s = by_position.get(selected)
    if s is None:
        return
    info = s.info
    where = "prompt token" if s.in_prompt else f"generated token #{info.index}"
    st.markdown(f"**Token to inspect:** `{visible(s.text)}`, {where} (position {s.position}) · "
                f"p = {info.prob:.4g} · log p = {info.logprob:.2f}")
    if not info.alternatives:
        st.caption("No alternatives were recorded (Alternatives was 0).")
        return
    frame = alternatives_frame(info)
    left, right = st.columns([1, 1])
    left.dataframe(frame, hide_index=True, key=f"gen_{slot}_alt_table_{run}", column_config={
        "probability": st.column_config.NumberColumn(format="%.4f"),
        "log p": st.column_config.NumberColumn(format="%.2f"),
        "rank": st.column_config.TextColumn(help="Rank among the most likely tokens at this position; \"> n\" when "
                                                 "the chosen token was not among the n recorded.")})
    right.altair_chart(alternatives_chart(frame, chart_labels(info)), width="stretch")


def token_view(slot: str, lm: LoadedModel | None, result: GenerationResult, record: dict) -> None:
    """Colour control, the clickable strip, its legend and the inspector of the clicked token."""
    run = record["run"]
    colour_by = st.segmented_control(
        "Colour by", COLOUR_BY, default=COLOUR_BY[0], key=f"gen_{slot}_colour_by", persist_state="session",
        help="Log-probability: green for likely, yellow around p = 0.01, red for 1e-4 and below. Rank: the "
             "token's place among the model's most likely tokens at its position (1 = its first choice).")
    colour_by = colour_by or COLOUR_BY[0]
    tokens = view_tokens(lm, result, record)
    scored_prompt = any(s.in_prompt for s in tokens)
    key = pick_key(slot, run)
    first_new = next((s.position for s in tokens if not s.in_prompt), None)
    selected = st.session_state.get(key, first_new)
    token_strip(slot, run, strip_data(tokens, colour_by, selected, None if scored_prompt else result.prompt))
    st.html(legend_html(colour_by, int(result.settings.get("n_alternatives", 5))))
    if selected is not None:
        token_inspector(slot, tokens, run, selected)
