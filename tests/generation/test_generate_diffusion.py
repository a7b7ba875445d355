"""`python -m core generate` and the Generate page on a masked-diffusion checkpoint: the diffusion
sampler is picked from the checkpoint's objective, every denoising state is shown (--stream lines,
the page's live view and step slider) and kept (--json, downloads, Stop). Outputs are compared with
core.generation.diffusion on the same model, so both front ends are checked to show exactly what the
engine produced."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_harness import open_app, pick_model, set_widgets, texts

from core.commands.cli import main
from core.commands import generate as generate_cmd
from core.generation.autoregressive import SamplingConfig
from core.generation.autoregressive import generate as ar_generate
from core.models.loading import load_model
from core.generation import diffusion as diff
from core.generation.diffusion import (DenoiseStep, DiffusionConfig, DiffusionStarted, partial_result, render,
                                     result_json, state_masked, state_texts, unmask_schedule)

PAGE = "pages/generate.py"
PROMPT = "ROMEO:\nBut soft"
GLYPH = generate_cmd.MASK_GLYPH


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def no_mask_left(lm, result) -> None:
    assert len(result.completion_ids) == result.settings["gen_length"]
    assert lm.tokenizer.mask_id not in result.completion_ids
    assert "[MASK]" not in result.completion and "<|mask|>" not in result.completion


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_picks_the_diffusion_sampler_and_prints_its_result(capsys, tiny_diffusion_dir, tiny_diffusion_lm):
    expected = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=12, steps=4, seed=3))
    no_mask_left(tiny_diffusion_lm, expected)
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 12,
                           "--diffusion-steps", 4, "--seed", 3)
    assert rc == 0
    assert out == expected.text + "\n"
    assert out.startswith(PROMPT)  # the prompt is never touched
    assert "[12 tokens in 4 denoising steps" in err and "confidence unmasking, temperature 0; seed 3" in err
    assert "note:" not in err
    # --gen-length defaults to --max-new-tokens
    rc, out2, _ = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--max-new-tokens", 12,
                          "--diffusion-steps", 4, "--seed", 3)
    assert rc == 0 and out2 == out


def test_cli_same_seed_same_text_when_sampling(capsys, tiny_diffusion_dir, tiny_diffusion_lm):
    argv = ["generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 10, "--diffusion-steps", 5,
            "--unmask", "random", "--temperature", 1.0, "--top-k", 40]
    runs = [run_cli(capsys, *argv, "--seed", seed)[1] for seed in (5, 5, 6)]
    expected = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=10, steps=5, strategy="random",
                                                              temperature=1.0, top_k=40, seed=5))
    assert runs[0] == runs[1] == expected.text + "\n"
    assert runs[2] != runs[0]  # 10 tokens sampled from ~320 with another seed


def test_cli_stream_prints_every_denoising_state_on_its_own_line(capsys, tiny_diffusion_dir, tiny_diffusion_lm):
    L, steps = 12, 4
    result = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=L, steps=steps, seed=1))
    rc, out, _ = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", L,
                         "--diffusion-steps", steps, "--seed", 1, "--stream")
    assert rc == 0
    assert out.endswith("\n" + result.text + "\n")  # the plain result comes last
    lines = out[:-len(result.text) - 1].splitlines()
    assert len(lines) == steps == result.steps
    P = len(result.prompt_ids)
    shown_prompt = PROMPT.replace("\n", "↵")
    masks_left = L
    for k, (line, count) in enumerate(zip(lines, unmask_schedule(L, steps)), start=1):
        prefix = f"[{k}/{steps}] "
        assert line.startswith(prefix + shown_prompt)
        state = PROMPT + render(tiny_diffusion_lm.tokenizer, result.states[k][P:], state_masked(result, k), GLYPH)
        assert line == prefix + generate_cmd.one_line(state)
        masks_left -= count
        assert sum(state_masked(result, k)) == masks_left == state.count(GLYPH)
    assert GLYPH not in lines[-1] and masks_left == 0


def test_cli_json_holds_every_state(capsys, tmp_path, tiny_diffusion_dir, tiny_diffusion_lm):
    target = tmp_path / "out.json"
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 8,
                           "--diffusion-steps", 8, "--seed", 2, "--json", target)
    assert rc == 0 and f"wrote {target} (all 9 states)" in err
    saved = json.loads(target.read_text())
    expected = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=8, steps=8, seed=2))
    assert saved["text"] + "\n" == out and saved["completion_ids"] == expected.completion_ids
    assert saved["states"] == expected.states and len(saved["states"]) == 9
    P, mask = len(saved["prompt_ids"]), saved["mask_id"]
    assert all(s[:P] == saved["prompt_ids"] for s in saved["states"])
    assert [sum(t == mask for t in s[P:]) for s in saved["states"]] == list(range(8, -1, -1))  # one per step
    assert saved["state_texts"][0] == "[MASK]" * 8 and saved["state_texts"][-1] == saved["completion"]
    assert sorted(saved["reveal_step"]) == list(range(1, 9))
    assert saved["stopped"] is False
    assert saved["settings"]["seed"] == 2 and saved["settings"]["strategy"] == "confidence"


def test_cli_interrupt_writes_the_states_so_far(capsys, monkeypatch, tmp_path, tiny_diffusion_dir, tiny_diffusion_lm):
    full = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=12, steps=6, seed=4))
    real = diff.stream

    def interrupted_after_two_steps(lm, prompt, cfg):
        for ev in real(lm, prompt, cfg):
            yield ev
            if isinstance(ev, DenoiseStep) and ev.step == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(diff, "stream", interrupted_after_two_steps)
    target = tmp_path / "partial.json"
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 12,
                           "--diffusion-steps", 6, "--seed", 4, "--stream", "--json", target)
    assert rc == 130 and "wrote the 2 denoising steps done so far" in err
    assert len(out.splitlines()) == 2
    saved = json.loads(target.read_text())
    assert saved["stopped"] is True and saved["states"] == full.states[:3]
    assert saved["completion"].count("[MASK]") == 12 - 4 and saved["settings"]["seed"] == 4


def test_flags_the_other_sampler_has_no_use_for_are_noted_not_errors(capsys, tiny_diffusion_dir, tiny_diffusion_lm,
                                                                      tiny_gptlab_dir):
    base = ["generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 6, "--diffusion-steps", 3,
            "--seed", 0]
    _, plain, _ = run_cli(capsys, *base)
    rc, out, err = run_cli(capsys, *base, "--top-p", 0.5, "--num-beams", 2, "--stop", "x", "--top-k", 5,
                           "--gen-ppl-samples", 2)
    assert rc == 0 and out == plain
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert notes == [f"note: {tiny_diffusion_lm.name} is a diffusion model; its sampler ignores --num-beams, --stop, "
                     f"--top-k (it applies only with --temperature above 0), --top-p (it applies only with "
                     f"--temperature above 0), --gen-ppl-samples (it applies only with --gen-ppl)."]
    # temperature 0 is the diffusion default, and --greedy says the same
    rc, out, err = run_cli(capsys, *base, "--temperature", 0, "--greedy")
    assert rc == 0 and out == plain and "note:" not in err
    rc, out, err = run_cli(capsys, *base, "--temperature", 0.7, "--greedy")
    assert rc == 0 and out == plain and "ignores --temperature (--greedy means 0)." in err
    # the diffusion flags on an autoregressive model: noted, and the AR result is unchanged
    expected = ar_generate(load_model(str(tiny_gptlab_dir)), "ROMEO: But", SamplingConfig(max_new_tokens=5,
                                                                                             greedy=True))
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_gptlab_dir, "--prompt", "ROMEO: But", "--greedy",
                           "--max-new-tokens", 5, "--diffusion-steps", 3, "--unmask", "random", "--block-length", 2,
                           "--no-cache", "--gen-ppl")
    assert rc == 0 and out == expected.text + "\n"
    assert ("note: --diffusion-steps, --unmask, --block-length, --no-cache, --gen-ppl apply to diffusion models "
            "only") in err
    # ... and an AR-only mistake is still an error there, after the model is known
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_gptlab_dir, "--prompt", "ROMEO", "--temperature", 0)
    assert rc == 2 and out == "" and "temperature must be above 0" in err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--gen-length", "0"], "generation length must be at least 1"),
    (["--diffusion-steps", "0"], "steps must be at least 1"),
    (["--gen-length", "100"], "ask for at most"),
    (["--temperature", "-1"], "temperature must be 0"),
    (["--top-k", "-2"], "top-k must be 0"),
    (["--unmask", "left"], "invalid choice"),
    (["--block-length", "-1"], "--block-length"),
    (["--gen-length", "12", "--block-length", "2", "--diffusion-steps", "4"], "6 blocks of 2 tokens need at least"),
    (["--gumbel-dtype", "float16"], "invalid choice"),
    (["--temperature", "1", "--top-p", "0"], "--top-p"),
    (["--temperature", "1", "--min-p", "1"], "--min-p"),
    (["--gen-ppl", "--gen-ppl-samples", "0"], "--gen-ppl-samples"),
    (["--prompt", ""], "prompt is empty"),
])
def test_bad_diffusion_inputs_exit_2_with_one_line(capsys, tiny_diffusion_dir, argv, message):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ") and message in lines[-1], err


def test_cli_strategies_match_the_sampler():
    assert generate_cmd.STRATEGIES == diff.STRATEGIES


def test_partial_result_and_state_texts(tiny_diffusion_lm):
    cfg = DiffusionConfig(gen_length=9, steps=3, seed=7)
    events = list(diff.stream(tiny_diffusion_lm, PROMPT, cfg))
    started = events[0]
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    full = events[-1].result
    assert isinstance(started, DiffusionStarted)
    part = partial_result(tiny_diffusion_lm, PROMPT, cfg, started, steps[:1], 0.5)
    assert part.states == full.states[:2] and part.steps == 3 and part.seconds == 0.5
    assert part.reveal_step == [r if r == 1 else 0 for r in full.reveal_step]
    assert part.completion == steps[0].text and part.completion.count("[MASK]") == 6
    assert state_texts(tiny_diffusion_lm.tokenizer, full) == ["[MASK]" * 9] + [s.text for s in steps]
    whole = partial_result(tiny_diffusion_lm, PROMPT, cfg, started, steps, 1.0)
    assert whole.states == full.states and whole.completion == full.completion
    assert result_json(tiny_diffusion_lm.tokenizer, part, stopped=True)["stopped"] is True


# -- the Generate page ----------------------------------------------------------------------------

def open_diffusion_page(folder: Path):
    """The Generate page with the diffusion checkpoint picked in the sidebar (other…, then a path)."""
    at = open_app(PAGE)
    pick_model(at, folder)
    return at


def set_diffusion(at, **values) -> None:
    set_widgets(at, "gen_diff_", **values)


def click_generate(at, prompt: str | None = PROMPT):
    if prompt is not None:
        at.text_area(key="gen_prompt").input(prompt)
    at.button(key="gen_diff_go").click()
    return at.run()


def page_html(at) -> list[str]:
    return [e.proto.body for e in at.get("html")]


def state_view(at) -> str:
    return next(b for b in page_html(at) if "white-space:pre-wrap" in b)


def test_page_switches_to_diffusion_controls_denoises_and_replays(monkeypatch, tiny_diffusion_dir, tiny_diffusion_lm):
    import pages.parts.generate_diffusion as view

    at = open_diffusion_page(tiny_diffusion_dir)
    keys = {w.key for w in [*at.number_input, *at.selectbox, *at.toggle]}
    assert {"gen_diff_gen_length", "gen_diff_steps", "gen_diff_unmask", "gen_diff_temperature", "gen_diff_top_k",
            "gen_diff_seed"} <= keys
    assert not {"gen_A_greedy", "gen_A_max_new_tokens", "gen_compare"} & keys  # no autoregressive controls
    assert all(w.help for w in at.number_input if w.key.startswith("gen_diff_"))
    # the page starts on ancestral sampling (PAGE_DIFFUSION_DEFAULTS); this test follows the deterministic path
    assert (at.number_input(key="gen_diff_temperature").value, at.selectbox(key="gen_diff_unmask").value) == (1.0, "random")
    set_diffusion(at, temperature=0.0, unmask="confidence")
    at.run()
    assert at.number_input(key="gen_diff_top_k").disabled  # temperature 0: top-k has no effect

    live_states: list[int] = []
    real_html = view.state_html

    def recording(lm, result, state):
        live_states.append(state)
        return real_html(lm, result, state)

    monkeypatch.setattr(view, "state_html", recording)
    set_diffusion(at, gen_length=12, steps=4, seed=3)
    click_generate(at)
    assert not at.exception and not at.error
    assert live_states == [1, 2, 3, 4, 4]  # one live frame per step, then the replay view at the end

    expected = diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(gen_length=12, steps=4, seed=3))
    assert texts(at.code) == [expected.text]
    assert "[MASK]" not in texts(at.code)[0]
    m = {x.label: x.value for x in at.metric}
    assert m == {"New tokens": "12", "Denoising steps": "4 / 4", "Masks left": "0",
                 "Seconds": m["Seconds"]}
    assert any("confidence unmasking" in c and "seed 3" in c for c in texts(at.caption))

    slider = at.slider(key="gen_diff_step_1")
    assert (slider.min, slider.max, slider.value) == (0, 4, 4)
    final = state_view(at)
    assert final.count('class="mask"') == 0 and final.count('class="new"') == 3  # 12 over 4 steps
    assert final.count('class="old"') == 9
    for s, left in [(0, 12), (1, 9), (2, 6)]:
        slider.set_value(s).run()
        view_html = state_view(at)
        assert view_html.count('class="mask"') == left
        assert view_html.count('class="new"') == (0 if s == 0 else 3)
        caption = f"State {s} of 4: {0 if s == 0 else 3} tokens revealed at this step, {left} masks left"
        assert caption in texts(at.caption)
        assert not at.exception
    assert [b.label for b in at.download_button] == ["Download text", "Download JSON"]


@pytest.mark.parametrize("prompt, controls, message", [
    ("", {}, "prompt is empty"),
    (PROMPT, {"gen_length": 100}, "ask for at most"),
])
def test_page_bad_input_shows_error_and_keeps_the_earlier_result(tiny_diffusion_dir, prompt, controls, message):
    at = open_diffusion_page(tiny_diffusion_dir)
    set_diffusion(at, gen_length=6, steps=3, seed=0)
    click_generate(at)
    earlier = texts(at.code)
    assert len(earlier) == 1
    set_diffusion(at, **controls)
    click_generate(at, prompt)
    assert not at.exception
    errors = texts(at.error)
    assert len(errors) == 1 and message in errors[0], errors
    assert texts(at.code) == earlier


def test_page_stop_keeps_the_states_so_far(tiny_diffusion_dir, tiny_diffusion_lm):
    cfg = DiffusionConfig(gen_length=12, steps=4, seed=5)
    events = diff.stream(tiny_diffusion_lm, PROMPT, cfg)
    started = next(events)
    steps = [next(events), next(events)]
    events.close()
    partial = partial_result(tiny_diffusion_lm, PROMPT, cfg, started, steps, 0.1)
    record = {"status": "running", "result": partial, "error": None, "run": 1}
    at = open_app(PAGE, state={"model_spec": str(tiny_diffusion_dir), "gen_diff_result": record, "gen_diff_run": 1})
    at.button(key="gen_diff_stop").click().run()
    assert not at.exception and not at.error
    assert at.session_state["gen_diff_result"]["status"] == "stopped"
    assert any("Stopped after 2 of 4 denoising steps" in w for w in texts(at.warning))
    assert texts(at.code) == [partial.text] and partial.text.count("[MASK]") == 6
    slider = at.slider(key="gen_diff_step_1")
    assert (slider.min, slider.max, slider.value) == (0, 2, 2)
    assert state_view(at).count('class="mask"') == 6
    assert {x.label: x.value for x in at.metric}["Masks left"] == "6"
    assert not at.info


def test_page_failure_is_one_line_and_autoregressive_mode_comes_back(monkeypatch, tiny_diffusion_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
        yield  # pragma: no cover

    at = open_diffusion_page(tiny_diffusion_dir)
    monkeypatch.setattr(diff, "stream", broken)
    set_diffusion(at, gen_length=6, steps=3)
    click_generate(at)
    assert not at.exception
    assert texts(at.error) == ["Generation failed: boom"]
    monkeypatch.undo()
    at.sidebar.selectbox(key="model_choice").set_value("default").run()
    assert not at.exception and not at.error
    assert at.toggle(key="gen_A_greedy") is not None and at.button(key="gen_go") is not None
    assert not [w for w in at.number_input if w.key.startswith("gen_diff_")]


@pytest.mark.parametrize("flags, settings", [
    (["--block-length", 4], dict(block_length=4)),
    (["--temperature", 1.0, "--top-p", 0.6, "--unmask", "random"], dict(temperature=1.0, top_p=0.6, strategy="random")),
    (["--temperature", 1.0, "--min-p", 0.2], dict(temperature=1.0, min_p=0.2)),
    (["--temperature", 1.0, "--gumbel-dtype", "float32"], dict(temperature=1.0, gumbel_dtype="float32")),
    (["--no-cache", "--diffusion-steps", 20], dict(cache=False, steps=20)),
])
def test_cli_new_diffusion_options_reach_the_sampler(capsys, tiny_diffusion_dir, tiny_diffusion_lm, flags, settings):
    cfg = DiffusionConfig(**{**dict(gen_length=12, steps=6, seed=3), **settings})
    expected = diff.generate(tiny_diffusion_lm, PROMPT, cfg)
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 12,
                           "--diffusion-steps", 6, "--seed", 3, *flags)
    assert rc == 0 and out == expected.text + "\n" and "note:" not in err
    for key, value in settings.items():
        assert expected.settings[key] == value


def test_cli_more_steps_than_tokens_reports_every_step(capsys, tiny_diffusion_dir, tiny_diffusion_lm):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 4,
                           "--diffusion-steps", 10, "--seed", 1, "--stream")
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert rc == 0 and len(lines) == 10 and "[4 tokens in 10 denoising steps" in err
    states = [ln.split("] ", 1)[1] for ln in lines]
    assert sum(1 for a, b in zip(states, states[1:]) if a == b) == 6  # six steps change nothing


# -- generative perplexity --------------------------------------------------------------------------

def _by_hand(scorer, prompt: str, completion: str) -> tuple[float, int]:
    """Sum of NLL (nats) of the completion's tokens under ``scorer``, and their count, from its logits."""
    import torch

    ids = scorer.tokenizer.encode(prompt + completion)
    P = len(scorer.tokenizer.encode(prompt))
    assert ids[:P] == scorer.tokenizer.encode(prompt)
    with torch.no_grad():
        logits = scorer.model(torch.tensor([ids]))[0].double()
    logp = logits.log_softmax(-1)
    nll = -sum(float(logp[i - 1, ids[i]]) for i in range(P, len(ids)))
    return nll, len(ids) - P


