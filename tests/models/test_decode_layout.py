"""Re-storing weights for CPU decoding changes strides only: values, ties, outputs and saving hold."""
import torch
from transformers import GPT2LMHeadModel

from core.models.decode_layout import use_decode_layout
from core.models.gpt import GPT, GPTConfig
from core.models.loading import load_model, save_checkpoint
from core.models.stack import stack_for


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, d_model=16)).eval()


def test_values_and_ties_unchanged_and_each_matrix_in_its_faster_order():
    model = _tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    logits_before = model(ids)
    assert use_decode_layout(model) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    # wide outputs are stored (in, out): the (out, in) weight's transpose is the contiguous one
    for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, model.lm_head):
        assert lin.weight.t().is_contiguous() and not lin.weight.is_contiguous()
    assert block.mlp.c_proj.weight.is_contiguous()  # the down projection keeps (out, in)
    torch.testing.assert_close(model(ids), logits_before, rtol=1e-5, atol=1e-5)
    assert use_decode_layout(model) == 0  # idempotent


def test_kv_cache_decoding_still_equals_full_recompute():
    model = _tiny_gpt()
    use_decode_layout(model)
    stack = stack_for(model)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    full = stack.logits(ids)
    cache = stack.new_cache()
    stepped = [stack.logits(ids[:, :5], cache=cache)[:, -1]]
    for t in range(5, 12):
        stepped.append(stack.logits(ids[:, t:t + 1], cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_hf_conv1d_down_projection_restored_and_logits_equal(tiny_gpt2_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = hf(ids).logits
    use_decode_layout(hf)
    c_proj = hf.transformer.h[0].mlp.c_proj.weight  # Conv1D (in=4d, out=d): stored the other way
    assert c_proj.t().is_contiguous() and not c_proj.is_contiguous()
    assert hf.transformer.h[0].mlp.c_fc.weight.is_contiguous()
    torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_cpu_loads_use_it_and_checkpoints_still_save(tmp_path, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir), device="cpu")
    assert lm.model.transformer.h[0].mlp.c_fc.weight.t().is_contiguous()
    save_checkpoint(tmp_path / "again", lm.model, str(tiny_gptlab_dir / "tokenizer.json"))
    again = load_model(str(tmp_path / "again"))
    for k, v in lm.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
