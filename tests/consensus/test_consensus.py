"""The consensus engine against a plain per-prompt loop written from the scripts' description."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.consensus.engine import (ConsensusConfig, Decoded, DecodeConfig, Finished, Progress, Started, TokenSampled,
                            consensus_decode, consensus_decode_stream, consensus_stream, estimate_bytes, memory_plan,
                            random_prompt_ids, recorded_steps, run_consensus)
from core.consensus.metrics import STAT_NAMES, token_stats
from core.consensus.text import readable_text, readable_tokens
from core.errors import LabError
from core.models.loading import load_model

PROMPTS = ["ROMEO: But soft, what light through yonder window breaks?",  # longer than the Neo window (8)
           "The quick brown fox",
           "Once upon a time there"]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def neo(tiny_neo_dir):
    return load_model(str(tiny_neo_dir))


# -- the reference: straight from the scripts, one prompt at a time -----------------------------------

def ref_stats(h: torch.Tensor) -> dict:
    """Every statistic of one prompt's tokens ``h`` (T, D) the slow, obvious way."""
    T = h.shape[0]
    cos0 = F.cosine_similarity(h[0:1], h, dim=-1)  # (T,)
    cos = F.cosine_similarity(h[:, None, :], h[None, :, :], dim=-1)  # (T, T)
    dot = h @ h.T
    off = ~torch.eye(T, dtype=torch.bool)
    s = torch.linalg.svdvals(h - h.mean(0, keepdim=True)).double()
    one_point = (s ** 2).sum() <= (8 * torch.finfo(torch.float32).eps) ** 2 * h.double().square().sum()
    return dict(metric=1 - cos0.abs().mean().item(), mean_cosine=cos[off].mean().item(),
                mean_dot=dot[off].mean().item(),
                effective_rank=1.0 if one_point else ((s ** 2).sum() ** 2 / (s ** 4).sum()).item(),
                centroid_distance=(h - h.mean(0)).norm(dim=-1).mean().item(), matrix=cos)


class ZeroMLP(nn.Module):
    def forward(self, x, **kwargs):
        return torch.zeros_like(x)


@torch.no_grad()
def reference_run(hf_model, ids_list, N, skip_mlp):
    """The GPT-Neo script's loop, per prompt: HF blocks called directly, the final norm after each pass."""
    model = copy.deepcopy(hf_model)
    if skip_mlp:  # as the script patched it: no second norm, a zero MLP
        for block in model.transformer.h:
            block.ln_2 = nn.Identity()
            block.mlp = ZeroMLP()
    out = []
    for ids in ids_list:
        x = torch.tensor([ids])
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(len(ids))[None])
        cols = [ref_stats(h[0])]
        for _ in range(N):
            for block in model.transformer.h:
                o = block(h)
                h = o[0] if isinstance(o, (tuple, list)) else o
                cols.append(ref_stats(h[0]))
            h = model.transformer.ln_f(h)
        out.append((cols, h[0]))
    return out


@pytest.mark.parametrize("fixture", ["gpt2", "neo"])
@pytest.mark.parametrize("skip_mlp", [False, True])
def test_engine_equals_reference_loop(fixture, skip_mlp, request):
    lm = request.getfixturevalue(fixture)
    N = 3
    res = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=N, skip_mlp=skip_mlp, matrix=True))
    L = lm.stack.n_layer
    assert res.metric.shape == (3, 1 + N * L) and res.complete
    assert list(res.steps) == list(range(N * L + 1))
    ref = reference_run(lm.model, res.token_ids, N, skip_mlp)
    for b, (cols, h_final) in enumerate(ref):
        T = len(res.token_ids[b])
        for name in ("metric", "mean_cosine"):
            want = np.array([c[name] for c in cols])
            assert np.abs(res.series(name)[b] - want).max() < 1e-5, name
        for name in ("mean_dot", "effective_rank", "centroid_distance"):
            want = np.array([c[name] for c in cols])
            np.testing.assert_allclose(res.series(name)[b], want, rtol=1e-4, atol=1e-5, err_msg=name)
        mats = torch.stack([c["matrix"] for c in cols], dim=-1).numpy()  # (T, T, 1+N*L)
        assert np.abs(res.matrix[b, :T, :T] - mats).max() < 1e-5
        assert np.isnan(res.matrix[b, T:]).all() and np.isnan(res.hidden[b, T:]).all()
        assert np.abs(res.hidden[b, :T] - h_final.numpy()).max() < 1e-5
    # the metric moves: the run did something
    assert not np.allclose(res.metric[:, 0], res.metric[:, -1])


