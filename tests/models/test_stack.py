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
