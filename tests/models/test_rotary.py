"""Rotary positions in our GPT (a masked-diffusion model's positions): the rotation equals
transformers' Llama RoPE, and every walk (the model, the layer-stack adapter, the KV cache) agrees."""
import pytest
import torch

from core.errors import LabError
from core.models.config import GPTConfig
from core.models.gpt import GPT, rotate
from core.models.stack import GPTLabStack
from core.models.hookpoints import hooks_active


def _model(causal: bool, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, d_model=32, causal=causal,
                         positions="rotary", **kw)).eval()


def test_rotation_equals_transformers_llama_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=10000.0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.arange(5, 14)[None]                       # a cached step: positions 5..13
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_q, ours_k = rotate(q, k, offset=5)
    assert torch.allclose(ours_q, ref_q, atol=1e-6, rtol=0) and torch.allclose(ours_k, ref_k, atol=1e-6, rtol=0)


def test_a_rotary_gpt_has_no_position_table_and_counts_its_parameters():
    model = _model(causal=False)
    assert "wpe" not in model.transformer
    assert model.num_params() == model.config.n_params
    assert model.num_params(non_embedding=True) == model.num_params()


@pytest.mark.parametrize("causal", [True, False])
def test_the_adapter_walk_equals_the_models_forward(causal):
    model = _model(causal)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref = model(ids)
    assert torch.allclose(GPTLabStack(model).logits(ids), ref, atol=1e-5, rtol=0)


def test_rotary_positions_tell_order_apart_in_a_bidirectional_model():
    """Without a position table only the rotation can: swapping two tokens must change the output
    at a third position (a bag of words would not)."""
    model = _model(causal=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    swapped = torch.tensor([[6, 5, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = model(ids)[0, 4], model(swapped)[0, 4]
    assert (a - b).abs().max() > 1e-4


def test_cached_decoding_equals_the_full_forward_for_a_causal_rotary_gpt():
    model = _model(causal=True)
    ids = torch.randint(0, 97, (1, 20))
    stack = GPTLabStack(model)
    full = stack.logits(ids)
    cache = stack.new_cache()
    parts = [stack.logits(ids[:, :7], cache=cache)] + [stack.logits(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_hook_q_and_k_hold_queries_and_keys_before_the_rotation():
    """As TransformerLens's rotary models: hook_q is W_Q x (+ b), per head, unrotated."""
    model = _model(causal=False)
    stack = GPTLabStack(model)
    ids = torch.randint(0, 97, (1, 12))
    seen = {}

    def keep(t, point):
        seen["q"] = t.clone()

    with hooks_active({"blocks.0.attn.hook_q": [keep]}):
        stack.logits(ids)
    x = model.transformer.h[0].ln_1(model.transformer.wte(ids))
    q = model.transformer.h[0].attn.c_attn(x)[..., :32].view(1, 12, 4, 8)
    assert torch.allclose(seen["q"], q, atol=1e-6, rtol=0)


def test_a_rotary_gpt_is_not_exported_as_gpt2():
    from core.models.convert import hf_gpt2_config

    with pytest.raises(LabError, match="rotary"):
        hf_gpt2_config(_model(causal=True).config)


def test_positions_are_checked_and_old_configs_load_with_learned_positions():
    with pytest.raises(LabError, match="positions must be one of"):
        GPTConfig(positions="alibi")
    with pytest.raises(LabError, match="even head size"):
        GPTConfig(d_model=30, n_head=2, positions="rotary")
    old = {k: v for k, v in GPTConfig(causal=False).to_dict().items() if k != "positions"}
    assert GPTConfig.from_dict(old).positions == "learned"


def test_the_trainer_gives_diffusion_rotary_positions_and_ar_the_learned_table():
    from core.training.config import TrainConfig

    assert TrainConfig(objective="diffusion").gpt_config(100, 1).positions == "rotary"
    assert TrainConfig(objective="ar").gpt_config(100, None).positions == "learned"
