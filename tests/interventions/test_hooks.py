"""Hook points, run_with_cache, ablation, patching and steering, checked against transformers' own
models with the same component zeroed by a PyTorch hook, and against the walk without hooks."""
from __future__ import annotations

import threading

import pytest
import torch

from core.generation.autoregressive import generate
from core.generation.config import SamplingConfig
from core.interventions import (Interventions, from_flags, generate_with, hook_names, hooks, patch,
                                patching_sweep, run_with_cache)
from core.models.hookpoints import active_hooks
from core.models.hooks import act_name
from core.models.loading import load_model

TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east"
FAMILIES = ["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"]
ORACLE_FAMILIES = [*FAMILIES, "tiny_llama_dir"]  # plus a rotary family with grouped-query attention


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tests.families_kit import family_dir

    return family_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def models(request):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(str(request.getfixturevalue(name)))
        return cache[name]
    return get


def _ids(lm, n=14):
    return torch.tensor([lm.tokenizer.encode(TEXT)[:n]])


@pytest.mark.parametrize("fixture", FAMILIES)
def test_cache_holds_every_point_with_transformer_lens_shapes(fixture, models):
    lm = models(fixture)
    st = lm.stack
    ids = _ids(lm)
    B, T, D, H = 1, ids.shape[1], st.d_model, st.n_head
    logits, cache = run_with_cache(lm, ids)
    assert set(cache) == set(hook_names(lm))
    expected = {"hook_embed": (B, T, D), "hook_pos_embed": (B, T, D), "ln_final.hook_normalized": (B, T, D)}
    for i in range(st.n_layer):
        for p in ("resid_pre", "ln1_normalized", "attn_out", "resid_mid", "mlp_in", "ln2_normalized", "mlp_out",
                  "resid_post"):
            expected[act_name(p, i)] = (B, T, D)
        for p in ("q", "k", "v", "z"):
            expected[act_name(p, i)] = (B, T, H, D // H)
        expected[act_name("pattern", i)] = (B, H, T, T)
        expected[act_name("mlp_post", i)] = (B, T, 4 * D)
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected
    # the explicit-softmax path asked for by hook_pattern gives the fused path's logits
    assert (logits - st.logits(ids)).abs().max() < 1e-5
    pat = cache["pattern", 0]
    assert torch.allclose(pat.sum(-1), torch.ones(B, H, T), atol=1e-5)
    assert torch.all(pat.triu(1) == 0)                              # causal
    # the tensors mean what their names say
    assert torch.allclose(cache["embed"] + cache["pos_embed"], cache["resid_pre", 0], atol=1e-6)
    z = cache["z", 0]
    assert torch.allclose(z.transpose(1, 2), pat @ cache["v", 0].transpose(1, 2), atol=1e-5)
    assert torch.allclose(cache["ln1_normalized", 1], st.ln_1(1)(cache["resid_pre", 1]), atol=1e-6)
    # only what is asked for is kept
    _, small = run_with_cache(lm, ids, ["blocks.0.attn.hook_z"])
    assert list(small) == ["blocks.0.attn.hook_z"]
    assert torch.allclose(small["z", 0], z, atol=1e-6)  # fused attention here, the explicit softmax above


def test_unknown_point_is_refused_with_the_nearest_name(models):
    from core.errors import LabError

    lm = models("tiny_gpt2_dir")
    with pytest.raises(LabError, match="blocks.0.hook_resid_pre"):
        with hooks(lm, {"blocks.0.hook_resid_pr": lambda t, h: None}):
            pass
    with pytest.raises(LabError, match="no activation point"):
        run_with_cache(lm, _ids(lm), ["blocks.99.hook_resid_pre"])


# -- oracles: transformers' models with the component zeroed by a PyTorch hook -------------------------------

def _attn_proj(lm, layer):
    blk = lm.stack.blocks[layer]
    if lm.stack.family == "llama":
        return blk.self_attn.o_proj
    return blk.attn.attention.out_proj if lm.stack.family == "gpt_neo" else blk.attn.c_proj


def _torch_hooks(lm, spec):
    """PyTorch hooks on the model's own modules doing what ``spec`` does; returns their handles."""
    kind, _, rest = spec.partition(":")
    layer, _, head = rest.partition(".")
    layer = int(layer)
    blk = lm.stack.blocks[layer]
    handles = []
    if kind == "head":
        dh = lm.stack.head_dim
        h = int(head)

        def pre(mod, args):
            x = args[0].clone()
            x[..., h * dh:(h + 1) * dh] = 0
            return (x,)
        handles.append(_attn_proj(lm, layer).register_forward_pre_hook(pre))
    if kind in ("attn", "layer"):
        handles.append(_attn_proj(lm, layer).register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    if kind in ("mlp", "layer"):
        handles.append(blk.mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    return handles


def _reference_logits(lm, ids):
    out = lm.model(ids)
    return out.logits if hasattr(out, "logits") else out


def _reference_greedy(lm, ids, n):
    """Greedy continuation by the model's own forward, token by token (no cache: nothing of ours)."""
    seq = ids
    for _ in range(n):
        nxt = _reference_logits(lm, seq)[:, -1].argmax(-1, keepdim=True)
        if lm.tokenizer.eos_id is not None and int(nxt) == lm.tokenizer.eos_id:
            break
        seq = torch.cat([seq, nxt], 1)
    return seq[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fixture", ORACLE_FAMILIES)
@pytest.mark.parametrize("spec", ["head:1.1", "attn:0", "mlp:1", "layer:0"])
def test_zero_ablation_equals_the_model_with_that_component_zeroed(fixture, spec, models):
    lm = models(fixture)
    ids = _ids(lm)
    iv = from_flags([spec])
    from core.interventions import prepare
    fns = prepare(lm, iv, [ids[0].tolist()])
    with hooks(lm, fns):
        ours = lm.stack.logits(ids)
    handles = _torch_hooks(lm, spec)
    try:
        with torch.no_grad():
            ref = _reference_logits(lm, ids)
            ref_tokens = _reference_greedy(lm, ids[:, :6], 8)
    finally:
        for h in handles:
            h.remove()
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - lm.stack.logits(ids)).abs().max() > 1e-3             # it did change something
    prompt = lm.tokenizer.decode(ids[0, :6].tolist())
    assert lm.tokenizer.encode(prompt) == ids[0, :6].tolist()
    got = generate_with(lm, prompt, SamplingConfig(greedy=True, max_new_tokens=8), iv)
    assert [t.token_id for t in got.tokens] == ref_tokens
    assert got.settings["interventions"] == iv.records()
    assert active_hooks() is None


def test_mean_ablation_of_a_head_writes_its_mean_over_the_prompt(models):
    lm = models("tiny_gpt2_dir")
    ids = _ids(lm)
    _, clean = run_with_cache(lm, ids, ["blocks.1.attn.hook_z"])
    mean = clean["z", 1][0, :, 2].mean(0)                               # (d_head,)
    from core.interventions import prepare
    fns = prepare(lm, from_flags(["head:1.2:mean"]), [ids[0].tolist()])
    _, cache = run_with_cache(lm, ids, ["blocks.1.attn.hook_z"], fns=fns)
    z = cache["z", 1]
    assert torch.allclose(z[0, :, 2], mean.expand(ids.shape[1], -1), atol=1e-6)
    assert torch.equal(z[0, :, [0, 1, 3]], clean["z", 1][0, :, [0, 1, 3]])


# -- patching and steering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ORACLE_FAMILIES)
def test_patching_every_position_of_a_layer_restores_the_clean_logits(fixture, models):
    lm = models(fixture)
    clean = _ids(lm, 10)
    corrupted = clean.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 5) % lm.stack.vocab_size
    clean_logits = lm.stack.logits(clean)
    for point in ("resid_pre", "resid_post"):
        for layer in range(lm.stack.n_layer):
            name = act_name(point, layer)
            patched = patch(lm, corrupted, clean, [name])
            assert torch.equal(patched, clean_logits), (name, (patched - clean_logits).abs().max())
    # before the corrupted position nothing differs, so patching those positions alone changes nothing
    assert torch.equal(patch(lm, corrupted, clean, [act_name("resid_pre", 0)], positions=[0, 1]),
                       lm.stack.logits(corrupted))


def test_patching_sweep_is_one_grid_of_layers_by_positions(models):
    lm = models("tiny_gpt2_dir")
    clean = _ids(lm, 10)
    corrupted = clean.clone()
    corrupted[0, 3] = (corrupted[0, 3] + 7) % lm.stack.vocab_size
    res = patching_sweep(lm, clean, corrupted)
    L, T = lm.stack.n_layer, clean.shape[1]
    assert res.logit_diff.shape == (L, T) and res.restored.shape == (L, T)
    # patching the corrupted position at the first layer restores the clean run completely
    assert res.restored[0, 3] == pytest.approx(1.0, abs=1e-4)
    # positions other than the corrupted one, before any mixing, restore nothing
    assert res.restored[0, [0, 1, 2, 4, 5]] == pytest.approx(0.0, abs=1e-4)
    # the last position's stream leaving the last block is all the answer depends on
    post = patching_sweep(lm, clean, corrupted, point="resid_post")
    assert post.restored[L - 1, T - 1] == pytest.approx(1.0, abs=1e-4)
    assert post.restored[L - 1, :T - 1] == pytest.approx(0.0, abs=1e-4)
    # each cell equals a one-off patch of that (layer, position)
    one = patch(lm, corrupted, clean, [act_name("resid_pre", 1)], positions=[5])[0, -1]
    a, w = res.answer[0], res.wrong[0]
    assert float(one[a] - one[w]) == pytest.approx(float(res.logit_diff[1, 5]), abs=1e-4)


def _tset(lm, seed=0, n_features=16):
    from core.interp.config import TranscoderConfig
    from core.interp.transcoder import Transcoder, TranscoderSet

    cfg = TranscoderConfig(d_model=lm.stack.d_model, n_features=n_features, activation="relu")
    gen = torch.Generator().manual_seed(seed)
    tcs = {}
    for i in range(lm.stack.n_layer):
        t = Transcoder(cfg, i)
        t.reset_parameters(gen)
        with torch.no_grad():
            t.b_enc.fill_(0.1)
        tcs[i] = t.eval()
    return TranscoderSet(transcoders=tcs, config=cfg, model=lm.spec)


def test_steering_by_zero_changes_nothing_and_a_scale_adds_the_decoder_row(models):
    lm = models("tiny_gpt2_dir")
    tset = _tset(lm)
    ids = _ids(lm)
    from core.interventions import prepare
    base = lm.stack.logits(ids)
    with hooks(lm, prepare(lm, from_flags(steer=["1.3=0"]), tset=tset)):
        assert torch.equal(lm.stack.logits(ids), base)
    row = tset[1].W_dec[3].detach()
    handle = lm.stack.blocks[1].mlp.register_forward_hook(lambda m, a, out: out + 4.0 * row)
    try:
        with torch.no_grad():
            ref = _reference_logits(lm, ids)
    finally:
        handle.remove()
    with hooks(lm, prepare(lm, from_flags(steer=["1.3=4"]), tset=tset)):
        steered = lm.stack.logits(ids)
    assert (steered - ref).abs().max() < 1e-4 and (steered - base).abs().max() > 1e-3


def test_steering_vector_file_is_added_at_its_hook(models, tmp_path):
    import numpy as np

    lm = models("tiny_gpt2_dir")
    ids = _ids(lm)
    vec = np.linspace(-1, 1, lm.stack.d_model).astype(np.float32)
    np.save(tmp_path / "d.npy", vec)
    from core.interventions import prepare
    with hooks(lm, prepare(lm, from_flags(steer_vector=[f"{tmp_path / 'd.npy'}@blocks.0.hook_resid_post"]))):
        _, cache = run_with_cache(lm, ids, ["blocks.1.hook_resid_pre"])
    _, clean = run_with_cache(lm, ids, ["blocks.0.hook_resid_post"])
    assert torch.allclose(cache["resid_pre", 1], clean["resid_post", 0] + torch.from_numpy(vec), atol=1e-6)
    from core.errors import LabError
    np.save(tmp_path / "short.npy", vec[:5])
    with pytest.raises(LabError, match="5 numbers"):
        prepare(lm, from_flags(steer_vector=[f"{tmp_path / 'short.npy'}@blocks.0.hook_resid_post"]))


def test_feature_ablation_splices_the_transcoder_with_that_feature_zeroed(models):
    lm = models("tiny_gpt2_dir")
    tset = _tset(lm)
    ids = _ids(lm)
    tc = tset[1]

    def spliced(x):
        a = tc.encode(x)
        a[..., 5] = 0
        return tc.decode(a)
    ref = lm.stack.logits(ids, mlps={1: spliced})
    from core.interventions import prepare
    with hooks(lm, prepare(lm, from_flags(["feature:1.5"]), tset=tset)):
        ours = lm.stack.logits(ids)
    assert torch.allclose(ours, ref, atol=1e-5)
    a = tc.encode(run_with_cache(lm, ids, ["blocks.1.ln2.hook_normalized"])[1]["ln2_normalized", 1])
    assert a[..., 5].abs().sum() > 0                                    # the feature was on: zeroing it mattered


# -- hooks never outlive their context, nor cross sessions ------------------------------------------------------

def test_hooks_are_undone_after_an_error_and_after_a_stopped_generation(models):
    lm = models("tiny_gpt2_dir")
    ids = _ids(lm)
    base = lm.stack.logits(ids)
    zero = {act_name("mlp_out", 0): lambda t, h: torch.zeros_like(t)}
    with pytest.raises(RuntimeError):
        with hooks(lm, zero):
            raise RuntimeError("boom")
    assert active_hooks() is None and torch.equal(lm.stack.logits(ids), base)
    from core.interventions import hooked
    from core.generation.autoregressive import stream
    events = hooked(lm, zero, stream(lm, TEXT[:20], SamplingConfig(greedy=True, max_new_tokens=20)))
    next(events), next(events)
    assert active_hooks() is None                                      # paused between events: not active here
    assert torch.equal(lm.stack.logits(ids), base)
    events.close()                                                     # Stop
    assert active_hooks() is None and torch.equal(lm.stack.logits(ids), base)


def test_two_threads_never_see_each_others_hooks(models):
    lm = models("tiny_gpt2_dir")
    ids = _ids(lm)
    base = lm.stack.logits(ids)
    with hooks(lm, {act_name("mlp_out", 1): lambda t, h: torch.zeros_like(t)}):
        ablated = lm.stack.logits(ids)
    assert not torch.equal(ablated, base)
    barrier = threading.Barrier(2)
    results: dict[str, list] = {"hooked": [], "clean": []}
    errors = []

    def hooked_session():
        try:
            with hooks(lm, {act_name("mlp_out", 1): lambda t, h: torch.zeros_like(t)}):
                barrier.wait()
                for _ in range(20):
                    results["hooked"].append(lm.stack.logits(ids))
                barrier.wait()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def clean_session():
        try:
            barrier.wait()
            for _ in range(20):
                results["clean"].append(lm.stack.logits(ids))
            barrier.wait()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=hooked_session), threading.Thread(target=clean_session)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(torch.equal(x, ablated) for x in results["hooked"]) and len(results["hooked"]) == 20
    assert all(torch.equal(x, base) for x in results["clean"]) and len(results["clean"]) == 20


def test_generation_without_interventions_is_untouched(models):
    lm = models("tiny_gpt2_dir")
    cfg = SamplingConfig(greedy=True, max_new_tokens=6)
    assert generate_with(lm, TEXT[:20], cfg, Interventions()).completion == generate(lm, TEXT[:20], cfg).completion


def test_cache_matches_transformer_lens_on_the_same_gpt2(models):
    """TransformerLens's HookedTransformer loaded with the same GPT-2 weights (no folding or centring)
    caches the same tensors under the same names."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    lm = models("tiny_gpt2_dir")
    hf, st = lm.model, lm.stack
    cfg = HookedTransformerConfig(n_layers=st.n_layer, d_model=st.d_model, n_ctx=st.context_length,
                                  d_head=st.d_model // st.n_head, n_heads=st.n_head, d_mlp=4 * st.d_model,
                                  d_vocab=st.vocab_size, act_fn="gelu_new", normalization_type="LN",
                                  positional_embedding_type="standard", default_prepend_bos=False)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    tl.eval()
    ids = _ids(lm)
    ours_logits, ours = run_with_cache(lm, ids)
    with torch.no_grad():
        tl_logits, theirs = tl.run_with_cache(ids)
    assert (ours_logits - tl_logits).abs().max() < 1e-4
    shared = [n for n in ours if n in theirs]
    assert set(ours) - set(shared) <= {act_name("mlp_in", i) for i in range(st.n_layer)}  # TL's is opt-in
    for name in shared:
        assert ours[name].shape == theirs[name].shape, name
        assert (ours[name] - theirs[name]).abs().max() < 1e-4, name


def test_concurrent_generations_with_different_interventions_each_get_their_own(models):
    """Three 'sessions' on one shared model at once: each generation equals the same one run alone."""
    lm = models("tiny_gpt2_dir")
    cfg = SamplingConfig(greedy=True, max_new_tokens=12)
    jobs = {"clean": Interventions(), "head": from_flags(["head:0.3"]), "mlp": from_flags(["mlp:1:mean", "layer:2"])}
    def run(iv):
        r = generate_with(lm, TEXT[:20], cfg, iv)
        return r.completion, tuple(round(t.logprob, 5) for t in r.tokens)
    alone = {k: run(iv) for k, iv in jobs.items()}
    assert len(set(alone.values())) == 3                                # they do differ
    barrier = threading.Barrier(len(jobs))
    together: dict[str, list] = {k: [] for k in jobs}

    def session(name):
        barrier.wait()
        for _ in range(3):
            together[name].append(run(jobs[name]))

    threads = [threading.Thread(target=session, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == {k: [v] * 3 for k, v in alone.items()}
