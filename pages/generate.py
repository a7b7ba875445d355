"""Generate: prompt a model with full sampling control, watch tokens stream, and inspect each
token's probability and the alternatives the model weighed. core.generation.autoregressive computes; this page
only draws.

Results live in ``st.session_state[RESULTS_KEY]`` (slot "A", and "B" in compare mode), each a dict
``{"status": "running" | "done" | "stopped" | "failed", "result": GenerationResult, "error": str | None,
"run": int}``. While streaming, "result" is refreshed after every token, so a run interrupted by
Stop (Streamlit aborts the script and reruns it) keeps what it had produced.

The loaded model's sampler (:func:`core.generation.sampler.sampler_for`) picks the view: a
diffusion model gets its own controls and a step-by-step denoising view, from
pages/parts/generate_diffusion.py. Every control's default and range is read from
:class:`SamplingConfig` and :mod:`core.generation.config`.
"""
from __future__ import annotations

import html
import json
from dataclasses import replace
from itertools import cycle

import altair as alt
import pandas as pd
import streamlit as st

from core.errors import LabError
from core.generation.autoregressive import (GenerationResult, TokenEvent, TokenInfo, encode_prompt, partial_result,
                                           perplexity)
from core.generation.config import DRAWN_SEEDS, MAX_TEMPERATURE, SamplingConfig, draw_seed
from core.generation.sampler import AUTOREGRESSIVE, sampler_for
from core.models.loading import LoadedModel
from pages.parts.common import current_model, ensure_frame, stream_run
from pages.parts.generate_diffusion import diffusion_view
from pages.parts.interventions_generate import interventions_panel

RESULTS_KEY = "gen_results"
RUN_KEY = "gen_run"
PROMPT_KEY = "gen_prompt"
COMPARE_KEY = "gen_compare"
SLOTS = ("A", "B")
DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
S = SamplingConfig  # every control's default is the config's
OUT_OF_MEMORY = "the device ran out of memory; use fewer new tokens, beams, or a smaller model."


def wkey(slot: str, name: str) -> str:
    """Widget key of a control in settings column ``slot``."""
    return f"gen_{slot}_{name}"


# -- controls -------------------------------------------------------------------------------------

def parse_stops(text: str) -> list[str]:
    """One stop string per line; ``\\n`` and ``\\t`` written out stand for newline and tab."""
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in text.split("\n") if line != ""]


def sampling_controls(slot: str, n_columns: int) -> SamplingConfig:
    """Every sampling knob of :class:`SamplingConfig`, laid out in ``n_columns`` columns."""
    k = lambda name: wkey(slot, name)  # noqa: E731
    keep = dict(persist_state="session")  # values survive a visit to another page
    cells = cycle(st.columns(n_columns))

    max_new = next(cells).number_input(
        "Max new tokens", 1, 4096, S.max_new_tokens, step=1, key=k("max_new_tokens"), **keep,
        help="How many tokens to generate at most; prompt plus new tokens must fit the model's context.")
    greedy = next(cells).toggle(
        "Greedy", S.greedy, key=k("greedy"), **keep,
        help="Always take the most likely token (deterministic). Turns the sampling controls off.")
    beams = next(cells).number_input(
        "Beams", 1, 16, S.num_beams, step=1, key=k("num_beams"), **keep,
        help="Beam search keeps this many candidate continuations and returns the most likely one; "
             "above 1 the sampling controls are off.")
    deterministic = greedy or beams > 1
    temperature = next(cells).number_input(
        "Temperature", 0.0, MAX_TEMPERATURE, S.temperature, step=0.05, key=k("temperature"), disabled=deterministic, **keep,
        help="Divides the logits: below 1 sharpens the distribution, above 1 flattens it. Must be above 0.")
    top_k = next(cells).number_input(
        "Top-k", 0, 1_000_000, S.top_k, step=1, key=k("top_k"), disabled=deterministic, **keep,
        help="Sample among the k most likely tokens only; 0 turns it off.")
    top_p = next(cells).slider(
        "Top-p", 0.0, 1.0, S.top_p, step=0.01, key=k("top_p"), disabled=deterministic, **keep,
        help="Nucleus sampling: the smallest set of likely tokens whose probabilities add up to p; 1 turns it off.")
    min_p = next(cells).slider(
        "Min-p", 0.0, 1.0, S.min_p, step=0.01, key=k("min_p"), disabled=deterministic, **keep,
        help="Drop tokens less likely than min-p times the top token's probability; 0 turns it off.")
    rep = next(cells).number_input(
        "Repetition penalty", 0.0, 10.0, S.repetition_penalty, step=0.05, key=k("repetition_penalty"), **keep,
        help="Above 1 makes tokens already in the text less likely (CTRL's penalty); 1 turns it off.")
    seed = next(cells).number_input(
        "Seed", 0, DRAWN_SEEDS - 1, None, step=1, key=k("seed"), disabled=deterministic, placeholder="random", **keep,
        help="Same seed, same settings, same model: same text. Leave empty for a random seed (it is reported "
             "with the result so you can repeat it).")
    length_penalty = next(cells).number_input(
        "Length penalty", -5.0, 5.0, S.length_penalty, step=0.1, key=k("length_penalty"), disabled=beams == 1, **keep,
        help="Beam search only: beams are ranked by total log-probability / length^penalty; above 0 favours "
             "longer continuations.")
    n_alt = next(cells).number_input(
        "Alternatives", 0, 20, S.n_alternatives, step=1, key=k("n_alternatives"), **keep,
        help="How many most likely tokens to record at each step, for the token inspector below.")
    stops = st.text_area(
        "Stop strings", "", key=k("stop"), height=68, placeholder="one per line, e.g. \\n\\n", **keep,
        help="Generation ends when the completion contains one of these (cut before it). One per line; "
             "write \\n for a newline.")
    return SamplingConfig(max_new_tokens=int(max_new), greedy=bool(greedy), temperature=float(temperature),
                          top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                          repetition_penalty=float(rep), stop=parse_stops(stops),
                          seed=None if seed is None else int(seed), num_beams=int(beams),
                          length_penalty=float(length_penalty), n_alternatives=int(n_alt))


