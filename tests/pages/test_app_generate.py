"""The Generate page, driven through app.py (frame + sidebar) with AppTest: open_app() runs app.py
and switches to pages/generate.py, the same path a browser takes (see app_harness.py).

Outputs are compared with core.generation.autoregressive on the same model, so the page is checked to show
exactly what the engine produced, not merely that it ran.

At the end every control goes to its minimum and its maximum, the prompt goes in empty, blank, very
long (20,000 characters) and in odd Unicode, and Generate is pressed: the page shows no exception;
where the input is impossible it shows one st.error saying what to change, and the earlier result
stays. A diffusion model's controls get the same treatment (tiny models keep maxima cheap).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_harness import (LONG, ODD, TEXTS, chart_data, clean, code, limits, no_exception, one_error, open_app,
                         pick_model, set_widgets, shown, texts)

from core.generation.autoregressive import (SamplingConfig, TokenEvent, generate, partial_result, perplexity,
                                           score_continuation, stream, token_logprobs)
from core.models.loading import load_model
from pages.parts import generate_stream
from pages.parts.generate_tokens import logprob_colour, rank_colour, rank_of

PAGE = "pages/generate.py"
PROMPT = "ROMEO: But soft, what light"


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def html_bodies(at) -> list[str]:
    return [e.proto.body for e in at.get("html")]


CHART_TITLE = "Alternatives (the chosen token in red, on top)"


def strip_data(at, slot: str = "A") -> dict:
    """What the clickable token strip of ``slot`` was given to draw (its component's data)."""
    (strip,) = [e for e in at.get("bidi_component") if f"gen_{slot}_strip_" in e.proto.id]
    return json.loads(strip.proto.json)


def set_controls(at, slot: str = "A", **values) -> None:
    set_widgets(at, f"gen_{slot}_", **values)


def click_generate(at, prompt: str | None = PROMPT, button: str = "gen_go"):
    """Type the prompt (unless None) and press Generate (``gen_diff_go``: a diffusion model's)."""
    if prompt is not None:
        at.text_area(key="gen_prompt").input(prompt)
    at.button(key=button).click()
    return at.run()


def test_greedy_generation_output_token_view_alternatives_and_perplexity(default_lm):
    at = open_app(PAGE)
    assert not at.exception and not at.error
    set_controls(at, greedy=True, max_new_tokens=5)
    click_generate(at)
    assert not at.exception and not at.error
    expected = generate(default_lm, PROMPT, SamplingConfig(greedy=True, max_new_tokens=5))
    assert len(expected.tokens) == 5
    assert code(at) == shown(PROMPT + expected.completion)

    m = metrics(at)
    assert m["Prompt perplexity"] == f"{expected.prompt_perplexity:.2f}"
    # the full-text scorer and the prefill agree to float32 precision (the shown 2 decimals may round apart)
    assert float(m["Prompt perplexity"]) == pytest.approx(perplexity(default_lm, PROMPT), rel=1e-5, abs=0.005)
    assert m["New tokens"] == "5" and m["Stopped by"] == "max new tokens"
    assert any("greedy" in c for c in texts(at.caption))

    # token view: the prompt's tokens (the first unscored) then the generated ones, coloured by log p
    data = strip_data(at)
    ids = default_lm.tokenizer.encode(PROMPT)
    P = len(ids)
    assert [e["i"] for e in data["tokens"]] == [None] + list(range(1, P + 5))
    assert [e["prompt"] for e in data["tokens"]] == [True] * P + [False] * 5
    prompt_scored, _ = score_continuation(default_lm, ids[:1], ids[1:], 5)
    _, prompt_lps = token_logprobs(default_lm, PROMPT)  # the full-text scorer agrees
    assert [t.logprob for t in prompt_scored] == pytest.approx(prompt_lps, abs=1e-4)
    for entry, t in zip(data["tokens"][1:], prompt_scored + expected.tokens):
        assert entry["bg"] == logprob_colour(t.logprob)
        assert f"p = {t.prob:.4g}" in entry["tip"] and f"id {t.token_id}" in entry["tip"]
    assert data["tokens"][P]["t"] == expected.tokens[0].text.replace("\n", "↵\n")  # newlines drawn as ↵
    assert data["selected"] == P  # the first generated token is inspected until another is clicked
    assert any("on a log scale" in b for b in html_bodies(at))

    # a click on token 3 (what the strip's click handler stores): its alternatives, the chosen token first
    at.session_state["gen_A_inspect_1"] = P + 3
    at.run()
    assert strip_data(at)["selected"] == P + 3
    token = expected.tokens[3]
    table = at.dataframe[0].value
    assert table["chosen"].tolist() == [True] + [False] * (len(table) - 1)
    assert table["id"].iloc[0] == token.token_id and table["probability"].iloc[0] == pytest.approx(token.prob, abs=1e-9)
    others = [a for a in token.alternatives if a[0] != token.token_id]
    assert table["id"].tolist()[1:] == [a[0] for a in others]
    assert table["probability"].tolist()[1:] == pytest.approx([a[2] for a in others], abs=1e-9)
    rank = rank_of(token)
    assert table["rank"].iloc[0] == (str(rank) if rank else "> 5")
    chart = chart_data(at, CHART_TITLE)
    assert chart["id"].tolist() == table["id"].tolist()  # every row drawn, the chosen token's first
    assert chart["label"].iloc[0] == f"{json.dumps(token.text, ensure_ascii=False)} [{token.token_id}]"

    # a prompt token can be inspected too: its alternatives are what the model expected there
    at.session_state["gen_A_inspect_1"] = 2
    at.run()
    table = at.dataframe[0].value
    assert table["id"].iloc[0] == ids[2] and table["log p"].iloc[0] == pytest.approx(prompt_scored[1].logprob, abs=1e-9)
    assert any("prompt token (position 2)" in m for m in texts(at.markdown))

    assert [b.label for b in at.download_button] == ["Download text", "Download JSON"]


def test_results_and_controls_survive_reruns_and_page_switches(default_lm):
    at = open_app(PAGE)
    set_controls(at, greedy=True, max_new_tokens=4)
    click_generate(at)
    output = texts(at.code)
    assert len(output) == 1
    at.run()  # any rerun keeps the result
    assert texts(at.code) == output
    at.switch_page("pages/home.py").run()
    assert not at.code
    at.switch_page(PAGE).run()
    assert not at.exception
    assert texts(at.code) == output
    assert at.number_input(key="gen_A_max_new_tokens").value == 4
    assert at.toggle(key="gen_A_greedy").value is True
    assert at.text_area(key="gen_prompt").value == PROMPT


def test_compare_mode_generates_both_settings_in_one_batched_walk(default_lm, monkeypatch):
    walks = []
    batched = generate_stream.stream_many

    def counted(lm, prompt, cfgs):
        walks.append(len(cfgs))
        return batched(lm, prompt, cfgs)

    monkeypatch.setattr(generate_stream, "stream_many", counted)
    at = open_app(PAGE)
    at.toggle(key="gen_compare").set_value(True).run()
    set_controls(at, "A", greedy=True, max_new_tokens=4)
    set_controls(at, "B", max_new_tokens=6, seed=7, temperature=0.8, top_k=50)
    click_generate(at)
    assert not at.exception and not at.error
    assert walks == [2]  # both settings decoded together
    a = generate(default_lm, PROMPT, SamplingConfig(greedy=True, max_new_tokens=4))
    b = generate(default_lm, PROMPT, SamplingConfig(max_new_tokens=6, seed=7, temperature=0.8, top_k=50))
    assert code(at) == shown(PROMPT + a.completion, PROMPT + b.completion)
    assert [s.value for s in at.main.subheader] == ["Output A", "Output B"]
    for slot, want in (("A", a), ("B", b)):
        generated = [e for e in strip_data(at, slot)["tokens"] if not e["prompt"]]
        assert [e["bg"] for e in generated] == [logprob_colour(t.logprob) for t in want.tokens]
    assert any("seed 7" in c for c in texts(at.caption))
    # four figures per side in two rows of two, so none is cut short in half the page's width
    assert len(at.metric) == 8
    # beam search in one column cannot share the walk: the two run one after the other, same texts
    set_controls(at, "A", num_beams=2)
    at.run()
    click_generate(at)
    assert walks == [2] and not at.exception and not at.error
    a = generate(default_lm, PROMPT, SamplingConfig(num_beams=2, max_new_tokens=4))
    assert code(at) == shown(PROMPT + a.completion, PROMPT + b.completion)


def test_beam_search_disables_sampling_controls_and_matches_engine(default_lm):
    at = open_app(PAGE)
    set_controls(at, num_beams=3, max_new_tokens=4)
    at.run()
    assert at.number_input(key="gen_A_temperature").disabled
    assert at.slider(key="gen_A_top_p").disabled
    assert not at.number_input(key="gen_A_length_penalty").disabled
    click_generate(at)
    assert not at.exception and not at.error
    expected = generate(default_lm, PROMPT, SamplingConfig(num_beams=3, max_new_tokens=4))
    # st.code drops trailing newlines; the text before them must match exactly
    assert code(at) == shown(PROMPT + expected.completion)
    assert any("beam search, 3 beams" in c for c in texts(at.caption))


@pytest.mark.parametrize("prompt, controls, message", [
    ("", {}, "prompt is empty"),
    ("   \n ", {}, "prompt is empty"),
    (PROMPT, {"temperature": 0.0}, "temperature must be above 0"),
    (PROMPT, {"top_p": 0.0}, "top-p must be in (0, 1]"),
    (PROMPT, {"repetition_penalty": 0.0}, "repetition penalty must be above 0"),
    (PROMPT, {"max_new_tokens": 4000}, "ask for at most"),
])
def test_bad_input_shows_error_and_keeps_earlier_result(prompt, controls, message):
    at = open_app(PAGE)
    set_controls(at, greedy=True, max_new_tokens=3)
    click_generate(at)
    earlier = texts(at.code)
    assert len(earlier) == 1
    set_controls(at, greedy=False)
    at.run()  # sampling controls are enabled from the next run on, as in a browser
    set_controls(at, **controls)
    click_generate(at, prompt)
    assert not at.exception
    errors = texts(at.error)
    assert len(errors) == 1 and message in errors[0], errors
    assert texts(at.code) == earlier  # nothing already computed is lost


def test_prompt_longer_than_context_is_refused(tiny_gptlab_dir: Path):
    at = open_app(PAGE, state={"model_spec": str(tiny_gptlab_dir)})
    assert not at.error
    lm = load_model(str(tiny_gptlab_dir))
    long_prompt = "But soft, what light through yonder window breaks? " * 20
    n = len(lm.tokenizer.encode(long_prompt))
    assert n > 64
    set_controls(at, greedy=True, max_new_tokens=3)
    click_generate(at, long_prompt)
    assert not at.exception
    assert any(f"{n} prompt tokens · context 64" in c for c in texts(at.caption))
    errors = texts(at.error)
    assert len(errors) == 1 and f"The prompt is {n} tokens but the model's context is 64" in errors[0]
    assert not at.code


def test_interrupted_generation_keeps_its_tokens_as_stopped(default_lm):
    """Stop (or any widget touched mid-stream) makes Streamlit abort the run and rerun; the record
    left "running" in session state must come back as a stopped result with its tokens."""
    cfg = SamplingConfig(max_new_tokens=20, seed=3)
    events = stream(default_lm, PROMPT, cfg)
    tokens, completion = [], ""
    for event in events:
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            completion = event.completion
            if len(tokens) == 3:
                break
    events.close()
    partial = partial_result(default_lm, PROMPT, cfg, tokens, completion, 0.1)
    record = {"status": "running", "result": partial, "error": None, "run": 1}
    at = open_app(PAGE, state={"gen_results": {"A": record}, "gen_run": 1})
    at.button(key="gen_stop").click().run()
    assert not at.exception and not at.error
    assert at.session_state["gen_results"]["A"]["status"] == "stopped"
    assert any("Stopped after 3 token(s)" in w for w in texts(at.warning))
    assert code(at) == shown(PROMPT + completion)
    m = metrics(at)
    assert m["New tokens"] == "3" and m["Stopped by"] == "stopped"
    # filled in after the stop; the full-text scorer and the prefill agree to float32 precision, and the
    # metric shows 2 decimals (half a hundredth either way)
    assert float(m["Prompt perplexity"]) == pytest.approx(perplexity(default_lm, PROMPT), rel=1e-5, abs=0.005)
    assert any("seed 3" in c for c in texts(at.caption))
    assert not at.info  # a Stop click needs no explanation


@contextmanager
def stop_pressed_at_caption(ending: str, nth: int):
    """Press Stop as a server does it, when the page writes its ``nth`` caption ending in ``ending``
    (one per streamed token or denoising step): the script run's request becomes STOP, so that
    call and every later call into Streamlit raise, session-state access included."""
    from streamlit.delta_generator import DeltaGenerator
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    enqueue, seen = DeltaGenerator._enqueue, []

    def press_stop(self, delta_type, element_proto, *args, **kwargs):
        if delta_type == "markdown" and element_proto.body.endswith(ending):
            seen.append(element_proto.body)
            if len(seen) == nth:
                get_script_run_ctx().script_requests.request_stop()
        return enqueue(self, delta_type, element_proto, *args, **kwargs)

    DeltaGenerator._enqueue = press_stop
    try:
        yield
    finally:
        DeltaGenerator._enqueue = enqueue


def test_real_stop_mid_stream_keeps_the_tokens_and_answers_at_once(default_lm, monkeypatch):
    """After a real Stop the next run shows the stopped generation at once, as a new record (the
    cut-off thread may still write its own one once), perplexity filled in."""
    monkeypatch.setattr(generate_stream, "REDRAW_S", 0.0)  # a redraw per token: the stop lands after token 5
    at = open_app(PAGE)
    set_controls(at, max_new_tokens=200, seed=3)
    with stop_pressed_at_caption(" tokens…", 5):
        click_generate(at)
    cut = at.session_state["gen_results"]["A"]
    assert cut["status"] == "running" and len(cut["result"].tokens) == 5
    t0 = time.monotonic()
    at.button(key="gen_stop").click().run()
    assert time.monotonic() - t0 < 5
    assert not at.exception and not at.error
    kept = at.session_state["gen_results"]["A"]
    assert kept is not cut and kept["status"] == "stopped" and kept["result"].prompt_perplexity is not None
    assert any("Stopped after 5 token(s)" in w for w in texts(at.warning))
    want = generate(default_lm, PROMPT, SamplingConfig(max_new_tokens=5, seed=3))
    assert code(at) == shown(want.text)
    cut["result"] = None  # the cut-off thread writing its own record late changes nothing shown
    at.run()
    assert code(at) == shown(want.text) and not at.exception


def live_redraws(at_run) -> list[str]:
    """Run ``at_run()`` and return the live view's progress captions ("n / N tokens…"), one per redraw."""
    from streamlit.delta_generator import DeltaGenerator

    enqueue, seen = DeltaGenerator._enqueue, []

    def spy(self, delta_type, element_proto, *args, **kwargs):
        if delta_type == "markdown" and element_proto.body.endswith(" tokens…"):
            seen.append(element_proto.body)
        return enqueue(self, delta_type, element_proto, *args, **kwargs)

    DeltaGenerator._enqueue = spy
    try:
        at_run()
    finally:
        DeltaGenerator._enqueue = enqueue
    return seen


def test_live_view_is_redrawn_by_time_not_by_token(default_lm, monkeypatch):
    """Per token, each redraw cost the page more than the token itself; redraws are now at most one
    per REDRAW_S, and the result is the engine's all the same."""
    at = open_app(PAGE)
    set_controls(at, max_new_tokens=60, seed=11)
    monkeypatch.setattr(generate_stream, "REDRAW_S", 3600.0)
    drawn = live_redraws(lambda: click_generate(at))
    want = generate(default_lm, PROMPT, SamplingConfig(max_new_tokens=60, seed=11))
    # the first token, then nothing until the last one is in
    assert drawn == ["1 / 60 tokens…", f"{len(want.tokens)} / 60 tokens…"]
    assert code(at) == shown(want.text)
    monkeypatch.setattr(generate_stream, "REDRAW_S", 0.0)
    drawn = live_redraws(lambda: click_generate(at))
    assert drawn == [f"{i} / 60 tokens…" for i in range(1, len(want.tokens) + 1)]
    assert code(at) == shown(want.text)


def test_shipped_redraw_interval_is_between_50_and_100_ms():
    assert 0.05 <= generate_stream.REDRAW_S <= 0.1


@pytest.fixture(scope="module")
def diffusion_dir(tmp_path_factory) -> Path:
    """A tiny bidirectional GPT saved as a GPT Lab diffusion checkpoint (context 64)."""
    import torch

    from core.models.gpt import GPT, GPTConfig
    from core.models.loading import save_checkpoint
    from core.models.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tiny-diffusion")
    tok = train_bpe(["To be, or not to be, that is the question. ROMEO: But soft! " * 40], 300,
                    folder / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32, causal=False,
                          mask_token_id=tok.mask_id))
    save_checkpoint(folder, model, str(folder / "tokenizer.json"), objective="diffusion")
    return folder


