"""Every decoder family walked by the layer-stack adapter reproduces transformers' own model:
logits, greedy generations, cached decoding, named activations, consensus statistics,
re-initialisation and the simulation's Q/K/V, on a tiny random model of each family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import LabError, ModelNotAvailableError
from core.models.loading import load_model
from tests.families_kit import FAMILIES, build, family_dir

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east"
PARALLEL = {"gpt_neox", "gptj"}
POST_NORM = {"opt_350m"}


@pytest.fixture(scope="module")
def family_lms(tmp_path_factory):
    made: dict = {}

    def get(family):
        if family not in made:
            made[family] = load_model(str(family_dir(tmp_path_factory, family)))
        return made[family]
    return get


def _ids(lm, text=PROMPT):
    return torch.tensor([lm.tokenizer.encode(text)])


@pytest.mark.parametrize("family", FAMILIES)
def test_walk_equals_transformers_forward(family, family_lms):
    lm = family_lms(family)
    ids = _ids(lm)
    assert ids.shape[1] > 2 * 8   # longer than every sliding window of the tiny models
    with torch.no_grad():
        ref = lm.model(ids).logits
    ours = lm.stack.logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    assert lm.family == lm.model.config.model_type


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_generate(family, family_lms):
    from core.generation.autoregressive import generate
    from core.generation.config import SamplingConfig

    lm = family_lms(family)
    prompt = "ROMEO: But soft"
    ids = _ids(lm, prompt)
    res = generate(lm, prompt, SamplingConfig(greedy=True, max_new_tokens=20, seed=0))
    ours = [t.token_id for t in res.tokens]
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_id)
    theirs = out[0, ids.shape[1]:].tolist()
    if lm.tokenizer.eos_id in theirs:
        theirs = theirs[:theirs.index(lm.tokenizer.eos_id)]
    assert len(ours) >= 10 and ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_recompute(family, family_lms):
    lm = family_lms(family)
    ids = _ids(lm)[:, :30]
    full = lm.stack.logits(ids)
    cache = lm.stack.new_cache()
    first = lm.stack.logits(ids[:, :5], cache=cache)
    steps = [lm.stack.logits(ids[:, t:t + 1], cache=cache) for t in range(5, 30)]
    assert (torch.cat([first] + steps, dim=1) - full).abs().max().item() < 1e-5
    # the cache holds the model's own kv heads, not copies per query head
    assert cache.k[0].shape[1] == lm.stack.n_kv_head == getattr(lm.model.config, "num_key_value_heads", None) or \
        lm.stack.n_head


@pytest.mark.parametrize("family", ["llama", "gemma2", "gptj"])
def test_beam_search_runs_on_the_kv_heads_and_one_beam_is_greedy(family, family_lms):
    from core.generation.autoregressive import generate
    from core.generation.config import SamplingConfig

    lm = family_lms(family)
    greedy = generate(lm, "ROMEO:", SamplingConfig(greedy=True, max_new_tokens=8, seed=0))
    one = generate(lm, "ROMEO:", SamplingConfig(num_beams=1, greedy=True, max_new_tokens=8, seed=0))
    three = generate(lm, "ROMEO:", SamplingConfig(num_beams=3, max_new_tokens=8, seed=0))
    assert [t.token_id for t in one.tokens] == [t.token_id for t in greedy.tokens]
    assert 1 <= len(three.tokens) <= 8 and all(np.isfinite(t.logprob) for t in three.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_named_points_mean_the_same_tensor_in_every_family(family, family_lms):
    from core.models.hooks import act_name

    lm = family_lms(family)
    st = lm.stack
    rec: dict = {}
    st.logits(_ids(lm)[:, :12], record=rec)
    parallel = family in PARALLEL
    for i in range(st.n_layer):
        name = lambda p: rec[act_name(p, i)]  # noqa: E731
        assert torch.allclose(name("ln2_normalized"), st.ln_2(i)(name("mlp_in")))
        if parallel:   # TransformerLens' parallel blocks: the MLP reads the block's input; no resid_mid
            assert act_name("resid_mid", i) not in rec
            assert torch.equal(name("mlp_in"), name("resid_pre"))
            assert torch.allclose(name("resid_post"), name("resid_pre") + name("attn_out") + name("mlp_out"),
                                  atol=1e-6)
        elif family in POST_NORM:   # opt-350m: the stream is normalised after each sublayer's sum
            layer = st.blocks[i]
            assert torch.equal(name("mlp_in"), name("resid_mid"))
            assert torch.allclose(name("resid_mid"), layer.self_attn_layer_norm(name("resid_pre") + name("attn_out")))
            assert torch.allclose(name("resid_post"), layer.final_layer_norm(name("resid_mid") + name("mlp_out")))
        else:
            assert torch.equal(name("mlp_in"), name("resid_mid"))
            assert torch.allclose(name("resid_mid"), name("resid_pre") + name("attn_out"))
            assert torch.allclose(name("resid_post"), name("resid_mid") + name("mlp_out"))
    assert act_name("ln_final_normalized") in rec


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_mlp_drops_exactly_the_mlp_term(family, family_lms):
    lm = family_lms(family)
    ids = _ids(lm)[:, :12]
    zero = lm.stack.logits(ids, mlps={i: torch.zeros_like for i in range(lm.stack.n_layer)})
    skipped = lm.stack.logits(ids, skip_mlp=True)
    assert torch.allclose(skipped, zero, atol=1e-6)
    assert not torch.allclose(skipped, lm.stack.logits(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_consensus_statistics_equal_those_of_transformers_hidden_states(family, family_lms):
    from core.consensus.engine import ConsensusConfig, run_consensus
    from core.consensus.metrics import token_stats
    from core.consensus.results import STAT_NAMES

    lm = family_lms(family)
    ids = _ids(lm)[:, :16]
    res = run_consensus(lm, [ids[0].tolist()], ConsensusConfig(iterations=1, engine="block"))
    L = lm.stack.n_layer
    last_block = {}
    handle = lm.stack.blocks[L - 1].register_forward_hook(lambda m, a, out: last_block.setdefault(
        "h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = lm.model(ids, output_hidden_states=True).hidden_states   # embeddings, after block 0 .. L-2, final norm
    finally:
        handle.remove()
    states = list(hs[:L]) + [last_block["h"]]
    # opt-350m's hidden_states[0] is its narrower token embedding, before the projection in
    for col in range(1 if family == "opt_350m" else 0, L + 1):
        expected = token_stats(states[col])[0][0].numpy()
        got = np.array([res.series(n)[0, col] for n in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"column {col}")
    if family != "opt_350m":   # whose last hidden state is projected out to the embedding's width
        np.testing.assert_allclose(res.hidden[0], hs[-1][0].numpy(), atol=1e-5)   # after the last final norm


@pytest.mark.parametrize("family", FAMILIES)
def test_reinit_draws_from_the_familys_own_init(family, family_lms, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(family_lms(family).source))
    lm.stack.reinit(3)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(lm.model.config)   # transformers' own init of the same config
    theirs = dict(fresh.named_parameters())
    for name, p in lm.model.named_parameters():
        q = theirs[name]
        if p.dim() >= 2:
            assert abs(p.std().item() / q.std().item() - 1) < 0.25, name
        else:
            assert torch.equal(p, q), name   # norm gains (Gemma's zeros) and biases exactly as transformers sets them
    other = load_model(str(family_lms(family).source))
    other.stack.reinit(3)
    ids = _ids(lm)[:, :8]
    assert torch.equal(lm.stack.logits(ids), other.stack.logits(ids))


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3", "gpt_neox", "opt"])
def test_simulation_takes_q_k_v_from_a_layer_with_grouped_kv_heads(family, family_lms):
    from core.consensus.simulation import make_qkv

    lm = family_lms(family)
    st = lm.stack
    H, hd, d = st.n_head, st.head_dim, st.d_model
    groups = H // st.n_kv_head
    wq, wk, wv, wo = (w.detach().float() for w in st.attention_weights(1))
    q_all = make_qkv("layer:1", d, lm=lm)
    assert q_all.q.shape == (H * hd, d) and q_all.v.shape == (d, d)
    for h in range(H):
        one = make_qkv(f"layer:1:{h}", d, lm=lm)
        kv = h // groups
        torch.testing.assert_close(one.q, wq[h * hd:(h + 1) * hd])
        torch.testing.assert_close(one.k, wk[kv * hd:(kv + 1) * hd])
        torch.testing.assert_close(one.v, wo[:, h * hd:(h + 1) * hd] @ wv[kv * hd:(kv + 1) * hd])
    assert ("rotary" in q_all.description) == (family != "opt")


def test_the_walk_reads_its_own_weights_for_a_family_with_fused_qkv(family_lms):
    """Pythia's query_key_value is fused per head: the simulation's W_Q reproduces the model's queries."""
    lm = family_lms("gpt_neox")
    st = lm.stack
    x = torch.randn(1, 5, st.d_model)
    q, k, v = st._heads(0, x)
    bq = st._heads(0, torch.zeros(1, 1, st.d_model))[0]
    wq = st.attention_weights(0)[0]
    ours = (x @ wq.t()).view(1, 5, st.n_head, st.head_dim).transpose(1, 2) + bq
    torch.testing.assert_close(ours, q)