# -- running ---------------------------------------------------------------------------------------

def settle_interrupted(results: dict, lm: LoadedModel | None) -> list[str]:
    """Runs still marked "running" were cut off by a rerun (Stop, or any widget touched): keep
    their tokens, marked stopped, with the prompt's perplexity the stream had no time to report.
    Each is kept as a new record: the cut-off run's thread may still write its own record once,
    between its next token and its next call into Streamlit (where the stop reaches it)."""
    settled = []
    for slot, record in list(results.items()):
        if record["status"] != "running":
            continue
        res: GenerationResult = record["result"]
        if res.prompt_perplexity is None and lm is not None and lm.name == res.model:
            try:
                res = replace(res, prompt_perplexity=perplexity(lm, res.prompt))
            except LabError:  # a one-token prompt has no perplexity
                pass
        results[slot] = {**record, "status": "stopped", "result": res}
        settled.append(slot)
    return settled


def validate(lm: LoadedModel, prompt: str, configs: dict[str, SamplingConfig]) -> None:
    """Check the prompt and every settings column before anything runs, so a mistake costs nothing
    (earlier results stay on screen)."""
    ids = encode_prompt(lm, prompt)
    room = lm.stack.context_length - len(ids)
    for slot, cfg in configs.items():
        try:
            cfg.check(room)
        except LabError as e:
            raise LabError(f"Settings {slot}: {e}" if len(configs) > 1 else str(e)) from None


def run_stream(lm: LoadedModel, prompt: str, cfg: SamplingConfig, record: dict) -> None:
    """Stream one generation into a live view, refreshing ``record`` after every token."""
    live = st.empty()
    run = AUTOREGRESSIVE.start(lm, prompt, cfg)

    def show(event) -> None:
        if isinstance(event, TokenEvent):
            record["result"] = run.result
            with live.container():
                st.code(prompt + event.completion, language=None, wrap_lines=True)
                st.caption(f"{run.done} / {cfg.max_new_tokens} tokens…")

    stream_run(record, run, live, OUT_OF_MEMORY, show)


def generate_all(lm: LoadedModel, prompt: str, configs: dict[str, SamplingConfig], out_columns) -> None:
    ss = st.session_state
    try:
        validate(lm, prompt, configs)
    except LabError as e:
        st.error(str(e))
        return
    results: dict = ss[RESULTS_KEY]
    results.clear()
    ss[RUN_KEY] = ss.get(RUN_KEY, 0) + 1
    for (slot, cfg), column in zip(configs.items(), out_columns):
        if cfg.seed is None and not (cfg.greedy or cfg.num_beams > 1):
            cfg = replace(cfg, seed=draw_seed())  # drawn here so a stopped run still reports it
        record = {"status": "running", "result": partial_result(lm, prompt, cfg, [], "", 0.0), "error": None,
                  "run": ss[RUN_KEY]}
        results[slot] = record
        with column:
            run_stream(lm, prompt, cfg, record)