def test_real_stop_mid_denoising_keeps_the_states(diffusion_dir: Path):
    at = open_app(PAGE, state={"model_spec": str(diffusion_dir)})
    assert not at.exception and not at.error
    set_widgets(at, "gen_diff_", gen_length=40, steps=40)
    at.text_area(key="gen_prompt").input("ROMEO:")
    with stop_pressed_at_caption("masks left…", 3):
        at.button(key="gen_diff_go").click().run()
    cut = at.session_state["gen_diff_result"]
    assert cut["status"] == "running"
    at.button(key="gen_diff_stop").click().run()
    assert not at.exception and not at.error
    kept = at.session_state["gen_diff_result"]
    assert kept is not cut and kept["status"] == "stopped"
    assert any(w.startswith("Stopped after 3 of 40 denoising steps") for w in texts(at.warning))


def test_unexpected_failure_is_one_line_not_a_traceback(monkeypatch):
    import core.generation.autoregressive as generation

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
        yield  # pragma: no cover

    at = open_app(PAGE)
    monkeypatch.setattr(generation, "stream", broken)
    at.run()  # the page re-imports core.generation.autoregressive's names on each run
    set_controls(at, greedy=True, max_new_tokens=3)
    click_generate(at)
    assert not at.exception
    assert texts(at.error) == ["Generation failed: boom"]


