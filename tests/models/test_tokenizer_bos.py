"""A Hugging Face model reads a prompt as transformers' own tokenizer encodes it, BOS included
(Llama, Mistral, Gemma and OPT start every text with one; GPT-2, GPT-NeoX and Qwen2 with none),
and every user of ``encode`` keeps its positions straight: generation equals transformers'
``generate`` on the same ids, completions never show the BOS, perplexity scores the first token
from BOS, transcoder windows start with it, a chat template's BOS is not doubled, and the shipped
default's ids do not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.generation import SamplingConfig, generate
from core.generation.autoregressive import Finished, encode_prompt, stream, token_logprobs
from core.models.loading import load_model
from core.models.tokenizer import load_tokenizer
from tests.families_kit import TOKENIZER_FAMILIES, family_dir_with_own_tokenizer, family_tokenizer

TEXTS = ["ROMEO: But soft, what light through yonder window breaks?", " leading space", "two\nlines\n",
         "naïve café — 東京", "Juliet is the sun.</s><s> and more"]
PROMPT = "ROMEO: But soft, what light through yonder window"
# what the hub repositories' tokenizers put before a text: the BOS settings these tests mirror
EXPECTED_PREFIX = {"llama": ["<s>"], "llama3": ["<|begin_of_text|>"], "mistral": ["<s>"], "gemma": ["<bos>"],
                   "opt": ["</s>"], "qwen2": [], "gpt_neox": [], "gpt2": []}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return family_dir_with_own_tokenizer(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(str(llama_dir))


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return AutoTokenizer.from_pretrained(llama_dir), LlamaForCausalLM.from_pretrained(llama_dir).eval()


@pytest.mark.parametrize("family", TOKENIZER_FAMILIES)
def test_encode_is_transformers_own_encoding(family, tmp_path):
    theirs = family_tokenizer(family, tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, (family, text)
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    assert theirs.convert_ids_to_tokens(list(ours.prefix_ids)) == EXPECTED_PREFIX[family]
    assert ours.suffix_ids == ()
    raw = ours.encode(PROMPT, add_special_tokens=False)
    assert ours.encode(PROMPT) == list(ours.prefix_ids) + raw
    assert ours.strip_prefix(ours.encode(PROMPT)) == raw


def test_the_shipped_default_encodes_as_before():
    """Our BPE has no BOS: ``encode`` is the tokenizer file's raw ids, whatever is asked."""
    from tokenizers import Tokenizer

    from core.models.loading import DEFAULT_DIR

    raw = Tokenizer.from_file(str(DEFAULT_DIR / "tokenizer.json"))
    tok = load_tokenizer(DEFAULT_DIR / "tokenizer.json")
    assert tok.prefix_ids == () and tok.suffix_ids == ()
    for text in TEXTS:
        expected = raw.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == tok.encode(text, add_special_tokens=False) == expected
    lm = load_model("default")
    assert encode_prompt(lm, PROMPT) == raw.encode(PROMPT, add_special_tokens=False).ids


def test_greedy_generation_equals_transformers_generate_with_bos(llama, hf_llama):
    tok, model = hf_llama
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert encode_prompt(llama, PROMPT) == ids[0].tolist()
    k = 12
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=tok.eos_token_id)
    theirs = out[0, ids.shape[1]:].tolist()
    res = generate(llama, PROMPT, SamplingConfig(max_new_tokens=k, greedy=True))
    ours = [t.token_id for t in res.tokens]
    assert ours and ours == theirs[:len(ours)]
    assert len(ours) == k or theirs[len(ours)] == tok.eos_token_id
    assert "<s>" not in res.completion and res.completion == llama.tokenizer.decode(ours)
    assert res.text.startswith(PROMPT)


def test_beam_search_reads_the_bos_too(llama, hf_llama):
    tok, model = hf_llama
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, early_stopping=True,
                             length_penalty=1.0, pad_token_id=tok.eos_token_id)
    theirs = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
    res = generate(llama, PROMPT, SamplingConfig(max_new_tokens=6, greedy=True, num_beams=3))
    assert [t.token_id for t in res.tokens] == theirs


def test_perplexity_scores_the_first_token_from_bos(llama, hf_llama):
    tok, model = hf_llama
    ids, lps = token_logprobs(llama, PROMPT)
    hf_ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids == hf_ids[0].tolist() and len(lps) == len(ids) - 1
    with torch.no_grad():
        logp = model(hf_ids).logits[0, :-1].float().log_softmax(-1)
    expected = logp.gather(1, hf_ids[0, 1:, None])[:, 0]
    assert torch.allclose(torch.tensor(lps), expected, atol=1e-4)
    ppl = generate(llama, PROMPT, SamplingConfig(max_new_tokens=1, greedy=True)).prompt_perplexity
    assert ppl == pytest.approx(float(torch.exp(-expected.mean())), rel=1e-4)