# -- showing ---------------------------------------------------------------------------------------

def prob_colour(p: float) -> str:
    """Red (unlikely) through yellow to green (certain), light enough for dark text."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 80%, 78%)"


def visible(text: str) -> str:
    """A token's text with its whitespace made visible, for tables and chart labels."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def token_view_html(result: GenerationResult) -> str:
    """The prompt in grey, then each generated token on a background coloured by its probability
    under the model; hovering a token shows its index, probability and id."""
    spans = []
    for t in result.tokens:
        body = html.escape(t.text).replace("\n", "↵\n")
        tip = html.escape(f"#{t.index}  p = {t.prob:.4f}  id {t.token_id}", quote=True)
        spans.append(f'<span title="{tip}" style="background:{prob_colour(t.prob)};color:#111;'
                     f'border-radius:3px;margin-right:1px">{body}</span>')
    prompt = f'<span style="opacity:.6">{html.escape(result.prompt)}</span>'
    return ('<div style="white-space:pre-wrap;font-family:monospace;line-height:1.8;padding:.5rem 0">'
            f'{prompt}{"".join(spans)}</div>')


def legend_html() -> str:
    swatches = "".join(f'<span style="background:{prob_colour(p)};color:#111;padding:0 .5em;margin-right:2px;'
                       f'border-radius:3px">{p:g}</span>' for p in (0.0, 0.25, 0.5, 0.75, 1.0))
    return (f'<div style="font-size:.85em">Probability of each token under the model (raw softmax, before '
            f'sampling filters): {swatches}</div>')


def alternatives_frame(token: TokenInfo) -> pd.DataFrame:
    """The most likely tokens at one step, and the chosen one even when it was not among them."""
    rows = [{"rank": str(i + 1), "token": visible(text), "id": tid, "probability": prob,
             "chosen": tid == token.token_id} for i, (tid, text, prob) in enumerate(token.alternatives)]
    if not any(r["chosen"] for r in rows):
        rows.append({"rank": f"> {len(rows)}", "token": visible(token.text), "id": token.token_id,
                     "probability": token.prob, "chosen": True})
    return pd.DataFrame(rows, columns=["rank", "token", "id", "probability", "chosen"])


def alternatives_chart(frame: pd.DataFrame, texts: list[str]) -> alt.Chart:
    # quoted labels show leading spaces in any font; the id keeps look-alike tokens apart
    data = frame.assign(label=[f"{json.dumps(t, ensure_ascii=False)} [{i}]" for t, i in zip(texts, frame["id"])])
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X("probability:Q", scale=alt.Scale(zero=True), title="probability"),
                    y=alt.Y("label:N", sort="-x", title=None, axis=alt.Axis(labelLimit=240)),
                    color=alt.Color("chosen:N", scale=alt.Scale(domain=[True, False], range=["#e4572e", "#4c78a8"]),
                                    legend=alt.Legend(title="chosen")),
                    tooltip=["token", "id", alt.Tooltip("probability:Q", format=".4f")])
            .properties(height=30 * len(data) + 20))


def token_inspector(slot: str, result: GenerationResult, run: int) -> None:
    tokens = result.tokens
    if not tokens:
        return
    pick = st.selectbox(
        "Token to inspect", range(len(tokens)), key=wkey(slot, f"pick_{run}"),
        format_func=lambda i: f"#{i}  {visible(tokens[i].text)}  (p = {tokens[i].prob:.3f})",
        help="Pick a generated token to see the tokens the model found most likely at that step.")
    token = tokens[pick]
    if not token.alternatives:
        st.caption("No alternatives were recorded (Alternatives was 0).")
        return
    frame = alternatives_frame(token)
    raw_texts = [text for _, text, _ in token.alternatives]
    raw_texts += [token.text] * (len(frame) - len(raw_texts))
    left, right = st.columns([1, 1])
    left.dataframe(frame, hide_index=True, column_config={
        "probability": st.column_config.NumberColumn(format="%.4f"),
        "rank": st.column_config.TextColumn(help="Rank among the alternatives; \"> n\" when the chosen token "
                                                 "was not among the n most likely.")})
    right.altair_chart(alternatives_chart(frame, raw_texts), width="stretch")


