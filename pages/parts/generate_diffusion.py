"""Generate, diffusion mode: the Generate page's view for masked-diffusion models. The completion
starts as masks and every denoising step reveals some of them; the page shows that happening live,
then lets you replay any intermediate state. core.generation.diffusion computes; this module draws.

Not a page of its own: pages/generate.py calls :func:`diffusion_view` when the loaded model's
sampler (:func:`core.generation.sampler.sampler_for`) is the diffusion one. The result lives in ``st.session_state[RESULT_KEY]``, a dict
``{"status": "running" | "done" | "stopped" | "failed", "result": DiffusionResult | None,
"error": str | None, "run": int}``; while denoising, "result" is refreshed after every step, so a run
cut off by Stop (Streamlit aborts the script and reruns it) keeps every state it reached.
"""
from __future__ import annotations

import html
import json
from dataclasses import replace

import streamlit as st

from core.errors import LabError
from core.generation.autoregressive import encode_prompt
from core.generation.config import (DRAWN_SEEDS, GUMBEL_DTYPES, MAX_TEMPERATURE, PAGE_DIFFUSION_DEFAULTS, STRATEGIES,
                                    DiffusionConfig, draw_seed)
from core.generation.diffusion import DenoiseStep, DiffusionResult, DiffusionStarted, state_masked
from core.generation.sampler import Sampler, sampler_for
from core.models.loading import LoadedModel
from pages.parts.common import stream_run

RESULT_KEY = "gen_diff_result"
RUN_KEY = "gen_diff_run"
OUT_OF_MEMORY = "the device ran out of memory; generate fewer tokens or use a smaller model."
D = DiffusionConfig(**PAGE_DIFFUSION_DEFAULTS)  # every control's default is the config's, sampling as trained
MASK_BG = "#c9ccd1"       # a masked position: a grey block
NEW_BG = "#ffd54f"        # revealed at the step shown
OLD_BG = "#e3f2e1"        # revealed at an earlier step
STRATEGY_HELP = {"confidence": "most confident first", "random": "random order"}
GUMBEL_HELP = {"float64": "exact", "float32": "biased: fewer rare tokens"}


def dkey(name: str) -> str:
    """Widget key of a diffusion control."""
    return f"gen_diff_{name}"


# -- controls -------------------------------------------------------------------------------------

def diffusion_controls(n_columns: int = 3) -> DiffusionConfig:
    """The knobs of :class:`DiffusionConfig`, laid out in ``n_columns`` columns."""
    keep = dict(persist_state="session")  # values survive a visit to another page
    cols = st.columns(n_columns)
    cell = lambda i: cols[i % n_columns]  # noqa: E731
    gen_length = cell(0).number_input(
        "Generation length", 1, 4096, D.gen_length, step=1, key=dkey("gen_length"), **keep,
        help="How many tokens to generate after the prompt. They all start masked; prompt plus generation must "
             "fit the model's context.")
    steps = cell(1).number_input(
        "Denoising steps", 1, 4096, D.steps, step=1, key=dkey("steps"), **keep,
        help="How many steps reveal the masks (a linear schedule: about length / steps tokens per step). More "
             "steps, fewer tokens decided at once; above the generation length some steps reveal nothing (with "
             "'Reuse unchanged steps' they cost no model call).")
    strategy = cell(2).selectbox(
        "Unmask", STRATEGIES, STRATEGIES.index(D.strategy), key=dkey("unmask"), format_func=lambda s: f"{s} ({STRATEGY_HELP[s]})", **keep,
        help="Which masked positions each step reveals: those where the model is most confident of its "
             "prediction, or positions picked at random.")
    temperature = cell(3).number_input(
        "Temperature", 0.0, MAX_TEMPERATURE, D.temperature, step=0.05, key=dkey("temperature"), **keep,
        help="0 puts the most likely token at each revealed position; above 0 samples it from the model's "
             "distribution divided by this temperature. It starts at 1 with random unmasking, the process the model "
             "was trained to reverse: at 0 a young model tends to write the same token (often a newline) everywhere.")
    top_k = cell(4).number_input(
        "Top-k", 0, 1_000_000, D.top_k, step=1, key=dkey("top_k"), disabled=temperature == 0, **keep,
        help="With temperature above 0: sample among the k most likely tokens only; 0 turns it off.")
    seed = cell(5).number_input(
        "Seed", 0, DRAWN_SEEDS - 1, None, step=1, key=dkey("seed"), placeholder="random", **keep,
        help="Same seed, same settings, same model: same text (it matters with temperature above 0 or random "
             "unmasking). Leave empty for a random seed; it is reported with the result.")
    top_p = cell(6).number_input(
        "Top-p", 0.01, 1.0, D.top_p, step=0.05, key=dkey("top_p"), disabled=temperature == 0, **keep,
        help="With temperature above 0: sample from the smallest set of most likely tokens holding this much "
             "probability; 1 turns it off.")
    min_p = cell(7).number_input(
        "Min-p", 0.0, 0.99, D.min_p, step=0.05, key=dkey("min_p"), disabled=temperature == 0, **keep,
        help="With temperature above 0: drop tokens less likely than this share of the most likely one's "
             "probability; 0 turns it off.")
    block_length = cell(8).number_input(
        "Block length", 0, 4096, D.block_length, step=1, key=dkey("block_length"), **keep,
        help="Semi-autoregressive decoding (LLaDA): the generation is cut into blocks of this many tokens, decoded "
             "left to right, each finished before the next starts; the steps are shared between blocks. 0 is one "
             "block: the whole generation at once.")
    gumbel_dtype = cell(9).selectbox(
        "Sampling precision", GUMBEL_DTYPES, GUMBEL_DTYPES.index(D.gumbel_dtype), key=dkey("gumbel_dtype"),
        format_func=lambda d: f"{d} ({GUMBEL_HELP[d]})", disabled=temperature == 0, **keep,
        help="With temperature above 0, the precision of the random draws. float32 draws cannot reach tokens much "
             "less likely than the best one and draw the rare ones too seldom, which makes masked-diffusion samples "
             "blander than the model; float64 samples the model's distribution.")
    cache = cell(10).toggle(
        "Reuse unchanged steps", D.cache, key=dkey("cache"), **keep,
        help="A step that reveals nothing (more steps than tokens) leaves the text as it was, so the model's "
             "output would be the same: skip the model call. The text is identical either way.")
    return DiffusionConfig(gen_length=int(gen_length), steps=int(steps), strategy=str(strategy),
                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                           block_length=int(block_length), gumbel_dtype=str(gumbel_dtype), cache=bool(cache),
                           seed=None if seed is None else int(seed))