def test_generative_perplexity_scores_every_completion_token_of_a_bos_model(llama):
    from core.generation.evaluate import generative_perplexity

    completion = " what light through yonder"
    alone = generative_perplexity(llama, [completion])                  # no prompt: the first word is scored from BOS
    assert alone.n_tokens == len(llama.tokenizer.encode(completion, add_special_tokens=False))
    after = generative_perplexity(llama, [completion], "ROMEO: But soft,")
    ids, lps = token_logprobs(llama, "ROMEO: But soft," + completion)
    n_head = len(llama.tokenizer.encode("ROMEO: But soft,"))
    assert after.n_tokens == len(ids) - n_head
    assert after.mean_nll == pytest.approx(-sum(lps[n_head - 1:]) / after.n_tokens, rel=1e-6)


def test_raw_ids_stay_available(llama):
    raw = llama.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert encode_prompt(llama, PROMPT, add_special_tokens=False) == raw
    assert encode_prompt(llama, PROMPT) == [llama.tokenizer.prefix_ids[0]] + raw


def test_the_token_strip_marks_the_bos_and_scores_the_first_word_from_it(llama):
    from pages.parts.generate_tokens import tip, view_tokens

    res = generate(llama, PROMPT, SamplingConfig(max_new_tokens=3, greedy=True))
    shown = view_tokens(llama, res, {})
    raw = llama.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert shown[0].special and shown[0].text == "<s>" and shown[0].info is None
    assert "start token" in tip(shown[0])
    assert [s.token_id for s in shown[1:1 + len(raw)]] == raw and not any(s.special for s in shown[1:])
    assert shown[1].info is not None            # the first word is scored given BOS
    assert [s.token_id for s in shown[1 + len(raw):]] == [t.token_id for t in res.tokens]


def test_transcoder_windows_start_with_bos_like_saelens(llama, tiny_gpt2_dir):
    from core.interp import corpus_from_texts

    texts = [PROMPT * 3, "It is the east, and Juliet is the sun. " * 4]
    corpus = corpus_from_texts(llama, texts)
    raw = [i for t in texts for i in llama.tokenizer.encode(t, add_special_tokens=False) + [llama.tokenizer.eos_id]]
    w = corpus.windows("train", 16, 3)
    assert w.shape == (3, 16) and (w[:, 0] == llama.tokenizer.prefix_ids[0]).all()
    assert w[:, 1:].reshape(-1).tolist() == raw[:45]
    gpt2 = load_model(str(tiny_gpt2_dir))          # no BOS: the windows are the corpus' tokens, as before
    plain = corpus_from_texts(gpt2, texts)
    assert plain.windows("train", 16, 2).reshape(-1).tolist() == plain.train[:32].tolist()