def test_skip_mlp_changes_the_run(gpt2):
    a = run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=3))
    b = run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=3, skip_mlp=True))
    assert a.metric[0, 0] == b.metric[0, 0] and not np.allclose(a.metric[0, 1:], b.metric[0, 1:])


# -- the statistics themselves -------------------------------------------------------------------------

def test_token_stats_known_clouds():
    collapsed = torch.ones(1, 5, 8) * 3.0
    stats, cos = token_stats(collapsed, matrix=True)
    metric, mean_cos, mean_dot, er, cd = stats[0].tolist()
    assert metric == pytest.approx(0, abs=1e-6) and mean_cos == pytest.approx(1, abs=1e-6)
    assert mean_dot == pytest.approx(72, rel=1e-6) and er == 1 and cd == pytest.approx(0, abs=1e-6)
    assert torch.allclose(cos, torch.ones(1, 5, 5))
    eye = torch.eye(4)[None] * 2.0  # four orthogonal tokens of norm 2
    metric, mean_cos, mean_dot, er, cd = token_stats(eye)[0][0].tolist()
    assert metric == pytest.approx(0.75) and mean_cos == pytest.approx(0) and mean_dot == pytest.approx(0)
    assert er == pytest.approx(3.0, rel=1e-5)  # centred: 4 points spread evenly over 3 directions
    assert cd == pytest.approx(2 * np.sqrt(3) / 2, rel=1e-5)
    anti = torch.tensor([[[1.0, 0], [-1.0, 0], [2.0, 0]]])  # anti-parallel counts as aligned
    assert token_stats(anti)[0][0, 0].item() == pytest.approx(0, abs=1e-6)
    single = token_stats(torch.randn(2, 1, 8))[0]
    assert single[:, 0].abs().max() < 1e-6 and single[:, 1:3].isnan().all() and (single[:, 3] == 1).all()


def participation_ratio(h: torch.Tensor) -> float:
    """The effective rank without a noise floor (its definition before the floor), in float64."""
    s = torch.linalg.svdvals((h - h.mean(0, keepdim=True)).double())
    return ((s ** 2).sum() ** 2 / (s ** 4).sum()).item()


def test_effective_rank_of_a_collapsed_cloud_is_one_despite_float32_noise():
    """A cloud collapsed to one point, as a long run leaves it: every token the same vector of norm
    about 25 plus float32 rounding noise (relative spread 1.2e-7, what the shipped model shows after
    300 iterations). Without the floor its rank reads the noise's participation ratio (> 2)."""
    gen = torch.Generator().manual_seed(0)
    point = torch.randn(64, generator=gen) * 3.0
    noise = torch.randn(3, 12, 64, generator=gen) * (1.2e-7 * point.norm() / 8)  # per coordinate: |noise| = 1.2e-7 |h|
    cloud = (point + noise).float()  # (3, 12, 64)
    assert min(participation_ratio(c) for c in cloud) > 2  # what the unfloored definition read
    stats = token_stats(cloud)[0]
    assert stats[:, 3].tolist() == [1.0, 1.0, 1.0]
    assert (stats[:, 4] / cloud.norm(dim=-1).mean(-1) < 1e-6).all()  # the centroid distance still shows the spread
    # the same in bfloat16: its rounding (8 bits of mantissa) is the floor there
    bf = (point + torch.randn(2, 12, 64, generator=gen) * 1e-3).bfloat16()
    assert token_stats(bf)[0][:, 3].tolist() == [1.0, 1.0]
    # exactly coincident tokens (zero spread), zero vectors included
    assert token_stats(torch.zeros(1, 4, 8))[0][0, 3].item() == 1.0


