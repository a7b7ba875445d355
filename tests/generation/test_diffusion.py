"""Masked diffusion: the 1/t-weighted loss on hand-computed cases, the validation bound's scale,
and the sampler's invariants (prompt untouched, no mask left, every state kept)."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import LabError
from core.models.gpt import GPT, GPTConfig
from core.generation.diffusion import (DenoiseStep, DiffusionConfig, DiffusionFinished, DiffusionStarted, block_plan,
                                      denoise, filter_logits, gumbel_from_uniform, gumbel_max, render, stream,
                                      unmask_schedule)
from core.training.objective import T_MIN, diffusion_loss, sample_mask, sample_rates, sequence_bound, validation_rates

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
    for n, steps in [(10, 3), (64, 32), (7, 7), (1, 1)]:
        counts = unmask_schedule(n, steps)
        assert sum(counts) == n
        assert min(counts) >= 1
        assert len(counts) == steps


def test_unmask_schedule_with_more_steps_than_tokens_has_empty_steps():
    for n, steps in [(5, 20), (1, 3), (7, 8)]:
        counts = unmask_schedule(n, steps)
        assert len(counts) == steps and sum(counts) == n
        assert set(counts) <= {0, 1} and counts.count(0) == steps - n


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


# -- antithetic (stratified) rates -----------------------------------------------------------------

def _u(t: torch.Tensor) -> torch.Tensor:
    """The uniform behind a rate: t = 1 - u (1 - T_MIN)."""
    return (1.0 - t.double()) / (1.0 - T_MIN)


@pytest.mark.parametrize("B", [1, 2, 7, 64])
def test_antithetic_rates_put_one_draw_in_each_stratum(B):
    gen = torch.Generator().manual_seed(B)
    for _ in range(50):
        u = _u(sample_rates(B, generator=gen))
        assert sorted((u * B).floor().long().tolist()) == list(range(B))  # exactly one per [i/B, (i+1)/B)
        assert abs(float(u.mean()) - 0.5) <= 1 / (2 * B) + 1e-6            # the batch mean never strays far


def test_antithetic_rates_mean_is_one_half_and_each_rate_is_uniform():
    B, n = 8, 4000
    gen = torch.Generator().manual_seed(0)
    u = torch.stack([_u(sample_rates(B, generator=gen)) for _ in range(n)])   # (n, B)
    # E[mean u] = (sum_i (i + 1/2)) / B**2 = 1/2 exactly; the batch mean's sd is 1/sqrt(12 B**3)
    assert abs(float(u.mean()) - 0.5) < 4 / math.sqrt(12 * B ** 3 * n)
    # every slot of the batch is marginally uniform (the strata are shuffled): its mean is 1/2, its sd 1/sqrt(12)
    assert (u.mean(0) - 0.5).abs().max() < 4 / math.sqrt(12 * n)
    assert torch.allclose(u.var(0), torch.full((B,), 1 / 12, dtype=u.dtype), atol=0.01)
    plain = _u(sample_rates(B, generator=gen, antithetic=False))
    assert plain.shape == (B,) and ((plain >= 0) & (plain < 1)).all()


def test_antithetic_loss_is_unbiased_with_less_variance(bidir):
    torch.manual_seed(0)
    x0 = torch.randint(0, MASK, (8, 16))
    gen = torch.Generator().manual_seed(1)
    n = 300
    with torch.no_grad():
        anti = torch.tensor([float(diffusion_loss(bidir, x0, MASK, generator=gen)) for _ in range(n)])
        plain = torch.tensor([float(diffusion_loss(bidir, x0, MASK, generator=gen, antithetic=False))
                              for _ in range(n)])
    se = math.sqrt(float(anti.var()) / n + float(plain.var()) / n)
    assert abs(float(anti.mean() - plain.mean())) < 4 * se   # the same expected loss
    assert float(anti.var()) < 0.5 * float(plain.var())      # and at least halved variance


# -- semi-autoregressive blocks ----------------------------------------------------------------------

def test_block_plan_shares_steps_and_covers_the_generation():
    plan = block_plan(10, 7, 4)
    assert [(a, b) for a, b, _ in plan] == [(0, 4), (4, 8), (8, 10)]
    assert [len(c) for _, _, c in plan] == [3, 2, 2]
    assert [sum(c) for _, _, c in plan] == [4, 4, 2]
    assert block_plan(10, 7, 0) == block_plan(10, 7, 10) == block_plan(10, 7, 99) == [(0, 10, unmask_schedule(10, 7))]


def test_too_few_steps_for_the_blocks_is_refused():
    with pytest.raises(LabError, match="3 blocks of 4 tokens need at least one denoising step each"):
        DiffusionConfig(gen_length=10, steps=2, block_length=4).check()


@pytest.mark.parametrize("strategy,temperature", [("confidence", 0.0), ("random", 0.0), ("confidence", 1.0)])
def test_block_decoding_finishes_each_block_before_the_next(bidir, strategy, temperature):
    P, L, B = 3, 12, 4
    cfg = DiffusionConfig(gen_length=L, steps=6, strategy=strategy, temperature=temperature, block_length=B)
    steps = list(denoise(bidir, [1, 2, 3], MASK, cfg, seed=5))
    assert len(steps) == 6 and [len(s.revealed) for s in steps] == [2, 2] * 3
    for i, s in enumerate(steps):
        block = i // 2
        lo, hi = P + block * B, P + (block + 1) * B
        assert all(lo <= p < hi for p in s.revealed)                   # only the current block is revealed
        assert not any(s.masked[P:lo])                                  # earlier blocks are done
        assert all(s.masked[hi:])                                       # later ones untouched
    assert not any(steps[-1].masked)


@pytest.mark.parametrize("strategy,temperature", [("confidence", 0.0), ("random", 0.0), ("confidence", 0.8),
                                                  ("random", 1.5)])
def test_one_block_as_long_as_the_generation_is_plain_decoding(bidir, strategy, temperature):
    plain = DiffusionConfig(gen_length=10, steps=4, strategy=strategy, temperature=temperature, top_k=4)
    want = [(s.ids, s.revealed) for s in denoise(bidir, [1, 2], MASK, plain, seed=9)]
    for block in (10, 11, 64):
        cfg = DiffusionConfig(**{**plain.__dict__, "block_length": block})
        got = [(s.ids, s.revealed) for s in denoise(bidir, [1, 2], MASK, cfg, seed=9)]
        assert got == want


# -- float64 Gumbel-max sampling --------------------------------------------------------------------

CHI2_DF4_P001 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001


def test_float64_gumbel_max_draws_follow_the_categorical_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -4.0])
    p = logits.double().softmax(-1)
    n = 40_000
    draws = gumbel_max(logits.expand(n, 5), torch.Generator().manual_seed(0), "float64")
    counts = torch.bincount(draws, minlength=5).double()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < CHI2_DF4_P001
    assert counts[4] > 0  # the least likely token (p ~ 1.4e-3) is drawn


def _float32_win_probability(gap: float) -> tuple[float, float]:
    """The exact probability that float32 Gumbel-max picks a token ``gap`` nats below its only rival:
    every pair of float32 uniforms (a grid of 2**-24) enumerated, the noise computed by the sampler's
    own code. Also the share of it from pairs where the rival's uniform is above 0."""
    grid = torch.arange(2 ** 24, dtype=torch.float64).div(2 ** 24).float()   # what torch.rand(float32) can return
    g = gumbel_from_uniform(grid)                                              # ascending; -inf at u = 0
    rival = torch.tensor(0.0) + g                                              # logit 0 + noise, in float32
    low = torch.tensor(-gap) + g                                               # logit -gap + noise, in float32
    # argmax keeps the first index on ties: the unlikely token (second) wins only when strictly larger
    wins = (2 ** 24 - torch.searchsorted(low, rival, right=True)).double()     # per rival noise: winning draws
    return float(wins.sum()) / 2 ** 48, float(wins[1:].sum()) / 2 ** 48


