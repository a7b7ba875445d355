"""Generate: prompt a model with full sampling control, watch tokens stream, and inspect each
token's probability and the alternatives the model weighed. core.generation.autoregressive computes; this page
only draws.

Results live in ``st.session_state[RESULTS_KEY]`` (slot "A", and "B" in compare mode), each a dict
``{"status": "running" | "done" | "stopped" | "failed", "result": GenerationResult, "error": str | None,
"run": int, "prompt_tokens": the prompt scored, once shown}``. While streaming, "result" is refreshed before
every redraw of the live text (pages/parts/generate_stream.py: redraws are timed, so the page keeps
the engine's pace), so a run interrupted by Stop (Streamlit aborts the script at its next call into
Streamlit, which is such a redraw) keeps what it had produced. The token view and its inspector are
pages/parts/generate_tokens.py.

The loaded model's sampler (:func:`core.generation.sampler.sampler_for`) picks the view: a
diffusion model gets its own controls and a step-by-step denoising view, from
pages/parts/generate_diffusion.py. Every control's default and range is read from
:class:`SamplingConfig` and :mod:`core.generation.config`.
"""
from __future__ import annotations

import json
from dataclasses import replace
from itertools import cycle

import streamlit as st

from core.errors import LabError
from core.generation.autoregressive import GenerationResult, encode_prompt, perplexity
from core.generation.config import DRAWN_SEEDS, MAX_TEMPERATURE, SamplingConfig
from core.generation.sampler import AUTOREGRESSIVE, sampler_for
from core.models.loading import LoadedModel
from pages.parts.common import current_model, ensure_frame
from pages.parts.generate_diffusion import diffusion_view
from pages.parts.interventions_generate import interventions_panel
from pages.parts.generate_stream import new_record, run_all, seeded
from pages.parts.generate_tokens import token_view

RESULTS_KEY = "gen_results"
RUN_KEY = "gen_run"
PROMPT_KEY = "gen_prompt"
COMPARE_KEY = "gen_compare"
SLOTS = ("A", "B")
DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
S = SamplingConfig  # every control's default is the config's


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


def generate_all(lm: LoadedModel, prompt: str, configs: dict[str, SamplingConfig], out_columns) -> None:
    """Check, then run every settings column (compare mode decodes both in one walk where it can)."""
    ss = st.session_state
    try:
        validate(lm, prompt, configs)
    except LabError as e:
        st.error(str(e))
        return
    results: dict = ss[RESULTS_KEY]
    results.clear()
    ss[RUN_KEY] = ss.get(RUN_KEY, 0) + 1
    configs = {slot: seeded(cfg) for slot, cfg in configs.items()}  # drawn here so a stopped run still reports it
    for slot, cfg in configs.items():
        results[slot] = new_record(lm, prompt, cfg, ss[RUN_KEY])
    run_all(lm, prompt, configs, results, dict(zip(configs, out_columns)))


# -- showing ---------------------------------------------------------------------------------------

def show_result(slot: str, lm: LoadedModel | None, record: dict | None, compare: bool) -> None:
    """One settings column's result: text, figures, the token view and its inspector, downloads."""
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
    # "max new tokens" is the longest value: side by side, half the page's width cuts it short in a
    # quarter (or a half) of a column, so there it gets a row of its own
    cols = [*st.columns(3), st.container()] if compare else st.columns([1, 0.8, 0.8, 1.4])
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
    token_view(slot, lm, result, record)
    downloads = st.container(horizontal=True)
    downloads.download_button("Download text", result.text, file_name=f"generation-{slot}.txt", mime="text/plain",
                       key=wkey(slot, "download_txt"), on_click="ignore")
    downloads.download_button("Download JSON", json.dumps(result.to_json(), indent=2, ensure_ascii=False),
                       file_name=f"generation-{slot}.json", mime="application/json",
                       key=wkey(slot, "download_json"), on_click="ignore")


def autoregressive_view(lm: LoadedModel | None, prompt: str) -> None:
    """Settings (one column, or A and B side by side), Generate / Stop, and the results."""
    results = st.session_state.setdefault(RESULTS_KEY, {})
    compare = st.toggle("Compare two settings side by side", key=COMPARE_KEY, persist_state="session",
                        help="Two columns of settings, A and B; Generate runs both on the same prompt, decoded together in "
                             "one batched walk (about the time of one) unless one uses beam search.")
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
            show_result(slot, lm, results.get(slot), compare)
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