def show_result(slot: str, record: dict | None, compare: bool) -> None:
    if record is None:
        return
    result: GenerationResult = record["result"]
    if compare:
        st.subheader(f"Output {slot}")
    if record.get("error"):
        st.error(record["error"])
    if record["status"] == "stopped":
        st.warning(f"Stopped after {len(result.tokens)} token(s); what was produced is kept.")
    if record["status"] == "failed" and not result.tokens:
        return
    st.code(result.text, language=None, wrap_lines=True)
    ppl = result.prompt_perplexity
    cols = st.columns([1, 0.8, 0.8, 1.4])  # the stop reason ("max new tokens") is the longest value
    cols[0].metric("Prompt perplexity", "n/a" if ppl is None else f"{ppl:.2f}",
                   help="exp(mean negative log-likelihood) of the prompt's tokens under the model; lower means "
                        "the model finds the prompt more predictable. Needs a prompt of 2+ tokens.")
    cols[1].metric("New tokens", len(result.tokens))
    cols[2].metric("Tokens / s", f"{result.tokens_per_s:.1f}")
    cols[3].metric("Stopped by", result.stop_reason.replace("_", " "))
    settings = result.settings
    sampled = not settings.get("greedy") and settings.get("num_beams", 1) == 1
    how = (f"sampled with seed {settings.get('seed')}" if sampled else
           "greedy" if settings.get("greedy") and settings.get("num_beams", 1) == 1 else
           f"beam search, {settings.get('num_beams')} beams")
    st.caption(f"Model {result.model} · {how}")
    st.html(token_view_html(result))
    st.html(legend_html())
    token_inspector(slot, result, record["run"])
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button("Download text", result.text, file_name=f"generation-{slot}.txt", mime="text/plain",
                       key=wkey(slot, "download_txt"), on_click="ignore")
    d2.download_button("Download JSON", json.dumps(result.to_json(), indent=2, ensure_ascii=False),
                       file_name=f"generation-{slot}.json", mime="application/json",
                       key=wkey(slot, "download_json"), on_click="ignore")


def autoregressive_view(lm: LoadedModel | None, prompt: str) -> None:
    """Settings (one column, or A and B side by side), Generate / Stop, and the results."""
    results = st.session_state.setdefault(RESULTS_KEY, {})
    compare = st.toggle("Compare two settings side by side", key=COMPARE_KEY, persist_state="session",
                        help="Two columns of settings, A and B; Generate runs both on the same prompt.")
    slots = SLOTS if compare else SLOTS[:1]
    configs: dict[str, SamplingConfig] = {}
    for slot, column in zip(slots, st.columns(len(slots), border=compare)):
        with column:
            if compare:
                st.markdown(f"**Settings {slot}**")
            configs[slot] = sampling_controls(slot, 2 if compare else 4)

    b1, b2, _ = st.columns([1, 1, 6])
    go = b1.button("Generate", type="primary", key="gen_go", disabled=lm is None, width="stretch")
    stop = b2.button("Stop", key="gen_stop", width="stretch",
                     help="Stop generating; the tokens produced so far are kept.")

    stopped = settle_interrupted(results, lm)
    if stopped and not stop:
        st.info("The last generation was interrupted by a change on the page; its tokens so far are kept.")

    out_columns = st.columns(len(slots))
    if go and lm is not None:
        generate_all(lm, prompt, configs, out_columns)
    for slot, column in zip(slots, out_columns):
        with column:
            show_result(slot, results.get(slot), compare)
    interventions_panel(lm)


# -- page ------------------------------------------------------------------------------------------

ensure_frame()
st.title("Generate")
ss = st.session_state
results = ss.setdefault(RESULTS_KEY, {})
lm = current_model()

prompt = st.text_area("Prompt", DEFAULT_PROMPT, key=PROMPT_KEY, height=110, persist_state="session",
                      help="The text the model continues.")
if lm is not None:
    n_prompt = len(lm.tokenizer.encode(prompt)) if prompt else 0
    ctx = lm.stack.context_length
    st.caption(f"{n_prompt} prompt tokens · context {ctx} · room for {max(ctx - n_prompt, 0)} new tokens")
VIEWS = {"autoregressive": autoregressive_view, "diffusion": diffusion_view}  # by sampler name
VIEWS[sampler_for(lm).name if lm is not None else AUTOREGRESSIVE.name](lm, prompt)
