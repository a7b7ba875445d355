"""The layer-stack adapter reproduces each family's own forward, and re-initialises reproducibly."""
import pytest
import torch

from core.models.loading import load_model


def _ids(lm, text="ROMEO: But soft, what light through yonder window breaks? It is the east"):
    return torch.tensor([lm.tokenizer.encode(text)])


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir"])
def test_adapter_walk_equals_hf_forward(fixture, request):
    lm = load_model(str(request.getfixturevalue(fixture)))
    ids = _ids(lm)
    assert ids.shape[1] > 8  # longer than the Neo window, so local attention matters
    with torch.no_grad():
        ref = lm.model(ids).logits
    ours = lm.stack.logits(ids)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()


def test_adapter_walk_equals_gptlab_forward(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    ids = _ids(lm)
    with torch.no_grad():
        ref = lm.model(ids)
    assert torch.equal(lm.stack.logits(ids), ref)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"])
def test_cached_walk_equals_full_walk(fixture, request):
    lm = load_model(str(request.getfixturevalue(fixture)))
    ids = _ids(lm)[:, :20]
    full = lm.stack.logits(ids)
    cache = lm.stack.new_cache()
    first = lm.stack.logits(ids[:, :5], cache=cache)
    steps = [lm.stack.logits(ids[:, t:t + 1], cache=cache) for t in range(5, 20)]
    stepped = torch.cat([first] + steps, dim=1)
    assert (stepped - full).abs().max().item() < 1e-5


def test_skip_mlp_and_record(tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    ids = _ids(lm)
    rec = {}
    lm.stack.logits(ids, record=rec)
    assert "blocks.0.ln2.hook_normalized" in rec and "blocks.2.hook_mlp_out" in rec
    # skipping the MLP equals replacing it with zero
    zero = lm.stack.logits(ids, mlps={i: (lambda x: torch.zeros_like(x)) for i in range(lm.stack.n_layer)})
    assert torch.allclose(lm.stack.logits(ids, skip_mlp=True), zero, atol=1e-6)
    assert not torch.allclose(lm.stack.logits(ids, skip_mlp=True), lm.stack.logits(ids))


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"])
def test_reinit_is_seeded(fixture, request):
    path = str(request.getfixturevalue(fixture))
    a, b = load_model(path), load_model(path)
    ids = _ids(a)
    before = a.stack.logits(ids)
    a.stack.reinit(7)
    b.stack.reinit(7)
    assert torch.equal(a.stack.logits(ids), b.stack.logits(ids))
    assert not torch.allclose(a.stack.logits(ids), before)
    b.stack.reinit(8)
    assert not torch.allclose(a.stack.logits(ids), b.stack.logits(ids))


# -- activation names ---------------------------------------------------------------------------------

EXPECTED_NAMES = {
    ("embed", None, None): "hook_embed",
    ("pos_embed", None, None): "hook_pos_embed",
    ("resid_pre", 3, None): "blocks.3.hook_resid_pre",
    ("ln1_normalized", 3, None): "blocks.3.ln1.hook_normalized",
    ("q", 3, None): "blocks.3.attn.hook_q",
    ("k", 3, None): "blocks.3.attn.hook_k",
    ("v", 3, None): "blocks.3.attn.hook_v",
    ("pattern", 3, None): "blocks.3.attn.hook_pattern",
    ("z", 3, None): "blocks.3.attn.hook_z",
    ("attn_out", 3, None): "blocks.3.hook_attn_out",
    ("resid_mid", 3, None): "blocks.3.hook_resid_mid",
    ("mlp_in", 3, None): "blocks.3.hook_mlp_in",
    ("ln2_normalized", 3, None): "blocks.3.ln2.hook_normalized",
    ("mlp_pre", 3, None): "blocks.3.mlp.hook_pre",
    ("mlp_post", 3, None): "blocks.3.mlp.hook_post",
    ("mlp_out", 3, None): "blocks.3.hook_mlp_out",
    ("resid_post", 3, None): "blocks.3.hook_resid_post",
    ("ln_final_normalized", None, None): "ln_final.hook_normalized",
    ("transcoder", 3, 17): "blocks.3.transcoder.17",
}


def test_the_builder_names_every_point_as_transformer_lens_does():
    from core.models.hooks import ACT_NAMES, act_name

    assert {point for point, _, _ in EXPECTED_NAMES} == set(ACT_NAMES)   # every point is checked here
    for (point, layer, feature), name in EXPECTED_NAMES.items():
        assert act_name(point, layer, feature) == name
    for bad in (("nope", 0, None), ("resid_pre", None, None), ("embed", 0, None), ("transcoder", 1, None)):
        with pytest.raises(ValueError, match="point"):
            act_name(*bad)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"])
def test_recorded_names_are_the_builders_and_mean_the_same_tensor_in_every_family(fixture, request):
    """hook_mlp_in is the stream before ln2 (= resid_mid), ln2.hook_normalized that stream after it."""
    from core.models.hooks import act_name

    lm = load_model(str(request.getfixturevalue(fixture)))
    rec = {}
    lm.stack.logits(_ids(lm)[:, :12], record=rec)
    points = ("resid_pre", "ln1_normalized", "attn_out", "resid_mid", "mlp_in", "ln2_normalized", "mlp_out",
              "resid_post")
    assert set(rec) == {act_name(p, i) for p in points for i in range(lm.stack.n_layer)} | \
        {act_name("ln_final_normalized")}
    for i in range(lm.stack.n_layer):
        name = lambda p: act_name(p, i)  # noqa: E731
        assert torch.equal(rec[name("mlp_in")], rec[name("resid_mid")])
        assert torch.allclose(rec[name("ln2_normalized")], lm.stack.ln_2(i)(rec[name("mlp_in")]))
        assert torch.allclose(rec[name("resid_mid")], rec[name("resid_pre")] + rec[name("attn_out")])
        assert torch.allclose(rec[name("resid_post")], rec[name("resid_mid")] + rec[name("mlp_out")])