def test_effective_rank_of_a_spread_cloud_is_unchanged_by_the_floor():
    gen = torch.Generator().manual_seed(1)
    cloud = torch.randn(4, 10, 32, generator=gen) * 5 + 2  # (4, 10, 32) well spread
    got = token_stats(cloud)[0][:, 3]
    # the unfloored formula, as token_stats computed it before the floor, bit for bit
    xc = cloud - cloud.mean(1, keepdim=True)
    gc = torch.bmm(xc, xc.transpose(1, 2))
    old = gc.diagonal(dim1=1, dim2=2).sum(-1).square() / gc.square().sum((1, 2))
    assert torch.equal(got, old)
    np.testing.assert_allclose(got.numpy(), [participation_ratio(c) for c in cloud], rtol=1e-5)
    # a cloud converging but still 100x above the floor: two directions, evenly spread, read 2
    base = torch.randn(64, generator=gen)
    base = base / base.norm() * 25
    e1, e2 = torch.eye(64)[0], torch.eye(64)[1]
    offsets = torch.stack([e1, -e1, e2, -e2]) * (25 * 1e-4)
    assert token_stats((base + offsets)[None])[0][0, 3].item() == pytest.approx(2.0, rel=1e-3)
    # either side of the floor (8 float32 epsilons of relative spread): 4 is one point, 64 is not
    eps = torch.finfo(torch.float32).eps
    for rel, one in ((4 * eps, True), (64 * eps, False)):
        h = (base.double() + offsets.double() / 1e-4 * rel)[None]  # exact in float64, then rounded
        er = token_stats(h)[0][0, 3].item()
        assert (er == 1.0) == one, (rel, er)


# -- recording, events, stopping ------------------------------------------------------------------------

def test_record_every_keeps_those_columns(gpt2):
    full = run_consensus(gpt2, PROMPTS, ConsensusConfig(iterations=3, matrix=True))
    sub = run_consensus(gpt2, PROMPTS, ConsensusConfig(iterations=3, matrix=True, record_every=4))
    assert list(sub.steps) == [0, 4, 8, 9] == list(recorded_steps(9, 4))
    for name in STAT_NAMES:
        np.testing.assert_array_equal(sub.series(name), full.series(name)[:, sub.steps])
    np.testing.assert_array_equal(sub.matrix, full.matrix[..., sub.steps])
    np.testing.assert_array_equal(sub.eplot, full.eplot[:, sub.steps[1:] - 1])


def test_events_stream_the_same_numbers(gpt2):
    cfg = ConsensusConfig(iterations=20, max_events=10, decode_iterations=(0, 19))
    events = list(consensus_stream(gpt2, PROMPTS, cfg))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    res = events[-1].result
    assert events[0].result is res  # the live result is the final one
    progress = [e for e in events if isinstance(e, Progress)]
    lengths = [len(t) for t in res.token_ids]
    groups = [[r for r, n in enumerate(lengths) if n == length] for length in dict.fromkeys(lengths)]
    assert events[0].info["groups"] == groups and len(groups) > 1  # unequal lengths ran as separate batches
    assert len(progress) <= cfg.max_events + 2 * len(groups)
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert progress[-1].step == progress[-1].total == 20 * gpt2.stack.n_layer * len(groups)
    rebuilt = np.full_like(res.metric, np.nan)
    for p in progress:
        cols = np.searchsorted(res.steps, p.chunk.steps)
        rebuilt[np.ix_(p.chunk.rows, cols)] = p.chunk.metric
    np.testing.assert_array_equal(rebuilt, res.metric)
    decoded = [e for e in events if isinstance(e, Decoded)]
    assert sorted({d.iteration for d in decoded}) == [0, 19]


def test_prompt_order_kept_across_length_groups(gpt2):
    both = run_consensus(gpt2, PROMPTS, ConsensusConfig(iterations=2))
    for b, p in enumerate(PROMPTS):
        alone = run_consensus(gpt2, [p], ConsensusConfig(iterations=2))
        np.testing.assert_allclose(both.metric[b], alone.metric[0], atol=1e-6)
        assert both.prompts[b] == p


def test_stopping_keeps_a_valid_partial_result(gpt2):
    before = gpt2.stack.logits(torch.tensor([[1, 2, 3]]))
    gen = consensus_stream(gpt2, PROMPTS[:1], ConsensusConfig(iterations=10, max_events=10, reinit="iteration"))
    res = next(gen).result
    next(gen), next(gen)  # two progress events
    gen.close()
    done = int(res.steps_done[0])
    assert 0 < done < res.total_steps and not res.complete
    cut = res.trimmed()
    assert cut.metric.shape == (1, res.columns_done) and not np.isnan(cut.metric).any()
    assert cut.steps[-1] <= done
    assert np.isnan(res.metric[0, res.columns_done:]).all()
    assert not np.isnan(res.hidden).any()
    # the run re-initialised the weights; stopping put the originals back
    assert torch.equal(gpt2.stack.logits(torch.tensor([[1, 2, 3]])), before)


