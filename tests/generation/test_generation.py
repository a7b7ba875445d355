"""Generation: KV-cache decoding equals full recompute, our GPT equals transformers, seeds,
stop strings, beam search, log-probabilities and perplexity."""
import itertools
import math

import pytest
import torch

from core.models.convert import gpt_from_hf_gpt2
from core.errors import LabError
from core.generation.autoregressive import (Finished, SamplingConfig, TokenEvent, beam_bytes, generate, perplexity, stream,
                             token_logprobs)
from core.models.loading import LoadedModel, load_model
from core.models.stack import stack_for

PROMPT = "ROMEO: But soft, what light"


def _reference_greedy(lm, prompt, n):
    """Greedy decoding by full recompute of the whole sequence each step (no cache)."""
    ids = lm.tokenizer.encode(prompt)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.stack.logits(torch.tensor([ids + out]))[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(logits.log_softmax(-1)[tok]))
            out.append(tok)
    return out, lps


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"])
def test_kv_cache_decoding_equals_full_recompute(fixture, request):
    lm = load_model(str(request.getfixturevalue(fixture)))
    lm.tokenizer.eos_id = None  # random weights may emit EOS; we want all 20 steps
    res = generate(lm, PROMPT, SamplingConfig(max_new_tokens=20, greedy=True))
    ref_ids, ref_lps = _reference_greedy(lm, PROMPT, 20)
    assert [t.token_id for t in res.tokens] == ref_ids
    assert max(abs(t.logprob - r) for t, r in zip(res.tokens, ref_lps)) < 1e-4


def _ours_from_hf(path):
    hf = load_model(str(path))
    ours_model = gpt_from_hf_gpt2(hf.model)
    ours = LoadedModel(spec="ours", model=ours_model, tokenizer=hf.tokenizer, stack=stack_for(ours_model),
                       device="cpu", dtype=torch.float32, source=str(path))
    return hf, ours


def test_converted_gpt_matches_hf_logits_and_greedy(tiny_gpt2_dir):
    hf, ours = _ours_from_hf(tiny_gpt2_dir)
    ids = torch.tensor([hf.tokenizer.encode(PROMPT * 2)])
    with torch.no_grad():
        ref = hf.model(ids).logits
        mine = ours.model(ids)
    assert (mine - ref).abs().max().item() < 1e-4
    # greedy generation: ours (KV cache) vs transformers' generate on the same weights
    n = 25
    with torch.no_grad():
        hf_out = hf.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=hf.tokenizer.eos_id,
                                   eos_token_id=None)
    ours.tokenizer.eos_id = None
    res = generate(ours, PROMPT * 2, SamplingConfig(max_new_tokens=n, greedy=True))
    assert [t.token_id for t in res.tokens] == hf_out[0, ids.shape[1]:].tolist()


def test_same_seed_same_text_and_different_seed_differs(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    cfg = dict(max_new_tokens=30, temperature=1.5)
    a = generate(lm, PROMPT, SamplingConfig(seed=3, **cfg))
    b = generate(lm, PROMPT, SamplingConfig(seed=3, **cfg))
    c = generate(lm, PROMPT, SamplingConfig(seed=4, **cfg))
    assert a.completion == b.completion and a.settings["seed"] == 3
    assert [t.token_id for t in a.tokens] != [t.token_id for t in c.tokens]
    d = generate(lm, PROMPT, SamplingConfig(**cfg))
    e = generate(lm, PROMPT, SamplingConfig(seed=d.settings["seed"], **cfg))  # a drawn seed is reported
    assert d.completion == e.completion


def test_top_k_one_is_greedy(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    g = generate(lm, PROMPT, SamplingConfig(max_new_tokens=15, greedy=True))
    k = generate(lm, PROMPT, SamplingConfig(max_new_tokens=15, top_k=1, seed=9))
    assert [t.token_id for t in g.tokens] == [t.token_id for t in k.tokens]


def test_stream_events_and_alternatives(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    events = list(stream(lm, PROMPT, SamplingConfig(max_new_tokens=6, greedy=True, n_alternatives=5)))
    toks = [e for e in events if isinstance(e, TokenEvent)]
    assert len(toks) == 6 and isinstance(events[-1], Finished)
    res = events[-1].result
    assert toks[-1].completion == res.completion
    for t in res.tokens:
        alts = t.alternatives
        assert len(alts) == 5
        assert [p for _, _, p in alts] == sorted((p for _, _, p in alts), reverse=True)
        assert alts[0][0] == t.token_id  # greedy picks the most likely token
        assert math.isclose(t.prob, math.exp(t.logprob), rel_tol=1e-6)
    assert res.to_json()["tokens"][0]["alternatives"][0]["token_id"] == res.tokens[0].token_id


def test_closing_the_stream_stops_generation(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    gen = stream(lm, PROMPT, SamplingConfig(max_new_tokens=50, greedy=True))
    seen = list(itertools.islice((e for e in gen if isinstance(e, TokenEvent)), 3))
    gen.close()
    assert len(seen) == 3


def test_stop_string_cuts_completion(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    full = generate(lm, PROMPT, SamplingConfig(max_new_tokens=30, greedy=True))
    lm.tokenizer.eos_id = None
    stop = full.completion[5:8]
    assert stop
    res = generate(lm, PROMPT, SamplingConfig(max_new_tokens=30, greedy=True, stop=[stop]))
    assert res.stop_reason == "stop_string"
    assert res.completion == full.completion[:full.completion.find(stop)]


def test_eos_ends_generation(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    lm.tokenizer.eos_id = None
    toks = [t.token_id for t in generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, greedy=True)).tokens]
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    lm.tokenizer.eos_id = toks[k]  # pretend the first new token not seen before is EOS
    res = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, greedy=True))
    assert res.stop_reason == "eos" and [t.token_id for t in res.tokens] == toks[:k]


def test_beam_search_finds_best_sequence_exhaustively(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    lm.tokenizer.eos_id = None
    V = lm.stack.vocab_size
    ids = lm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        lp1 = lm.stack.logits(torch.tensor([ids]))[0, -1].log_softmax(-1)
        # best 2-token continuation over all V*V pairs
        seqs = torch.tensor([ids]).repeat(V, 1)
        lp2 = lm.stack.logits(torch.cat([seqs, torch.arange(V)[:, None]], 1))[:, -1].log_softmax(-1)
    total = lp1[:, None] + lp2
    best = divmod(int(total.argmax()), V)
    res = generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, num_beams=V, length_penalty=0.0))
    assert [t.token_id for t in res.tokens] == list(best)
    g = generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, num_beams=1, greedy=True))
    b1 = generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, num_beams=1, greedy=True))
    assert g.completion == b1.completion