def test_stop_strings_one_per_line_cut_the_completion(default_lm):
    full = generate(default_lm, PROMPT, SamplingConfig(greedy=True, max_new_tokens=8))
    stop = full.completion[len(full.completion) // 2:][:3]
    assert stop.strip()
    expected = generate(default_lm, PROMPT, SamplingConfig(greedy=True, max_new_tokens=8, stop=[stop, "\n\n"]))
    assert expected.stop_reason == "stop_string" and stop not in expected.completion
    at = open_app(PAGE)
    set_controls(at, greedy=True, max_new_tokens=8, stop=f"{stop}\n\\n\\n\n")  # "\n" written out = newline
    click_generate(at)
    assert not at.exception and not at.error
    assert code(at) == shown(PROMPT + expected.completion)
    assert metrics(at)["Stopped by"] == "stop string"


def test_unloadable_model_disables_generate(tmp_path: Path):
    at = open_app(PAGE, state={"model_spec": str(tmp_path / "nothing-here")})
    assert not at.exception
    assert any("does not exist" in e for e in texts(at.main.error))
    assert at.button(key="gen_go").disabled


# -- every control at its extremes ------------------------------------------------------------------

GEN_BASE = dict(greedy=False, num_beams=1, max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, seed=1, n_alternatives=5, stop="")
GEN_CASES = [  # (control, value, error phrase or None for a run that must succeed)
    ("max_new_tokens", 1, None), ("max_new_tokens", 4096, "ask for at most"),
    ("temperature", 0.0, "temperature must be above 0"), ("temperature", 10.0, None),
    ("top_k", 0, None), ("top_k", 1_000_000, None),
    ("top_p", 0.0, "top-p must be in (0, 1]"), ("top_p", 1.0, None),
    ("min_p", 0.0, None), ("min_p", 1.0, "min-p must be in [0, 1)"),
    ("repetition_penalty", 0.0, "repetition penalty must be above 0"), ("repetition_penalty", 10.0, None),
    ("seed", 0, None), ("seed", 2**31 - 1, None),
    ("n_alternatives", 0, None), ("n_alternatives", 20, None),
    ("stop", " \n\t \n", None), ("stop", LONG, None), ("stop", ODD, None),
]
STOPS = {"": [], " \n\t \n": [" ", "\t "], LONG: [LONG], ODD: [ODD]}  # one stop string per non-empty line


def set_controls_in_order(at, slot: str = "A", **values) -> None:
    """Set controls in two passes, as a user must: greedy and beams first (they enable others)."""
    first = {k: values.pop(k) for k in ("greedy", "num_beams") if k in values}
    if first:
        set_controls(at, slot, **first)
        at.run()
    set_controls(at, slot, **values)


def test_generate_widget_limits_are_the_ones_tested():
    at = open_app(PAGE)
    found = {w.key: limits(w) for w in [*at.number_input, *at.slider] if w.key.startswith("gen_A_")}
    assert found == {"gen_A_max_new_tokens": (1, 4096), "gen_A_num_beams": (1, 16), "gen_A_temperature": (0.0, 10.0),
                     "gen_A_top_k": (0, 1_000_000), "gen_A_top_p": (0.0, 1.0), "gen_A_min_p": (0.0, 1.0),
                     "gen_A_repetition_penalty": (0.0, 10.0), "gen_A_seed": (0, 2**31 - 1),
                     "gen_A_length_penalty": (-5.0, 5.0), "gen_A_n_alternatives": (0, 20)}


def test_generate_every_control_at_min_and_max(default_lm):
    lm = default_lm
    prompt = "ROMEO:"
    at = open_app(PAGE)
    set_controls_in_order(at, **GEN_BASE)
    click_generate(at, prompt)
    clean(at)
    for control, value, error in GEN_CASES:
        before = texts(at.code)
        set_controls_in_order(at, **{**GEN_BASE, control: value})
        click_generate(at, prompt)
        if error:
            one_error(at, error)
            assert texts(at.code) == before, (control, value)  # the earlier result stays, nothing half-made
            continue
        clean(at)
        settings = {**GEN_BASE, control: value}
        expected = generate(lm, prompt, SamplingConfig(**{**settings, "stop": STOPS[settings["stop"]]}))
        assert code(at) == shown(prompt + expected.completion), (control, value)
        # the token inspector with no alternatives recorded, and with 20
        if control == "n_alternatives" and value == 0:
            assert not at.dataframe and "No alternatives were recorded (Alternatives was 0)." in texts(at.caption)
        if control == "n_alternatives" and value == 20:
            assert len(at.dataframe[0].value) >= 20


def test_generate_beams_at_max_with_both_length_penalty_extremes(default_lm):
    lm = default_lm
    prompt = "ROMEO:"
    at = open_app(PAGE)
    for penalty in (-5.0, 5.0):
        set_controls_in_order(at, num_beams=16, max_new_tokens=4, length_penalty=penalty)
        click_generate(at, prompt)
        clean(at)
        expected = generate(lm, prompt, SamplingConfig(num_beams=16, max_new_tokens=4, length_penalty=penalty))
        assert code(at) == shown(prompt + expected.completion)


@pytest.mark.parametrize("name", list(TEXTS))
def test_generate_prompt_extremes(default_lm, name):
    lm = default_lm
    at = open_app(PAGE)
    set_controls_in_order(at, greedy=True, max_new_tokens=2)
    click_generate(at, "ROMEO:")
    earlier = texts(at.code)
    click_generate(at, TEXTS[name])
    if name in ("empty", "blank"):
        one_error(at, "The prompt is empty; type some text to continue.")
        assert texts(at.code) == earlier
    elif name == "long":
        n = len(lm.tokenizer.encode(LONG))
        one_error(at, f"The prompt is {n} tokens but the model's context is 256", "shorten the prompt")
        assert texts(at.code) == earlier
        assert any(f"{n} prompt tokens · context 256 · room for 0 new tokens" in c for c in texts(at.caption))
    else:
        clean(at)
        expected = generate(lm, ODD, SamplingConfig(greedy=True, max_new_tokens=2))
        assert code(at) == shown(ODD + expected.completion)


def test_generate_all_maxima_at_once_on_a_tiny_model_and_in_compare_mode(tiny_gptlab_dir: Path):
    """Every control at its largest valid value at once (max new tokens = the room the context
    leaves), side by side with every control at its smallest valid value."""
    lm = load_model(str(tiny_gptlab_dir))
    prompt = "ROMEO:"
    room = lm.stack.context_length - len(lm.tokenizer.encode(prompt))
    high = dict(max_new_tokens=room, temperature=10.0, top_k=1_000_000, top_p=1.0, min_p=0.99,
                repetition_penalty=10.0, seed=2**31 - 1, n_alternatives=20)
    low = dict(max_new_tokens=1, temperature=0.05, top_k=1, top_p=0.01, min_p=0.0, repetition_penalty=0.05, seed=0,
               n_alternatives=0)
    at = open_app(PAGE)
    pick_model(at, tiny_gptlab_dir)
    at.toggle(key="gen_compare").set_value(True).run()
    set_controls_in_order(at, "A", **high)
    set_controls_in_order(at, "B", **low)
    click_generate(at, prompt)
    clean(at)
    a = generate(lm, prompt, SamplingConfig(**high))
    b = generate(lm, prompt, SamplingConfig(**low))
    assert code(at) == shown(prompt + a.completion, prompt + b.completion)
    # the inspector opens on the first and on the last token of each side
    for slot, result in (("A", a), ("B", b)):
        positions = [e["i"] for e in strip_data(at, slot)["tokens"] if e["i"] is not None]
        for position in (positions[0], positions[-1]):
            at.session_state[f"gen_{slot}_inspect_1"] = position
            at.run()
            no_exception(at)
    # one more than the room: refused, the two results stay
    set_controls_in_order(at, "A", max_new_tokens=room + 1)
    click_generate(at, prompt)
    one_error(at, f"ask for at most {room} new tokens")
    assert code(at) == shown(prompt + a.completion, prompt + b.completion)


# -- a diffusion model's controls at their extremes ------------------------------------------------

def test_diffusion_controls_at_min_and_max(tiny_diffusion_dir: Path):
    from core.generation import diffusion as diff

    lm = load_model(str(tiny_diffusion_dir))
    prompt = "ROMEO:"
    room = lm.stack.context_length - len(lm.tokenizer.encode(prompt))
    at = open_app(PAGE)
    pick_model(at, tiny_diffusion_dir)
    found = {w.key: limits(w) for w in at.number_input if w.key.startswith("gen_diff_")}
    assert found == {"gen_diff_gen_length": (1, 4096), "gen_diff_steps": (1, 4096), "gen_diff_temperature": (0.0, 10.0),
                     "gen_diff_top_k": (0, 1_000_000), "gen_diff_seed": (0, 2**31 - 1), "gen_diff_top_p": (0.01, 1.0),
                     "gen_diff_min_p": (0.0, 0.99), "gen_diff_block_length": (0, 4096)}
    cases = [
        dict(gen_length=1, steps=1, temperature=0.0, seed=0),                       # every minimum
        dict(gen_length=room, steps=4096, temperature=10.0, seed=2**31 - 1),        # every maximum that fits
        dict(gen_length=room, steps=1, unmask="random", temperature=0.0, seed=3),
    ]
    for case in cases:
        strategy = case.pop("unmask", "confidence")
        set_controls(at, "diff", unmask=strategy, **{k: v for k, v in case.items() if k != "top_k"})
        at.run()
        if case["temperature"] > 0:
            set_controls(at, "diff", top_k=1_000_000)
        click_generate(at, prompt, button="gen_diff_go")
        clean(at)
        cfg = diff.DiffusionConfig(gen_length=case["gen_length"], steps=case["steps"], strategy=strategy,
                                   temperature=case["temperature"], seed=case["seed"],
                                   top_k=1_000_000 if case["temperature"] > 0 else 0)
        expected = diff.generate(lm, prompt, cfg)
        assert code(at) == shown(expected.text)
        states = len(expected.states) - 1
        assert {m.label: m.value for m in at.metric}["Denoising steps"] == f"{states} / {expected.steps}"
        if states >= 1:  # the replay slider at both ends
            slider = next(s for s in at.slider if s.key.startswith("gen_diff_step_"))
            assert limits(slider) == (0, states)
            for state in (0, states):
                slider.set_value(state).run()
                no_exception(at)
                slider = next(s for s in at.slider if s.key.startswith("gen_diff_step_"))
    earlier = texts(at.code)
    set_controls(at, "diff", gen_length=4096)
    click_generate(at, prompt, button="gen_diff_go")
    one_error(at, f"ask for at most {room} tokens")
    assert texts(at.code) == earlier
    n_odd = len(lm.tokenizer.encode(ODD))
    for name, text in {**TEXTS, "short unicode": ODD[:12]}.items():
        set_controls(at, "diff", gen_length=2, steps=2, temperature=0.0)
        click_generate(at, text, button="gen_diff_go")
        if name in ("empty", "blank"):
            one_error(at, "The prompt is empty")
        elif name == "long" or (name == "unicode" and n_odd >= 64):
            one_error(at, "but the model's context is 64", "shorten the prompt")
        else:
            clean(at)
            assert code(at)[0].startswith(text)


# -- the token view's colours, and a diffusion model's view ------------------------------------------

def test_colour_by_rank_and_by_log_probability(default_lm):
    at = open_app(PAGE)
    set_controls(at, max_new_tokens=12, seed=4, n_alternatives=3)
    click_generate(at)
    want = generate(default_lm, PROMPT, SamplingConfig(max_new_tokens=12, seed=4, n_alternatives=3))
    generated = lambda: [e for e in strip_data(at)["tokens"] if not e["prompt"]]  # noqa: E731
    assert [e["bg"] for e in generated()] == [logprob_colour(t.logprob) for t in want.tokens]
    at.segmented_control(key="gen_A_colour_by").set_value("rank").run()
    no_exception(at)
    ranks = [rank_of(t) for t in want.tokens]
    assert [e["bg"] for e in generated()] == [rank_colour(r) for r in ranks]
    assert any(r is None for r in ranks) or any(r and r > 1 for r in ranks)  # sampled: not all first choices
    legend = next(b for b in html_bodies(at) if "Rank of each token" in b)
    assert "&gt; 3" in legend or "> 3" in legend  # tokens beyond the 3 recorded alternatives have their own colour


def test_log_probability_colours_spread_where_linear_probability_was_all_red():
    # p = 0.5, 0.05, 0.005, 0.0005: a linear scale gave hues 60, 6, 1, 0 (three reds); log p keeps them apart
    import math
    import re

    hues = [int(re.match(r"hsl\((\d+)", logprob_colour(math.log(p))).group(1)) for p in (0.5, 0.05, 0.005, 0.0005)]
    assert hues == sorted(hues, reverse=True) and min(b - a for a, b in zip(hues[1:], hues)) >= 20
    assert logprob_colour(0.0) == "hsl(120, 75%, 76%)" and logprob_colour(math.log(1e-6)) == "hsl(0, 75%, 76%)"


def test_diffusion_view_starts_on_ancestral_sampling_and_draws_newlines_as_marks(tiny_diffusion_dir: Path):
    from core.generation.config import PAGE_DIFFUSION_DEFAULTS
    from pages.parts.generate_diffusion import visible

    at = open_app(PAGE)
    pick_model(at, tiny_diffusion_dir)
    assert at.number_input(key="gen_diff_temperature").value == PAGE_DIFFUSION_DEFAULTS["temperature"] == 1.0
    assert at.selectbox(key="gen_diff_unmask").value == PAGE_DIFFUSION_DEFAULTS["strategy"] == "random"
    assert not at.number_input(key="gen_diff_top_k").disabled  # sampling: top-k applies
    assert visible("\n\n") == "↵↵" and visible("a\tb") == "a⇥b"
    set_widgets(at, "gen_diff_", gen_length=16, steps=4, seed=2)
    click_generate(at, "ROMEO:", button="gen_diff_go")
    clean(at)
    view = next(b for b in html_bodies(at) if "white-space:pre-wrap" in b)
    assert "\n" not in view.split("</span>", 1)[1]  # after the prompt: no line breaks, whatever was revealed
    assert any("random unmasking · temperature 1" in c for c in texts(at.caption))