def test_out_of_memory_becomes_a_lab_error_with_the_partial_result(gpt2, monkeypatch):
    import core.consensus.engine as cc

    real, calls = cc._block, []

    def flaky(lm, layer, h, skip_mlp):
        calls.append(layer)
        if len(calls) > 7:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, layer, h, skip_mlp)

    monkeypatch.setattr(cc, "_block", flaky)
    with pytest.raises(LabError, match="ran out of memory") as err:
        run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=5, max_events=100))
    res = err.value.result
    assert res.steps_done[0] == 7 and not np.isnan(res.metric[0, :8]).any() and np.isnan(res.metric[0, 8:]).all()


# -- re-initialisation -----------------------------------------------------------------------------------

@torch.no_grad()
def manual_reinit_run(lm, ids, N, mode, seed):
    """Our own straightforward loop over the stack with the documented seed sequences."""
    stack, L = lm.stack, lm.stack.n_layer
    stack.reinit(seed)
    h = stack.embed(torch.tensor([ids]))
    metric = [1 - F.cosine_similarity(h[0, :1], h[0], dim=-1).abs().mean().item()]
    s = 0
    for i in range(N):
        for layer in range(L):
            h = stack.block(layer, h)
            s += 1
            metric.append(1 - F.cosine_similarity(h[0, :1], h[0], dim=-1).abs().mean().item())
            if mode == "block" and s < N * L:
                stack.reinit(seed + s)
        h = stack.final_norm(h)
        if mode == "iteration" and i < N - 1:
            stack.reinit(seed + i + 1)
    return np.array(metric)


@pytest.mark.parametrize("mode", ["once", "iteration", "block"])
def test_reinit_seed_sequences(tiny_gpt2_dir, mode):
    lm = load_model(str(tiny_gpt2_dir))
    ids = lm.tokenizer.encode(PROMPTS[1])
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    a = run_consensus(lm, [PROMPTS[1]], ConsensusConfig(iterations=3, reinit=mode, seed=5))
    b = run_consensus(lm, [PROMPTS[1]], ConsensusConfig(iterations=3, reinit=mode, seed=5))
    c = run_consensus(lm, [PROMPTS[1]], ConsensusConfig(iterations=3, reinit=mode, seed=6))
    np.testing.assert_array_equal(a.metric, b.metric)
    assert not np.allclose(a.metric, c.metric)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # restored
    want = manual_reinit_run(lm, ids, 3, mode, 5)
    assert np.abs(a.metric[0] - want).max() < 1e-5


def test_fullrandom_differs_from_once(gpt2):
    once = run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=3, reinit="once"))
    full = run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=3, reinit="iteration"))
    L = gpt2.stack.n_layer
    np.testing.assert_array_equal(once.metric[:, :L + 1], full.metric[:, :L + 1])  # same first iteration
    assert not np.allclose(once.metric[:, L + 1:], full.metric[:, L + 1:])


# -- decoding -------------------------------------------------------------------------------------------

@torch.no_grad()
def test_logit_lens_decoding(gpt2):
    res = run_consensus(gpt2, PROMPTS[:2], ConsensusConfig(iterations=3, decode_iterations=(0, 2)))
    stack = gpt2.stack
    for b, p in enumerate(PROMPTS[:2]):
        h = stack.embed(torch.tensor([gpt2.tokenizer.encode(p)]))
        for i in range(3):
            for layer in range(stack.n_layer):
                h = stack.block(layer, h)
            h = stack.final_norm(h)
            if i in (0, 2):
                ids = stack.unembed(h)[0].argmax(-1).tolist()
                assert res.decodings[i][b] == gpt2.tokenizer.decode(ids)
                # per input position, aligned: the argmax token at position j, each read on its own
                assert res.lens_tokens[i][b] == [readable_text(gpt2.tokenizer, [t]) for t in ids]
                assert len(res.lens_tokens[i][b]) == len(gpt2.tokenizer.encode(p))
    assert set(res.decodings) == set(res.lens_tokens) == {0, 2}


# -- readable token text ---------------------------------------------------------------------------------