def test_float32_gumbel_misdraws_unlikely_tokens():
    # the float32 noise tops out near 16.6 (float64's near 36.7): a token 20 nats down is never drawn
    # against a rival with u > 0, and one 17 nats down at under half its probability ...
    top32 = float(gumbel_from_uniform(torch.tensor(1 - 2 ** -24, dtype=torch.float32)))
    top64 = float(gumbel_from_uniform(torch.tensor(1 - 2 ** -53, dtype=torch.float64)))
    assert 16.6 < top32 < 16.7 and 36.7 < top64 < 36.8
    p17, p17_tail = _float32_win_probability(17.0)
    p20, p20_tail = _float32_win_probability(20.0)
    true17, true20 = 1 / (1 + math.exp(17.0)), 1 / (1 + math.exp(20.0))
    assert p20_tail == 0.0 and p17_tail < 0.5 * true17
    # ... while the rival's u = 0 (probability 2**-24: noise -inf) hands it a win it should almost never
    # have: either way the float32 probability is far from the model's
    assert p17 - p17_tail == p20 - p20_tail == pytest.approx(2 ** -24)
    assert abs(p17 / true17 - 1) > 0.5 and p20 / true20 > 20
    # where float32 is fine enough (a gap of 2 nats) it agrees with the distribution
    assert _float32_win_probability(2.0)[0] == pytest.approx(1 / (1 + math.exp(2.0)), rel=1e-4)