def test_generative_perplexity_is_exp_mean_nll_by_hand(tiny_gptlab_dir):
    import math

    from core.generation.evaluate import generative_perplexity

    scorer = load_model(str(tiny_gptlab_dir))
    prompt, completions = "ROMEO: ", ["But soft, what light", "Thou art more lovely and more temperate"]
    parts = [_by_hand(scorer, prompt, c) for c in completions]
    got = generative_perplexity(scorer, completions, prompt)
    nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert got.n_tokens == n and got.n_samples == 2 and got.scorer == scorer.name
    assert got.mean_nll == pytest.approx(nll / n, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got.per_sample == pytest.approx([math.exp(a / b) for a, b in parts], rel=1e-5)
    # with no prompt, every token after the first is scored
    alone = generative_perplexity(scorer, completions[:1])
    ids = scorer.tokenizer.encode(completions[0])
    first, _ = _by_hand(scorer, scorer.tokenizer.decode(ids[:1]), scorer.tokenizer.decode(ids[1:]))
    assert alone.n_tokens == len(ids) - 1 and alone.mean_nll == pytest.approx(first / (len(ids) - 1), rel=1e-5)


def test_generative_perplexity_needs_an_autoregressive_scorer(tiny_diffusion_lm):
    from core.errors import LabError
    from core.generation.evaluate import generative_perplexity

    with pytest.raises(LabError, match="needs an autoregressive scorer"):
        generative_perplexity(tiny_diffusion_lm, ["hello"])


def test_cli_gen_ppl_scores_the_samples_under_the_named_model(capsys, tmp_path, tiny_diffusion_dir, tiny_diffusion_lm,
                                                                tiny_gptlab_dir):
    from core.generation.evaluate import generative_perplexity

    scorer = load_model(str(tiny_gptlab_dir))
    cfg = DiffusionConfig(gen_length=10, steps=5, temperature=1.0, seed=11)
    samples = [diff.generate(tiny_diffusion_lm, PROMPT, DiffusionConfig(**{**cfg.__dict__, "seed": s}))
               for s in (11, 12, 13)]
    want = generative_perplexity(scorer, [r.completion for r in samples], PROMPT)
    target = tmp_path / "out.json"
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 10,
                           "--diffusion-steps", 5, "--temperature", 1.0, "--seed", 11, "--gen-ppl", tiny_gptlab_dir,
                           "--gen-ppl-samples", 3, "--json", target)
    assert rc == 0 and out == samples[0].text + "\n"
    assert (f"[generative perplexity {want.perplexity:.2f} under {scorer.name}: mean NLL {want.mean_nll:.4f} nats "
            f"over {want.n_tokens} tokens of 3 samples]") in err
    saved = json.loads(target.read_text())
    assert saved["samples"] == [r.completion for r in samples]
    assert saved["generative_perplexity"]["perplexity"] == pytest.approx(want.perplexity)
    # a diffusion model cannot score
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_diffusion_dir, "--prompt", PROMPT, "--gen-length", 4,
                           "--gen-ppl", tiny_diffusion_dir)
    assert rc == 2 and "needs an autoregressive scorer" in err.splitlines()[-1]