def byte_tokens(tok, wanted: bytes) -> list[int]:
    """Ids of single-byte tokens for ``wanted``'s bytes (a byte-level vocabulary has all 256)."""
    by_bytes = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    return [by_bytes[bytes([c])] for c in wanted]


@pytest.mark.parametrize("which", ["gptlab", "hf"])
def test_readable_text_decodes_the_sequence_and_escapes_stray_bytes(which, tiny_gptlab_dir, tiny_gpt2_dir):
    tok = load_model(str(tiny_gptlab_dir if which == "gptlab" else tiny_gpt2_dir)).tokenizer
    e_acute = byte_tokens(tok, "é".encode())  # two tokens, half a character each
    assert [tok.decode([t]) for t in e_acute] == ["\ufffd", "\ufffd"]  # piece by piece: nothing readable
    assert readable_text(tok, e_acute) == "é"  # the sequence: the character
    assert readable_tokens(tok, e_acute) == ["\\xc3", "\\xa9"]  # each half on its own: its byte, escaped
    stray = tok.encode("ab") + byte_tokens(tok, b"\x80") + tok.encode(" cd")
    assert readable_text(tok, stray) == "ab\\x80 cd"
    ordinary = tok.encode("To be, or not")
    assert readable_text(tok, ordinary) == tok.decode(ordinary) == "To be, or not"
    for i in range(tok.vocab_size):  # every token's bytes are what it decodes to, when that is text
        text = tok.decode([i])
        if "\ufffd" not in text:
            assert tok.token_bytes(i).decode() == text, i


def test_random_prompts_read_without_replacement_characters(gpt2):
    ids = random_prompt_ids(gpt2, 64, 16, seed=42)
    res = run_consensus(gpt2, ids, ConsensusConfig(iterations=1))
    assert not any("\ufffd" in p for p in res.prompts)
    assert res.prompts == [readable_text(gpt2.tokenizer, t) for t in ids]


def test_consensus_decoding_traces_and_seed(gpt2):
    cfg = ConsensusConfig(iterations=2)
    a = consensus_decode(gpt2, PROMPTS[1:], cfg, DecodeConfig(new_tokens=3))
    b = consensus_decode(gpt2, PROMPTS[1:], cfg, DecodeConfig(new_tokens=3))
    P = 1 + 2 * gpt2.stack.n_layer
    assert a.traces.shape == (2, 3, P) and a.complete and a.new_ids == b.new_ids
    c = consensus_decode(gpt2, PROMPTS[1:], cfg, DecodeConfig(new_tokens=3, seed=1))
    d = consensus_decode(gpt2, PROMPTS[1:], cfg, DecodeConfig(new_tokens=3, seed=2))
    assert c.new_ids != d.new_ids
    for row in range(2):
        ids = a.token_ids[row]
        assert a.texts[row] == gpt2.tokenizer.decode(ids + a.new_ids[row])
        for k in range(3):  # token k's trace is the consensus run over prompt + the first k new tokens
            run = run_consensus(gpt2, [ids + a.new_ids[row][:k]], cfg)
            assert np.abs(a.traces[row, k] - run.metric[0]).max() < 1e-5


@torch.no_grad()
def test_consensus_decoding_samples_from_the_final_state(gpt2):
    """A tiny top-p keeps only the top token: sampling becomes the argmax of the final state."""
    cfg = ConsensusConfig(iterations=2)
    res = consensus_decode(gpt2, [PROMPTS[1]], cfg, DecodeConfig(new_tokens=2, top_p=1e-6))
    ids = list(res.token_ids[0])
    stack = gpt2.stack
    for k in range(2):
        h = stack.embed(torch.tensor([ids]))
        for _ in range(2):
            for layer in range(stack.n_layer):
                h = stack.block(layer, h)
            h = stack.final_norm(h)
        nxt = stack.unembed(h[:, -1])[0, :gpt2.tokenizer.vocab_size].argmax().item()
        assert res.new_ids[0][k] == nxt
        ids.append(nxt)


def test_consensus_decoding_events(gpt2):
    events = list(consensus_decode_stream(gpt2, PROMPTS[1:], ConsensusConfig(iterations=2), DecodeConfig(new_tokens=2)))
    sampled = [e for e in events if isinstance(e, TokenSampled)]
    groups = events[0].info["groups"]
    assert [(s.index, s.rows) for s in sampled] == [(k, g) for g in groups for k in range(2)]
    assert {p.chunk.token for p in events if isinstance(p, Progress)} == {0, 1}