def test_gumbel_precision_changes_samples_but_not_greedy_ones(bidir):
    def run(**kw):
        return [s.ids for s in denoise(bidir, [1, 2], MASK, DiffusionConfig(gen_length=10, steps=5, **kw), seed=2)]
    assert run(temperature=1.0, gumbel_dtype="float64") != run(temperature=1.0, gumbel_dtype="float32")
    assert run(gumbel_dtype="float64") == run(gumbel_dtype="float32")  # temperature 0 draws nothing


# -- top-p and min-p ------------------------------------------------------------------------------

PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])


@pytest.mark.parametrize("top_p,min_p,kept", [
    (1.0, 0.0, [0, 1, 2, 3, 4]),
    (0.5, 0.0, [0]),            # the top token alone holds 0.5
    (0.6, 0.0, [0, 1]),
    (0.8, 0.0, [0, 1, 2]),      # 0.5 + 0.25 < 0.8: the third is needed
    (0.95, 0.0, [0, 1, 2, 3]),
    (1.0, 0.3, [0, 1, 2]),      # keep p >= 0.3 * 0.5 = 0.15
    (1.0, 0.31, [0, 1]),
    (1.0, 0.99, [0]),
    (0.95, 0.2, [0, 1, 2]),     # both: the smaller set
])
def test_top_p_and_min_p_keep_exactly_the_right_tokens(top_p, min_p, kept):
    out = filter_logits(PROBS.log(), 1.0, top_p=top_p, min_p=min_p)
    assert out.isfinite()[0].nonzero()[:, 0].tolist() == kept
    assert torch.allclose(out[0, kept], PROBS.log()[0, kept])


def test_sampling_under_a_tiny_top_p_or_a_high_min_p_is_top_1(bidir):
    def run(**kw):
        cfg = DiffusionConfig(gen_length=10, steps=5, temperature=1.0, strategy="random", **kw)
        return [s.ids for s in denoise(bidir, [1, 2], MASK, cfg, seed=4)]
    top1 = run(top_k=1)
    assert run(top_p=1e-6) == top1 and run(min_p=0.999) == top1 and run() != top1


# -- cached steps -------------------------------------------------------------------------------------

class Counting(torch.nn.Module):
    """A model that counts its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("strategy,temperature,block", [("confidence", 0.0, 0), ("random", 1.0, 0),
                                                        ("confidence", 0.7, 3)])
def test_cached_steps_give_the_same_samples_without_the_idle_forward_passes(bidir, strategy, temperature, block):
    L, steps = 6, 20
    runs = {}
    for cache in (True, False):
        model = Counting(bidir)
        cfg = DiffusionConfig(gen_length=L, steps=steps, strategy=strategy, temperature=temperature,
                              block_length=block, cache=cache)
        runs[cache] = ([(s.ids, s.revealed) for s in denoise(model, [1, 2], MASK, cfg, seed=7)], model.calls)
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == steps
    changed = sum(1 for _, revealed in runs[True][0] if revealed)
    assert changed == L and runs[True][1] == changed    # one forward pass per step that changed a token
    assert runs[False][1] == steps                       # uncached: one every step


def test_train_antithetic_flag_reaches_the_loss(tmp_path, monkeypatch):
    import argparse

    import core.training.trainer as trainer_mod
    from core.commands import train as train_cmd
    from core.training import TrainConfig, train
    from tests.conftest import CORPUS

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    assert TrainConfig().antithetic_t is True  # on by default: unbiased, with less variance
    assert train_cmd.config_from_args(parser.parse_args(["--objective", "diffusion"])).antithetic_t is True
    off = train_cmd.config_from_args(parser.parse_args(["--objective", "diffusion", "--no-antithetic-t"]))
    assert off.antithetic_t is False
    seen = []
    real = trainer_mod.diffusion_loss

    def recording(*a, **k):
        seen.append(k.get("antithetic"))
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", recording)
    text = tmp_path / "tiny.txt"
    text.write_text(CORPUS * 3)
    for flag in (True, False):
        seen.clear()
        cfg = TrainConfig(objective="diffusion", dataset=str(text), vocab_size=320, data_cache=str(tmp_path / "cache"),
                          n_layer=1, n_head=2, d_model=16, block_size=16, batch_size=4, device="cpu", max_steps=2,
                          log_every=1, val_every=0, val_batches=1, save_every=0, antithetic_t=flag)
        list(train(cfg, tmp_path / f"run-{flag}"))
        assert seen == [flag, flag]