# -- running --------------------------------------------------------------------------------------

def settle_interrupted(record: dict | None) -> dict | None:
    """A record still "running" was cut off by a rerun (Stop, or any widget touched): the states it
    reached are kept as a new record marked stopped (the cut-off run's thread may still write its
    own record once before the stop reaches it), which is returned; None when there was none."""
    if record is None or record["status"] != "running":
        return None
    return {**record, "status": "stopped"}


def run_denoise(lm: LoadedModel, sampler: Sampler, prompt: str, cfg: DiffusionConfig, record: dict) -> None:
    """Denoise into a live view, refreshing ``record["result"]`` after every step."""
    live = st.empty()
    run = sampler.start(lm, prompt, cfg)

    def show(event) -> None:
        if isinstance(event, DiffusionStarted):
            record["result"] = run.result
        elif isinstance(event, DenoiseStep):
            result = record["result"] = run.result
            with live.container():
                st.html(state_html(lm, result, event.step))
                st.caption(f"step {event.step} / {event.total_steps} · "
                           f"{sum(event.masked)} of {cfg.gen_length} masks left…")

    stream_run(record, run, live, OUT_OF_MEMORY, show)


def generate(lm: LoadedModel, sampler: Sampler, prompt: str, cfg: DiffusionConfig) -> None:
    """Check the input first, so a mistake costs nothing (the earlier result stays on screen)."""
    ss = st.session_state
    try:
        ids = encode_prompt(lm, prompt)
        cfg.check(lm.stack.context_length - len(ids))
    except LabError as e:
        st.error(str(e))
        return
    if cfg.seed is None:
        cfg = replace(cfg, seed=draw_seed())  # drawn here so a stopped run still reports it
    ss[RUN_KEY] = ss.get(RUN_KEY, 0) + 1
    record = {"status": "running", "result": None, "error": None, "run": ss[RUN_KEY]}
    ss[RESULT_KEY] = record
    run_denoise(lm, sampler, prompt, cfg, record)


# -- showing --------------------------------------------------------------------------------------

def visible(text: str) -> str:
    """A token for the state view: a newline is a mark, not a line break. Revealed out of order,
    newlines broke the view into rows of a token or two (a young model reveals many), so the view
    keeps one flowing line of tokens; the text above it keeps the real layout."""
    return html.escape(text).replace("\n", "↵").replace("\t", "⇥") if text else "∅"


def state_html(lm: LoadedModel, result: DiffusionResult, state: int) -> str:
    """State ``state`` of a run (0 = all masks): the prompt in grey, masked positions as grey
    blocks, tokens revealed at this step highlighted, earlier ones lightly tinted. Hovering a token
    shows its position, the step that revealed it and its id."""
    P = len(result.prompt_ids)
    ids = result.states[state][P:]
    masked = state_masked(result, state)
    spans = []
    for i, (tok, m, step) in enumerate(zip(ids, masked, result.reveal_step)):
        if m:
            spans.append(f'<span class="mask" title="#{i} masked" style="display:inline-block;width:.9em;'
                         f'height:1.1em;vertical-align:text-bottom;background:{MASK_BG};border-radius:2px;'
                         f'margin-right:1px"></span>')
            continue
        new = step == state
        tip = html.escape(f"#{i}  revealed at step {step}  id {tok}", quote=True)
        spans.append(f'<span class="{"new" if new else "old"}" title="{tip}" style="background:'
                     f'{NEW_BG if new else OLD_BG};color:#111;border-radius:3px;margin-right:1px">'
                     f'{visible(lm.tokenizer.token_str(tok))}</span>')
    prompt = f'<span style="opacity:.6">{html.escape(result.prompt)}</span>'
    return ('<div style="white-space:pre-wrap;font-family:monospace;line-height:1.8;padding:.5rem 0">'
            f'{prompt}{"".join(spans)}</div>')