# -- random prompts -------------------------------------------------------------------------------------

def test_random_prompts_are_seeded(gpt2):
    a = random_prompt_ids(gpt2, 3, 7, seed=1)
    assert len(a) == 3 and all(len(p) == 7 for p in a)
    assert a == random_prompt_ids(gpt2, 3, 7, seed=1) != random_prompt_ids(gpt2, 3, 7, seed=2)
    assert all(0 <= i < gpt2.tokenizer.vocab_size for p in a for i in p)
    res = run_consensus(gpt2, a, ConsensusConfig(iterations=1))
    assert res.token_ids == a and res.metric.shape[0] == 3


# -- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts,cfg,match", [
    (["hi"], ConsensusConfig(iterations=0), "at least 1"),
    ([], ConsensusConfig(iterations=1), "No prompts"),
    (["hi", "  "], ConsensusConfig(iterations=1), "Prompt 2 is empty"),
    ([[]], ConsensusConfig(iterations=1), "Prompt 1 has no tokens"),
    ([[10 ** 6]], ConsensusConfig(iterations=1), "outside the model's vocabulary"),
    (["hi"], ConsensusConfig(iterations=2, decode_iterations=(2,)), r"outside 0\.\.1"),
    (["hi"], ConsensusConfig(iterations=2, reinit="sometimes"), "Unknown re-initialisation"),
    (["hi"], ConsensusConfig(iterations=2, record_every=0), "record every"),
])
def test_bad_inputs_raise_before_running(gpt2, prompts, cfg, match):
    with pytest.raises(LabError, match=match):
        consensus_stream(gpt2, prompts, cfg)  # raised by the call itself, before any event


def test_prompt_beyond_the_context_names_it(gpt2):
    long = "the quick brown fox " * 40
    assert len(gpt2.tokenizer.encode(long)) > gpt2.stack.context_length
    with pytest.raises(LabError, match=r"Prompt 2 .* beyond the model's context of 64"):
        consensus_stream(gpt2, ["hi", long], ConsensusConfig(iterations=1))
    n = len(gpt2.tokenizer.encode(PROMPTS[0]))
    with pytest.raises(LabError, match="new tokens"):
        consensus_decode_stream(gpt2, [PROMPTS[0]], ConsensusConfig(iterations=1), DecodeConfig(new_tokens=65 - n))


def test_memory_estimate_offers_a_record_every_that_fits(gpt2):
    lengths = [len(gpt2.tokenizer.encode(p)) for p in PROMPTS]
    ids = [gpt2.tokenizer.encode(p) for p in PROMPTS]
    cfg = ConsensusConfig(iterations=50, matrix=True)
    need = estimate_bytes(lengths, gpt2.stack.n_layer, gpt2.stack.d_model, cfg)
    T, P = max(lengths), 1 + 50 * gpt2.stack.n_layer
    assert need == 4 * (3 * P * 5 + 3 * T * gpt2.stack.d_model + 3 * T * T * P)
    plan = memory_plan(gpt2, ids, cfg, texts=PROMPTS)
    assert plan.recordings == need and plan.total > need  # the budget covers more than the recording
    cfg.memory_budget = need // 3
    with pytest.raises(LabError, match=r"--record-every (\d+)") as err:
        consensus_stream(gpt2, PROMPTS, cfg)
    import re
    k = int(re.search(r"--record-every (\d+)", str(err.value)).group(1))
    assert err.value.fix == {"record_every": k}
    cfg.record_every = k
    assert memory_plan(gpt2, ids, cfg, texts=PROMPTS).total <= cfg.memory_budget
    run_consensus(gpt2, PROMPTS, cfg)  # the offer runs
    cfg.record_every = k - 1
    assert memory_plan(gpt2, ids, cfg, texts=PROMPTS).total > cfg.memory_budget
    with pytest.raises(LabError, match="fewer or shorter prompts"):
        consensus_stream(gpt2, PROMPTS, ConsensusConfig(iterations=50, matrix=True, memory_budget=1000))


def test_decoding_refuses_consensus_only_options(gpt2):
    with pytest.raises(LabError, match="matrices"):
        consensus_decode_stream(gpt2, ["hi"], ConsensusConfig(iterations=1, matrix=True))
    with pytest.raises(LabError, match="top-p"):
        consensus_decode_stream(gpt2, ["hi"], ConsensusConfig(iterations=1), DecodeConfig(top_p=0))