def test_a_chat_template_that_writes_bos_does_not_get_a_second(llama_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from core.serve.chat import chat_prompt
    from tests.serve.helpers import client, serving

    folder = tmp_path / "chatty-llama"
    shutil.copytree(llama_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok.save_pretrained(folder)
    lm = load_model(str(folder))
    messages = [{"role": "user", "content": "Who is there?"}]
    text, stops = chat_prompt(lm, messages)
    assert text.startswith("<s>") and stops == []
    expected = tok(text, add_special_tokens=False).input_ids       # how apply_chat_template(tokenize=True) encodes
    assert expected[0] == tok.bos_token_id and expected[1] != tok.bos_token_id
    with serving(lm) as s:
        c = client(s.url)
        chat = c.chat.completions.create(model=lm.spec, messages=messages, max_tokens=4, temperature=0)
        done = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens == len(expected)
    raw_run = [e for e in stream(lm, text, SamplingConfig(max_new_tokens=4, greedy=True), add_special_tokens=False)
               if isinstance(e, Finished)][0].result
    assert chat.choices[0].message.content == raw_run.completion
    assert done.usage.prompt_tokens == len(tok(PROMPT).input_ids)
    with serving(lm) as s:
        echoed = client(s.url).completions.create(model=lm.spec, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs            # the BOS is not echoed; the first word is scored given it
    raw = tok(PROMPT, add_special_tokens=False).input_ids
    assert len(lp.tokens) == len(raw) and lp.tokens[0] != "<s>" and lp.token_logprobs[0] is not None
    _, lps = token_logprobs(lm, PROMPT)
    assert lp.token_logprobs == pytest.approx(lps, abs=1e-4)
    assert done.choices[0].text == generate(lm, PROMPT, SamplingConfig(max_new_tokens=4, greedy=True)).completion


def test_mean_ablation_means_leave_the_bos_out(llama):
    from core.interventions import prompt_means, run_with_cache

    ids = llama.tokenizer.encode(PROMPT)
    name = "blocks.1.hook_mlp_out"
    _, cache = run_with_cache(llama, [ids], [name])
    means = prompt_means(llama, [ids], [name])
    assert torch.allclose(means[name], cache[name][0, 1:].float().mean(0), atol=1e-6)
    raw = llama.tokenizer.encode(PROMPT, add_special_tokens=False)   # ids without a BOS: every position counts
    _, cache = run_with_cache(llama, [raw], [name])
    assert torch.allclose(prompt_means(llama, [raw], [name])[name], cache[name][0].float().mean(0), atol=1e-6)


def test_patching_sweeps_the_bos_position_too(llama):
    from core.interventions import patching_sweep
    from pages.patching import token_id

    clean = "Juliet is the sun"
    corrupted = llama.tokenizer.encode(clean)            # the same ids with the last word swapped
    corrupted[-1] = llama.tokenizer.encode(" east", add_special_tokens=False)[0]
    answer, wrong = token_id(llama, " and"), token_id(llama, " is")   # one token each: the BOS is not added
    assert [answer] == llama.tokenizer.encode(" and", add_special_tokens=False)
    result = patching_sweep(llama, clean, corrupted, point="resid_pre", answer=answer, wrong=wrong)
    n = len(corrupted)
    assert n == len(llama.tokenizer.encode(clean, add_special_tokens=False)) + 1
    assert result.logit_diff.shape == (llama.stack.n_layer, n) and result.tokens[0] == "<s>"
    # the BOS is the same in both prompts: patching it restores nothing, at every layer
    assert np.allclose(result.logit_diff[:, 0], result.corrupted_diff, atol=1e-4)
    assert np.allclose(result.restored[:, 0], 0.0, atol=1e-4)


def test_consensus_reads_the_bos_and_counts_it_as_token_zero(llama, hf_llama):
    """A typed prompt is walked as the model reads it, BOS first; the statistics take every position,
    so the metric's reference token h[0] is the BOS (the token a causal model's others follow).
    Token ids (random prompts, or ids a researcher passes) are walked as given."""
    from core.consensus.engine import ConsensusConfig, DecodeConfig, consensus_decode, run_consensus
    from core.consensus.metrics import token_stats

    tok, model = hf_llama
    cfg = ConsensusConfig(iterations=1)
    res = run_consensus(llama, [PROMPT], cfg)
    ids = tok(PROMPT).input_ids
    assert res.token_ids[0] == ids and res.prompts == [PROMPT]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    stats, _ = token_stats(hidden[1].float())                   # after block 0: column 1
    assert abs(res.metric[0, 1] - float(stats[0, 0])) < 1e-4
    assert abs(res.mean_cosine[0, 1] - float(stats[0, 1])) < 1e-4
    raw = llama.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert run_consensus(llama, [raw], cfg).token_ids[0] == raw   # the opt-out: ids are used as they are
    dec = consensus_decode(llama, [PROMPT], cfg, DecodeConfig(new_tokens=3))
    assert "<s>" not in dec.completions[0] and "<s>" not in dec.texts[0]
    assert dec.texts[0] == llama.tokenizer.decode(raw + dec.new_ids[0])


def test_transcoders_of_a_bos_model_say_so_in_saelens_layout(llama, tmp_path):
    from core.interp import TranscoderTrainConfig, corpus_from_texts, run_to_end, train_transcoders
    from core.interp.saelens import saelens_config
    from tests.conftest import CORPUS

    fast = dict(expansion=2, k=4, steps=4, batch_tokens=64, seq_len=16, model_batch=4, buffer_batches=2,
                val_windows=2, warmup_steps=1, layers=[1])
    corpus = corpus_from_texts(llama, [CORPUS, CORPUS.upper()])
    tset = run_to_end(train_transcoders(llama, TranscoderTrainConfig(**fast), corpus=corpus, out_dir=tmp_path / "t"))
    assert tset.training["prepend_bos"] is True and tset.training["seq_len"] == 16
    assert saelens_config(tset, 1).metadata["prepend_bos"] is True


def test_our_model_on_a_hub_tokenizer_file_reads_raw_ids_and_exports_so(tmp_path):
    """Our trainer trains on raw windows, so a checkpoint whose tokenizer.json came from a hub tokenizer
    with a BOS post-processor (Llama 3's) still reads raw ids, and its export tells transformers the same."""
    from transformers import AutoTokenizer

    from core.models.export import export_model
    from core.models.gpt import GPT, GPTConfig
    from core.models.loading import save_checkpoint

    hub = family_tokenizer("llama3", tmp_path / "hub")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", GPT(GPTConfig(vocab_size=len(hub), block_size=32, n_layer=1, n_head=2,
                                                     d_model=16)), str(tmp_path / "hub" / "tokenizer.json"))
    lm = load_model(str(tmp_path / "ckpt"))
    raw = hub(PROMPT, add_special_tokens=False).input_ids
    assert lm.tokenizer.prefix_ids == () and encode_prompt(lm, PROMPT) == raw
    export_model(str(tmp_path / "ckpt"), tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(PROMPT).input_ids == raw
