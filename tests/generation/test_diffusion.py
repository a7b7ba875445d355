"""Masked diffusion: the 1/t-weighted loss on hand-computed cases, the validation bound's scale,
and the sampler's invariants (prompt untouched, no mask left, every state kept)."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import LabError
from core.models.gpt import GPT, GPTConfig
from core.generation.diffusion import (DenoiseStep, DiffusionConfig, DiffusionFinished, DiffusionStarted, denoise,
                                      render, stream, unmask_schedule)
from core.training.objective import diffusion_loss, sample_mask, sequence_bound, validation_rates

MASK = 5
V = 6


def test_sequence_bound_matches_hand_computation():
    # Two sequences of T = 3; logits chosen so each CE has a closed form.
    logits = torch.zeros(2, 3, V)
    logits[0, 0, 2] = math.log(4.0)   # row 0 pos 0: p(target 2) = 4 / (4 + 4 others) over 5 allowed = 0.5
    logits[1, 2, 1] = 2.0
    x0 = torch.tensor([[2, 3, 4], [0, 1, 1]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    got = sequence_bound(logits, x0, mask, t, MASK)
    # the mask token's logit is removed, so 5 tokens remain
    ce00 = -math.log(4 / (4 + 4))                         # target 2 at pos 0
    ce02 = math.log(5)                                    # uniform over 5 at pos 2
    ce12 = -(2.0 - math.log(math.exp(2.0) + 4))           # target 1 with logit 2
    want = torch.tensor([(ce00 + ce02) / (0.5 * 3), ce12 / (0.25 * 3)])
    assert torch.allclose(got, want, atol=1e-6)


def test_diffusion_loss_is_mean_of_weighted_masked_ce():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=1, d_model=8, causal=False, mask_token_id=MASK))
    x0 = torch.randint(0, MASK, (3, 8))
    t = torch.tensor([1.0, 0.5, 0.2])
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) < t[:, None]
    loss = diffusion_loss(model, x0, MASK, t=t, mask=mask)
    logits = model(x0.masked_fill(mask, MASK)).clone()
    logits[..., MASK] = float("-inf")
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V), x0.view(-1), reduction="none").view(3, 8)
    want = ((ce * mask).sum(1) / (t * 8)).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    # t = 1 masks everything: the bound is the plain mean cross-entropy
    full = torch.ones(3, 8, dtype=torch.bool)
    assert torch.allclose(diffusion_loss(model, x0, MASK, t=torch.ones(3), mask=full),
                          torch.nn.functional.cross_entropy(
                              model(torch.full_like(x0, MASK)).index_fill(2, torch.tensor([MASK]), float("-inf"))
                              .view(-1, V), x0.view(-1)), atol=1e-6)


def test_sample_mask_rates_are_in_0_1_and_respected():
    x0 = torch.zeros(4000, 64, dtype=torch.long)
    t, mask = sample_mask(x0, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02
    # the realised mask share tracks t sequence by sequence
    assert (mask.float().mean(1) - t).abs().mean() < 0.06


def test_validation_bound_of_a_uniform_model_is_log_of_allowed_vocab():
    """A model with constant logits predicts uniformly over the V-1 real tokens: its NLL is
    log(V-1) per token, and the bound averaged over the midpoint t grid must say the same."""
    n, T = 400, 32
    rates = validation_rates(n)
    assert torch.allclose(rates[:2], torch.tensor([0.5 / n, 1.5 / n]))
    mask = torch.rand(n, T, generator=torch.Generator().manual_seed(0)) < rates[:, None]
    x0 = torch.randint(0, MASK, (n, T))
    bound = sequence_bound(torch.zeros(n, T, V), x0, mask, rates, MASK).mean().item()
    assert abs(bound - math.log(V - 1)) < 0.1 * math.log(V - 1)


def test_unmask_schedule_reveals_everything_at_least_one_per_step():
    for n, steps in [(10, 3), (64, 32), (7, 7), (5, 20), (1, 1)]:
        counts = unmask_schedule(n, steps)
        assert sum(counts) == n
        assert min(counts) >= 1
        assert len(counts) == min(n, steps)


@pytest.fixture(scope="module")
def bidir():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V + 10, block_size=32, n_layer=2, n_head=2, d_model=16, causal=False,
                         mask_token_id=MASK)).eval()


@pytest.mark.parametrize("strategy,temperature", [("confidence", 0.0), ("random", 0.0), ("confidence", 1.0)])
def test_sampler_keeps_prompt_and_leaves_no_mask(bidir, strategy, temperature):
    prompt = [1, MASK, 3, 7]  # a mask id inside the prompt is still prompt: it must never change
    cfg = DiffusionConfig(gen_length=12, steps=5, strategy=strategy, temperature=temperature, top_k=4)
    steps = list(denoise(bidir, prompt, MASK, cfg, seed=3))
    counts = unmask_schedule(12, 5)
    assert [len(s.revealed) for s in steps] == counts
    revealed = set()
    for s in steps:
        assert s.ids[:4] == prompt
        assert all(not m for m in s.masked[:4])
        assert all(p >= 4 for p in s.revealed) and not (set(s.revealed) & revealed)
        revealed |= set(s.revealed)
        assert sum(s.masked) == 12 - len(revealed)
        assert all(s.ids[i] == MASK for i in range(4, 16) if s.masked[i])
    assert not any(steps[-1].masked)
    assert all(tok != MASK for tok in steps[-1].ids[4:])
    again = list(denoise(bidir, prompt, MASK, cfg, seed=3))
    assert again[-1].ids == steps[-1].ids  # seeded: repeatable


def test_confidence_strategy_reveals_the_most_confident_position(bidir):
    prompt = [1, 2]
    cfg = DiffusionConfig(gen_length=6, steps=6)
    first = next(denoise(bidir, prompt, MASK, cfg))
    x = torch.tensor([prompt + [MASK] * 6])
    with torch.no_grad():
        logits = bidir(x)[0].float()
    logits[:, MASK] = float("-inf")
    conf = logits.softmax(-1).max(-1).values
    assert first.revealed == [2 + int(conf[2:].argmax())]


def test_stream_on_a_loaded_model_keeps_every_state(tiny_diffusion_dir):
    from core.models.loading import load_model

    lm = load_model(str(tiny_diffusion_dir))
    tok = lm.tokenizer
    assert lm.objective == "diffusion"
    events = list(stream(lm, "ROMEO:", DiffusionConfig(gen_length=8, steps=4, seed=1)))
    assert isinstance(events[0], DiffusionStarted) and isinstance(events[-1], DiffusionFinished)
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    res = events[-1].result
    assert len(res.states) == len(steps) + 1 == 5
    assert res.states[0][len(res.prompt_ids):] == [tok.mask_id] * 8
    assert all(s[:len(res.prompt_ids)] == res.prompt_ids for s in res.states)
    assert tok.mask_id not in res.completion_ids and len(res.completion_ids) == 8
    assert sorted(res.reveal_step) == sorted([1, 1, 2, 2, 3, 3, 4, 4])
    assert steps[0].text.count("[MASK]") == 6
    assert res.text == "ROMEO:" + tok.decode(res.completion_ids)
    assert render(tok, [tok.mask_id, *tok.encode("ab")], [True, False, False]) == "[MASK]ab"
    with pytest.raises(LabError, match="room for"):
        list(stream(lm, "ROMEO:", DiffusionConfig(gen_length=64)))  # the context is 64


def test_diffusion_training_run_gives_a_loadable_sampler_ready_model(tmp_path):
    from core.models.loading import load_model
    from core.training import StepLogged, TrainConfig, read_metrics, train
    from core.generation.diffusion import generate
    from tests.conftest import CORPUS

    text = tmp_path / "tiny.txt"
    text.write_text(CORPUS * 3)
    cfg = TrainConfig(objective="diffusion", dataset=str(text), vocab_size=320, data_cache=str(tmp_path / "cache"),
                      n_layer=2, n_head=2, d_model=32, block_size=32, batch_size=8, device="cpu", max_steps=40,
                      lr=1e-2, log_every=5, val_every=20, val_batches=4, save_every=0, preview_every=40,
                      preview_tokens=6)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        events = list(train(cfg, tmp_path / "run"))
    finally:
        torch.set_num_threads(n)
    losses = [e.metrics["train_loss"] for e in events if isinstance(e, StepLogged)]
    assert losses[-1] < losses[0] - 1.0
    vals = [m["val_loss"] for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert len(vals) == 2 and vals[1] < vals[0] < 2 * math.log(320)
    lm = load_model(str(tmp_path / "run" / "checkpoints" / "40"))
    assert lm.objective == "diffusion" and lm.model.config.causal is False
    assert lm.model.config.mask_token_id == lm.tokenizer.mask_id is not None
    res = generate(lm, "ROMEO:", DiffusionConfig(gen_length=8, steps=4, seed=0))
    assert len(res.completion_ids) == 8 and lm.tokenizer.mask_id not in res.completion_ids
    assert "[MASK]" not in (tmp_path / "run" / "previews.jsonl").read_text()