def settings_text(s: dict) -> str:
    """The decoding settings of a result in a few words (only the filters that are on)."""
    if s.get("temperature", 0) == 0:
        sampling = "most likely token"
    else:
        parts = [f"temperature {s['temperature']:g}"]
        parts += [f"top-k {s['top_k']}"] if s.get("top_k") else []
        parts += [f"top-p {s['top_p']:g}"] if s.get("top_p", 1.0) < 1.0 else []
        parts += [f"min-p {s['min_p']:g}"] if s.get("min_p", 0.0) > 0.0 else []
        parts += [f"{s['gumbel_dtype']} draws"] if s.get("gumbel_dtype", D.gumbel_dtype) != D.gumbel_dtype else []
        sampling = ", ".join(parts)
    blocks = f" in blocks of {s['block_length']}" if 0 < s.get("block_length", 0) < s.get("gen_length", 0) else ""
    return f"{s.get('strategy')} unmasking{blocks} · {sampling}"


def legend_html() -> str:
    def swatch(bg: str, text: str) -> str:
        return (f'<span style="background:{bg};color:#111;padding:0 .5em;margin-right:4px;border-radius:3px">'
                f'{text}</span>')
    return (f'<div style="font-size:.85em">{swatch(MASK_BG, "masked")}{swatch(NEW_BG, "revealed at this step")}'
            f'{swatch(OLD_BG, "revealed earlier")}</div>')


def show_result(lm: LoadedModel, sampler: Sampler, record: dict | None) -> None:
    if record is None:
        return
    result: DiffusionResult | None = record["result"]
    if record.get("error"):
        st.error(record["error"])
    if result is None:
        return
    done_steps = len(result.states) - 1
    if record["status"] == "stopped":
        st.warning(f"Stopped after {done_steps} of {result.steps} denoising steps; the states so far are kept.")
    st.code(result.text, language=None, wrap_lines=True)
    masks_left = sum(state_masked(result, done_steps))
    cols = st.columns(4)
    cols[0].metric("New tokens", len(result.completion_ids))
    cols[1].metric("Denoising steps", f"{done_steps} / {result.steps}")
    cols[2].metric("Masks left", masks_left)
    cols[3].metric("Seconds", f"{result.seconds:.2f}")
    s = result.settings
    st.caption(f"Model {result.model} · {settings_text(s)} · seed {s.get('seed')}")

    if done_steps >= 1:
        state = st.slider(
            "Denoising step", 0, done_steps, done_steps, key=dkey(f"step_{record['run']}"),
            help="Replay the denoising: 0 is the start (all masks), each step reveals a scheduled number of "
                 "tokens, highlighted at the step that revealed them.")
    else:
        state = 0
    st.html(state_html(lm, result, state))
    masked = state_masked(result, state)
    st.caption(f"State {state} of {done_steps}: {sum(r == state for r in result.reveal_step) if state else 0} "
               f"tokens revealed at this step, {sum(masked)} masks left")
    st.html(legend_html())
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button("Download text", result.text, file_name="diffusion.txt", mime="text/plain",
                       key=dkey("download_txt"), on_click="ignore")
    d2.download_button("Download JSON",
                       json.dumps(sampler.to_json(lm, result, stopped=record["status"] == "stopped"),
                                  indent=2, ensure_ascii=False),
                       file_name="diffusion.json", mime="application/json", key=dkey("download_json"),
                       on_click="ignore", help="The result with every intermediate state (token ids and text).")


# -- the view -------------------------------------------------------------------------------------

def diffusion_view(lm: LoadedModel, prompt: str) -> None:
    """Controls, Generate / Stop, the live denoising and the replay, for a diffusion model."""
    ss = st.session_state
    sampler = sampler_for(lm)
    st.caption(f"{lm.name} is a masked-diffusion model: the completion starts as masks, and each denoising step "
               f"reveals some of them, anywhere in the text.")
    cfg = diffusion_controls()
    b1, b2, _ = st.columns([1, 1, 6])
    go = b1.button("Generate", type="primary", key=dkey("go"), width="stretch")
    stop = b2.button("Stop", key=dkey("stop"), width="stretch",
                     help="Stop denoising; the states reached so far are kept.")
    record = ss.get(RESULT_KEY)
    if record is not None and record["result"] is not None and record["result"].model != lm.name:
        record = ss[RESULT_KEY] = None  # made by another model: its token ids mean nothing here
    stopped = settle_interrupted(record)
    if stopped is not None:
        record = ss[RESULT_KEY] = stopped
    if stopped is not None and not stop:
        st.info("The last generation was interrupted by a change on the page; its states so far are kept.")
    if go:
        generate(lm, sampler, prompt, cfg)
    show_result(lm, sampler, ss.get(RESULT_KEY))