# -- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name,kind", [("T5Config", "encoder-decoder"), ("MixtralConfig", "mixture-of-experts"),
                                              ("MambaConfig", "state-space")])
def test_unsupported_architectures_get_one_sentence_naming_the_supported(config_name, kind, tmp_path):
    import transformers

    getattr(transformers, config_name)().save_pretrained(tmp_path)
    with pytest.raises(LabError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert kind in msg and "llama" in msg and "gpt_neox" in msg and msg.count(".") <= 3 and "\n" not in msg


def test_impossible_family_config_is_refused_before_building(tmp_path):
    import transformers

    transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=3,
                             intermediate_size=64, vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(LabError, match="num_key_value_heads"):
        load_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(num_key_value_heads=2, num_hidden_layers=100000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LabError, match="num_hidden_layers must be a whole number between 1 and 1,024"):
        load_model(str(tmp_path))


def test_memory_check_counts_every_familys_parameters(family_lms, monkeypatch):
    """The up-front check sees the exact parameter count of the model about to be built."""
    from core.models import loading

    lm = family_lms("qwen3")
    seen = {}
    real = loading.require_free

    def spy(need, device, what, advice, detail=""):
        seen["need"] = need
        return real(need, device, what, advice, detail)
    monkeypatch.setattr(loading, "require_free", spy)
    load_model(lm.source)
    n = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    assert seen["need"] == 4 * n


# -- revisions -----------------------------------------------------------------------------------

def test_split_revision():
    from core.models.known import split_revision

    assert split_revision("EleutherAI/pythia-160m@step3000") == ("EleutherAI/pythia-160m", "step3000")
    assert split_revision("gpt2") == ("gpt2", None)
    for bad in ("gpt2@", "@main", "gpt2@a b"):
        with pytest.raises(LabError, match="MODEL@REVISION"):
            split_revision(bad)


def test_a_revision_not_cached_offline_says_how_to_fetch_that_revision(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as e:
        load_model("EleutherAI/pythia-160m@step3000")
    assert "hf download EleutherAI/pythia-160m --revision step3000" in str(e.value)


def test_a_cached_revision_loads_that_revisions_weights(monkeypatch, tmp_path, tmp_path_factory):
    """A hub cache holding two revisions of one repo (refs/main and refs/step3000): the spec's
    revision picks the snapshot, offline."""
    import shutil

    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "models--EleutherAI--pythia-tiny"
    for ref, seed in (("main", 0), ("step3000", 1)):
        src = family_dir(tmp_path_factory, "gpt_neox")
        if seed:
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained(src)
            torch.manual_seed(seed)
            for p in m.parameters():
                p.data.normal_(0, 0.1)
            m.save_pretrained(src)
        snap = repo / "snapshots" / f"{ref}hash"
        shutil.copytree(src, snap)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(f"{ref}hash")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    main = load_model("EleutherAI/pythia-tiny")
    step = load_model("EleutherAI/pythia-tiny@step3000")
    assert step.spec == "EleutherAI/pythia-tiny@step3000" and step.family == "gpt_neox"
    w_main, w_step = main.stack.wte.weight, step.stack.wte.weight
    assert not torch.equal(w_main, w_step)
    snap_weights = load_model(str(repo / "snapshots" / "step3000hash")).stack.wte.weight
    assert torch.equal(w_step, snap_weights)


def test_builders_cover_every_registered_family():
    from core.models.families import FAMILIES as REGISTERED

    assert set(REGISTERED) <= {f.replace("_sequential", "") for f in FAMILIES}
    assert build  # the kit's builder is what the fixtures use


# -- shared parts ----------------------------------------------------------------------------------

def test_kv_cache_grows_as_the_text_does_and_keeps_what_it_held():
    from core.models.attention import KVCache

    cache = KVCache(n_layer=1, max_length=1000)
    ks, vs = [], []
    for T in (3, 250, 1, 300, 1, 400):
        k, v = torch.randn(2, 2, T, 4), torch.randn(2, 2, T, 4)
        ks.append(k)
        vs.append(v)
        got_k, got_v = cache.update(0, k, v)
        cache.advance(T)
        assert torch.equal(got_k, torch.cat(ks, 2)) and torch.equal(got_v, torch.cat(vs, 2))
        assert cache.k[0].shape[2] <= 1000   # never more room than the context
    assert cache.k[0].shape[2] == 1000 and cache.length == 955
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0][0, :, :955], torch.cat(ks, 2)[1])
    with pytest.raises(ValueError, match="1000 positions"):
        cache.update(0, torch.randn(2, 2, 46, 4), torch.randn(2, 2, 46, 4))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attend_shares_kv_heads_across_query_heads(softcap):
    from core.models.attention import attend, repeat_kv

    q, k, v = torch.randn(1, 6, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    for causal, window in ((True, None), (True, 3), (False, None)):
        got = attend(q, k, v, causal=causal, window=window, softcap=softcap)
        kk, vv = repeat_kv(k, 6), repeat_kv(v, 6)   # kv head j serves query heads 3j, 3j+1, 3j+2
        scores = q @ kk.transpose(-1, -2) / 8 ** 0.5
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        i, j = torch.arange(7)[:, None], torch.arange(7)[None]
        allowed = (j <= i) & ((i - j < window) if window else True) if causal else torch.ones(7, 7, dtype=torch.bool)
        ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_validate_says_it_compares_the_gpt2_family_only(family_lms):
    from core.models.validate import validate_gpt2

    with pytest.raises(LabError, match="a llama model; only the GPT-2 family"):
        validate_gpt2(family_lms("llama").source)


def test_promoted_tokens_use_gemmas_one_plus_w_gain(family_lms):
    """A feature's promoted tokens go through the final norm's gain as it multiplies: 1 + w for Gemma
    (whose weights start at zero), and an RMSNorm does not centre."""
    from core.interp.collect import logit_effects

    lm = family_lms("gemma")
    assert not lm.stack.final_norm_centres
    W_dec = torch.randn(3, lm.stack.d_model)

    class TC:
        pass
    tc = TC()
    tc.W_dec = W_dec
    effects = logit_effects(lm, tc, n=4)
    direct = (W_dec * (1 + lm.stack.ln_f.weight.detach())) @ lm.stack.lm_head.weight.detach().t()
    for f, (up, down) in enumerate(effects):
        assert [t for t, _ in up] == direct[f].topk(4).indices.tolist()
        assert [v for _, v in up] == pytest.approx(direct[f].topk(4).values.tolist(), rel=1e-5)


def test_every_family_is_listed_with_known_ids_by_the_models_command(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    from core.commands.models import collect
    from core.models.families import FAMILIES as REGISTERED, SUPPORTED_NAMES
    from core.models.known import FAMILY_MODELS, family_of

    families = {"gpt2", "gpt_neo", *REGISTERED}
    assert set(FAMILY_MODELS) == families
    assert {n.split(" ")[0] for n in SUPPORTED_NAMES} == families
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))   # an empty cache: nothing is cached
    hub = collect()["hub"]
    assert {h["family"] for h in hub} == families
    assert all(family_of(h["id"]) == h["family"] and h["cached"] is False for h in hub)
    assert {h["id"] for h in hub if h["gated"]} >= {"meta-llama/Llama-3.2-1B", "google/gemma-2-2b"}