# -- engines: the same numbers, scheduled differently -------------------------------------------------------

def assert_same_run(a, b, atol=1e-5):
    np.testing.assert_array_equal(a.steps, b.steps)
    for name in STAT_NAMES:
        np.testing.assert_allclose(a.series(name), b.series(name), rtol=1e-5, atol=atol, err_msg=name)
    if a.matrix is not None:
        np.testing.assert_allclose(a.matrix, b.matrix, atol=atol)
    np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-5, atol=atol)
    assert a.decodings == b.decodings
    np.testing.assert_array_equal(a.steps_done, b.steps_done)


@pytest.mark.parametrize("fixture", ["gpt2", "neo"])
@pytest.mark.parametrize("kw", [dict(matrix=True, decode_iterations=(0, 3)),
                                dict(record_every=5, reinit="iteration", max_events=3),
                                dict(skip_mlp=True, record_every=2, matrix=True, max_events=2)])
def test_iteration_engine_equals_block_engine(fixture, kw, request):
    lm = request.getfixturevalue(fixture)
    a = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=4, engine="block", **kw))
    b = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=4, engine="iteration", **kw))
    assert a.complete and b.complete
    assert_same_run(a, b)


def test_iteration_engine_decodes_the_same_tokens(gpt2):
    cfg = dict(iterations=3, record_every=2)
    a = consensus_decode(gpt2, PROMPTS[1:], ConsensusConfig(engine="block", **cfg), DecodeConfig(new_tokens=3))
    b = consensus_decode(gpt2, PROMPTS[1:], ConsensusConfig(engine="iteration", **cfg), DecodeConfig(new_tokens=3))
    assert a.new_ids == b.new_ids
    np.testing.assert_allclose(a.traces, b.traces, atol=1e-5)


def test_iteration_engine_stops_between_iterations(gpt2):
    gen = consensus_stream(gpt2, PROMPTS[:1], ConsensusConfig(iterations=10, max_events=10, engine="iteration"))
    res = next(gen).result
    next(gen), next(gen)
    gen.close()
    L = gpt2.stack.n_layer
    done = int(res.steps_done[0])
    assert 0 < done < res.total_steps and done % L == 0
    assert not np.isnan(res.trimmed().metric).any()


def test_graph_engine_needs_cuda(gpt2):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LabError, match="CUDA"):
        run_consensus(gpt2, PROMPTS[:1], ConsensusConfig(iterations=4, engine="graph"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir"])
def test_graph_engine_equals_block_engine_on_cuda(fixture, request):
    lm = load_model(str(request.getfixturevalue(fixture)), device="cuda")
    for kw in (dict(matrix=True, decode_iterations=(1, 5)), dict(record_every=3, reinit="iteration")):
        a = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=6, engine="block", **kw))
        b = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=6, engine="graph", **kw))
        assert_same_run(a, b, atol=1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and fall back to launches
        auto = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=6))  # auto: the graph engine
    assert_same_run(auto, run_consensus(lm, PROMPTS, ConsensusConfig(iterations=6, engine="block")), atol=1e-4)


def test_long_runs_still_report_at_least_once_a_second(gpt2, monkeypatch):
    """Stop only takes effect between events: with few events asked for and slow layer-steps,
    events still come by time, and the numbers they stream are the same."""
    import core.consensus.engine as consensus

    cfg = ConsensusConfig(iterations=6, max_events=1)
    quiet = [e for e in consensus_stream(gpt2, PROMPTS[:1], cfg) if isinstance(e, Progress)]
    monkeypatch.setattr(consensus._Clock.__init__, "__defaults__", (0.0,))  # every layer-step is "a second later"
    events = list(consensus_stream(gpt2, PROMPTS[:1], cfg))
    timed = [e for e in events if isinstance(e, Progress)]
    assert len(quiet) <= 2 and len(timed) >= 6 * gpt2.stack.n_layer // 2
    res = events[-1].result
    rebuilt = np.full_like(res.metric, np.nan)
    for p in timed:
        rebuilt[np.ix_(p.chunk.rows, np.searchsorted(res.steps, p.chunk.steps))] = p.chunk.metric
    np.testing.assert_array_equal(rebuilt, res.metric)