# -- the page's new diffusion controls ---------------------------------------------------------------

def test_page_block_top_p_min_p_precision_and_cache_controls_reach_the_sampler(tiny_diffusion_dir, tiny_diffusion_lm):
    import pages.parts.generate_diffusion as view

    at = open_diffusion_page(tiny_diffusion_dir)
    for key in ("top_p", "min_p", "block_length"):
        assert at.number_input(key=f"gen_diff_{key}").help
    # at temperature 0 nothing is drawn: the sampling filters and the precision are greyed out
    set_diffusion(at, temperature=0.0, unmask="confidence")
    at.run()
    assert at.number_input(key="gen_diff_top_p").disabled and at.number_input(key="gen_diff_min_p").disabled
    assert at.selectbox(key="gen_diff_gumbel_dtype").disabled
    assert at.selectbox(key="gen_diff_gumbel_dtype").value == DiffusionConfig.gumbel_dtype == "float64"
    assert at.toggle(key="gen_diff_cache").value is DiffusionConfig.cache is True
    assert at.number_input(key="gen_diff_block_length").value == DiffusionConfig.block_length == 0
    set_diffusion(at, temperature=0.9)
    at.run()
    assert not at.number_input(key="gen_diff_top_p").disabled and not at.selectbox(key="gen_diff_gumbel_dtype").disabled
    set_diffusion(at, gen_length=12, steps=6, seed=8, top_p=0.8, min_p=0.05, block_length=4, gumbel_dtype="float32",
                  cache=False)
    click_generate(at)
    assert not at.exception and not at.error
    cfg = DiffusionConfig(gen_length=12, steps=6, seed=8, temperature=0.9, top_p=0.8, min_p=0.05, block_length=4,
                          gumbel_dtype="float32", cache=False)
    expected = diff.generate(tiny_diffusion_lm, PROMPT, cfg)
    assert texts(at.code) == [expected.text]
    caption = next(c for c in texts(at.caption) if "unmasking" in c)
    assert caption == (f"Model {tiny_diffusion_lm.name} · confidence unmasking in blocks of 4 · temperature 0.9, "
                       f"top-p 0.8, min-p 0.05, float32 draws · seed 8")
    assert view.settings_text(expected.settings) in caption
    # too few steps for the blocks: one error, nothing run
    set_diffusion(at, steps=2)
    click_generate(at)
    assert [e.value for e in at.error] and "need at least one denoising step each" in at.error[0].value
    assert texts(at.code) == [expected.text]