LLAMA_SIZES = [{"num_hidden_layers": 100_000}, {"hidden_size": 10**6}, {"hidden_size": 33}, {"num_attention_heads": 0},
               {"vocab_size": -1}, {"vocab_size": 10**12}, {"max_position_embeddings": 0}, {"num_hidden_layers": "12"},
               {"num_hidden_layers": None}, {"num_hidden_layers": 1.5}, {"num_hidden_layers": True},
               {"intermediate_size": -5}, {"intermediate_size": 10**9}, {"head_dim": 0}, {"num_key_value_heads": 3},
               {"num_key_value_heads": 0}, {"hidden_act": "evil"}, {"rms_norm_eps": "nan"}]


@pytest.mark.parametrize("change", LLAMA_SIZES, ids=[str(c) for c in LLAMA_SIZES])
def test_a_family_config_of_absurd_sizes_is_one_sentence_before_anything_is_built(change, family_lms, tmp_path):
    import shutil
    import time

    folder = tmp_path / "m"
    shutil.copytree(family_lms("llama").source, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(LabError) as e:
        load_model(str(folder))
    assert time.perf_counter() - t0 < 15
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma2", "phi3", "gpt_neox", "gptj", "opt", "opt_350m"])
def test_transcoders_train_collect_describe_and_explain_in_every_family(family, family_lms, tmp_path):
    """Transcoders read ln2.hook_normalized and stand in for the MLP (hook_mlp_out) in every family,
    parallel and post-norm blocks included: a set trained on the family explains a completion whose
    tokens are the model's own greedy ones."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from app_harness import described_feature_model
    from core.generation.autoregressive import SamplingConfig, generate
    from core.interp import BuiltinExplainer, FeatureStore, load_transcoder_set, run_explain_completion, store_path

    text = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. ") * 6
    model_dir, set_dir = described_feature_model(tmp_path, Path(family_lms(family).source), [text] * 2, steps=8,
                                                 n_tokens=512)
    lm = load_model(str(model_dir))
    tset = load_transcoder_set(set_dir)
    assert sorted(tset.transcoders) == list(range(lm.stack.n_layer))
    settings = SamplingConfig(max_new_tokens=4, greedy=True, n_alternatives=0)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        assert store.features(0, order_by="density")
        ex = run_explain_completion(lm, tset, "ROMEO:", store=store, explainer=BuiltinExplainer(), settings=settings)
    assert ex.completion == generate(lm, "ROMEO:", settings).completion
    assert ex.layers and all(np.isfinite(layer.share) for layer in ex.layers)


def test_a_gpu_load_goes_straight_to_the_gpu_after_checking_its_memory(family_lms, monkeypatch):
    """--device cuda:N: the memory check asks the GPU (parameters x bytes of the dtype) and transformers
    places every weight there as it reads it (device_map), so a 7B model in bfloat16 never passes
    through host memory. No GPU is needed to check what is asked of transformers."""
    import transformers

    from core.models import loading

    src = family_lms("qwen2")
    checked, asked = [], {}
    monkeypatch.setattr(loading, "require_free", lambda need, device, *a, **k: checked.append((need, str(device))))
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        asked.update(kwargs)
        return real(source, **{k: v for k, v in kwargs.items() if k != "device_map"})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = loading._load_hf(src.source, "cuda:0", torch.bfloat16, local=True)
    n = sum(p.numel() for p in {id(p): p for p in src.model.parameters()}.values())
    assert checked == [(2 * n, "cuda:0")]
    assert asked["device_map"] == {"": "cuda:0"} and asked["dtype"] == torch.bfloat16