def test_beam_count_beyond_memory_is_refused_before_allocating(tiny_gptlab_dir, monkeypatch):
    import core.devices as devices
    lm = load_model(str(tiny_gptlab_dir))
    s = lm.stack
    per_beam = 4 * s.n_layer * s.context_length * s.d_model * 4 + 6 * s.vocab_size * 4 + 2 * s.context_length * 8
    assert beam_bytes(lm, 3) == 3 * per_beam
    monkeypatch.setattr(devices, "free_bytes", lambda device: 10 * per_beam)
    ok = generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, num_beams=10))
    assert len(ok.tokens) == 2
    with pytest.raises(LabError, match="11 beams need about .* free on cpu; use fewer beams"):
        generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, num_beams=11))


def test_perplexity_matches_manual_and_sliding_window(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    text = "The quick brown fox jumps over the lazy dog."
    ids = lm.tokenizer.encode(text)
    with torch.no_grad():
        logp = lm.stack.logits(torch.tensor([ids]))[0].log_softmax(-1)
    nll = -sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids))) / (len(ids) - 1)
    assert math.isclose(perplexity(lm, text), math.exp(nll), rel_tol=1e-5)
    long_text = text * 40  # beyond the 64-token context: windows of 64, stride 32
    ids_long, lps = token_logprobs(lm, long_text)
    assert len(ids_long) > 64 and len(lps) == len(ids_long) - 1
    # the first window's scores equal a plain forward over it
    with torch.no_grad():
        logp = lm.stack.logits(torch.tensor([ids_long[:64]]))[0].log_softmax(-1)
    assert math.isclose(lps[10], float(logp[10, ids_long[11]]), rel_tol=1e-5)


def test_prompt_perplexity_reported(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    res = generate(lm, PROMPT, SamplingConfig(max_new_tokens=2, greedy=True))
    assert math.isclose(res.prompt_perplexity, perplexity(lm, PROMPT), rel_tol=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "max new tokens"),
    (dict(max_new_tokens=1000), "at most"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top-p"),
    (dict(top_p=0.0), "top-p"),
    (dict(min_p=1.0), "min-p"),
    (dict(top_k=-1), "top-k"),
    (dict(repetition_penalty=0.0), "repetition penalty"),
    (dict(num_beams=0), "beams"),
    (dict(stop=[""]), "stop strings"),
])
def test_impossible_settings_say_what_to_change(tiny_gptlab_dir, kwargs, words):
    lm = load_model(str(tiny_gptlab_dir))
    with pytest.raises(LabError, match=words):
        generate(lm, PROMPT, SamplingConfig(**kwargs))


def test_bad_prompts(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    with pytest.raises(LabError, match="empty"):
        generate(lm, "   ", SamplingConfig())
    with pytest.raises(LabError, match="context"):
        generate(lm, "word " * 200, SamplingConfig(max_new_tokens=1))


def test_mask_token_never_sampled_by_autoregressive_models(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    mask = lm.tokenizer.mask_id
    assert mask is not None
    unembed = lm.stack.unembed

    def mask_loving(h):  # make <|mask|> overwhelmingly likely under the raw model
        logits = unembed(h)
        logits[..., mask] += 100.0
        return logits

    lm.stack.unembed = mask_loving
    assert int(lm.stack.logits(torch.tensor([lm.tokenizer.encode(PROMPT)]))[0, -1].argmax()) == mask
    lm.tokenizer.eos_id = None
    for cfg in (SamplingConfig(max_new_tokens=8, greedy=True), SamplingConfig(max_new_tokens=8, seed=1),
                SamplingConfig(max_new_tokens=3, num_beams=3)):
        assert mask not in [t.token_id for t in generate(lm, PROMPT, cfg).tokens]
