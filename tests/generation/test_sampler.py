"""sampler_for: the one place that picks a model's sampler, and what every caller gets from it."""
from __future__ import annotations

import pytest
import torch

from core.errors import LabError
from core.generation import autoregressive as ar
from core.generation import diffusion as diff
from core.generation.config import DiffusionConfig, SamplingConfig, sampler_name
from core.generation.sampler import AUTOREGRESSIVE, DIFFUSION, sampler_for
from core.models.loading import load_model

PROMPT = "ROMEO: But soft"


@pytest.fixture(scope="module")
def ar_lm(tiny_gptlab_dir):
    return load_model(str(tiny_gptlab_dir))


def test_the_objective_picks_the_sampler(ar_lm, tiny_diffusion_lm):
    assert sampler_for(ar_lm) is AUTOREGRESSIVE and sampler_for(ar_lm).mask_id is None
    d = sampler_for(tiny_diffusion_lm)
    assert d.name == DIFFUSION.name and d.denoises and d.mask_id == tiny_diffusion_lm.tokenizer.mask_id
    assert (d.config_type, AUTOREGRESSIVE.config_type) == (DiffusionConfig, SamplingConfig)
    with pytest.raises(LabError, match="No sampler knows models trained with the objective 'telepathy'"):
        sampler_name("telepathy")
    with pytest.raises(LabError, match="is a diffusion model; sample it with core.generation.sampler.sampler_for"):
        next(ar.stream(tiny_diffusion_lm, PROMPT, SamplingConfig()))
    with pytest.raises(LabError, match="is an autoregressive model"):
        next(diff.stream(ar_lm, PROMPT, DiffusionConfig()))


def test_shared_settings_become_each_samplers_config(ar_lm, tiny_diffusion_lm):
    a = sampler_for(ar_lm).settings(7, greedy=True, seed=3, steps=99, n_alternatives=0)
    assert a == SamplingConfig(max_new_tokens=7, greedy=True, seed=3, n_alternatives=0)
    d = sampler_for(tiny_diffusion_lm).settings(7, greedy=True, temperature=0.9, seed=3, steps=5)
    assert d == DiffusionConfig(gen_length=7, steps=5, temperature=0.0, seed=3)
    assert sampler_for(tiny_diffusion_lm).settings(7, temperature=0.9).temperature == 0.9
    assert sampler_for(tiny_diffusion_lm).settings(7).steps == DiffusionConfig.steps  # None keeps the config's default
    with pytest.raises(LabError, match="at least 1"):
        sampler_for(ar_lm).settings(0)


@pytest.mark.parametrize("which", ["ar", "diffusion"])
def test_a_run_stopped_early_keeps_a_partial_result_the_finished_one_agrees(ar_lm, tiny_diffusion_lm, which):
    lm = ar_lm if which == "ar" else tiny_diffusion_lm
    sampler = sampler_for(lm)
    cfg = sampler.settings(6, greedy=True, seed=1, steps=6)
    run = sampler.start(lm, PROMPT, cfg)
    assert run.result is None if sampler.denoises else run.result.tokens == []
    for ev in run:
        if isinstance(ev, sampler.progress) and run.done == 2:
            break
    run.close()
    partial = run.result
    assert run.done == 2 and partial is not None
    full = sampler.generate(lm, PROMPT, cfg)
    if sampler.denoises:
        assert partial.states == full.states[:3] and "[MASK]" in partial.completion
    else:
        assert partial.stop_reason == "stopped" and [t.token_id for t in partial.tokens] == \
            [t.token_id for t in full.tokens[:2]]
    assert sampler.to_json(lm, partial, stopped=True)["prompt"] == PROMPT


@pytest.mark.parametrize("which", ["ar", "diffusion"])
def test_reads_says_which_position_predicted_each_token(ar_lm, tiny_diffusion_lm, which):
    lm = ar_lm if which == "ar" else tiny_diffusion_lm
    sampler = sampler_for(lm)
    result = sampler.generate(lm, PROMPT, sampler.settings(4, greedy=True, steps=4))
    prompt_ids, new = sampler.token_ids(lm, result)
    x, targets = sampler.reads(prompt_ids, new)
    P = len(prompt_ids)
    with torch.no_grad():
        logits = lm.model(torch.tensor([x]))[0]
    if sampler.denoises:
        assert x == result.states[0] and [p for p, _ in targets] == list(range(P, P + len(new)))
    else:
        assert x == (prompt_ids + new)[:-1]
        assert [int(logits[p].argmax()) for p, _ in targets] == new  # greedy: each position's top token
    assert [t for _, t in targets] == new
