"""Weight conversion between Hugging Face GPT-2 and our GPT, both ways.

Hugging Face stores GPT-2's projections as Conv1D (``[in, out]``); our GPT uses ``nn.Linear``
(``[out, in]``), so exactly these four matrices are transposed. Every shape is checked before
copying: a mismatch fails loudly with the key that broke.

Going out (:func:`hf_gpt2_from_gpt`), the few things our config says that GPT-2's spells
differently are mapped onto it: no biases become zero biases, untied embeddings
``tie_word_embeddings=False``, another MLP width ``n_inner``.
"""
from __future__ import annotations

import torch

from ..errors import LabError
from .gpt import GPT, GPTConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIP = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints


def config_from_hf_gpt2(hf_config) -> GPTConfig:
    return GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                     n_layer=hf_config.n_layer, n_head=hf_config.n_head, d_model=hf_config.n_embd,
                     layer_norm_eps=hf_config.layer_norm_epsilon, dropout=0.0, bias=True, tie_weights=True)


def normalise_gpt2_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept either HF naming (``transformer.h.0...``) or a stripped variant (``h.0...``)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(SKIP):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v
    return out


def load_gpt2_state_dict(model: GPT, sd: dict[str, torch.Tensor]) -> GPT:
    """Copy a Hugging Face GPT-2 state dict into our GPT, transposing the Conv1D weights."""
    sd = normalise_gpt2_keys(sd)
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd and k != "lm_head.weight"]
    if missing:
        raise LabError(f"The GPT-2 weights lack {len(missing)} tensors (first: {missing[0]}); "
                       f"check that the file is a GPT-2 state dict for this size.")
    with torch.no_grad():
        for k, target in ours.items():
            if k == "lm_head.weight" and k not in sd:
                continue  # tied to wte
            _copy_weight(k, sd[k], target, "the model", "; the checkpoint is for a different model size.")
    return model


def _copy_weight(k: str, src: torch.Tensor, target: torch.Tensor, expects: str, why: str) -> None:
    """Copy GPT-2's ``k`` between the two layouts (either way): Conv1D matrices transposed, the
    shape checked first; a mismatch says ``{expects}`` wanted another shape, then ``why``."""
    if k.endswith(CONV1D):
        src = src.t()
    if src.shape != target.shape:
        raise LabError(f"Weight {k} has shape {tuple(src.shape)} but {expects} expects {tuple(target.shape)}{why}")
    target.copy_(src)


def gpt_from_hf_gpt2(hf_model) -> GPT:
    """Our GPT with the weights of a transformers GPT2LMHeadModel."""
    model = GPT(config_from_hf_gpt2(hf_model.config))
    load_gpt2_state_dict(model, hf_model.state_dict())
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


def hf_gpt2_config(cfg: GPTConfig, eos_token_id: int | None = None):
    """transformers' GPT2Config describing our causal GPT with ``cfg`` (gelu_new, like ours)."""
    from transformers import GPT2Config  # a second of import: only an export pays it

    if not cfg.causal:
        raise LabError("A bidirectional (masked-diffusion) GPT has no GPT2Config: GPT-2 attends causally only.")
    if cfg.positions != "learned":
        raise LabError("A GPT with rotary positions has no GPT2Config: GPT-2 has a learned position table only.")
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_expansion * cfg.d_model,
                      activation_function="gelu_new", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                      attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.layer_norm_eps,
                      tie_word_embeddings=cfg.tie_weights, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                      architectures=["GPT2LMHeadModel"])


@torch.no_grad()
def hf_gpt2_from_gpt(model: GPT, eos_token_id: int | None = None):
    """A transformers GPT2LMHeadModel (float32, CPU, eval mode) with our causal GPT's weights: the
    Conv1D matrices transposed, zeros for the biases a ``bias=False`` model has none of."""
    from transformers import GPT2LMHeadModel  # a second of import: only an export pays it

    hf = GPT2LMHeadModel(hf_gpt2_config(model.config, eos_token_id)).eval()
    ours = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in model.state_dict().items()}
    left = sorted(set(ours) - set(hf.state_dict()))
    if left:
        raise LabError(f"GPT-2 has no place for our {left[0]}; the two layouts no longer agree (a bug).")
    for k, target in hf.state_dict().items():
        if k.endswith(SKIP) or (k == "lm_head.weight" and model.config.tie_weights):
            continue  # causal-mask buffers; the head is wte itself
        src = ours.get(k)
        if src is None and k.endswith(".bias") and not model.config.bias:
            src = torch.zeros_like(target)
        if src is None:
            raise LabError(f"Our GPT has no tensor for GPT-2's {k}; the two layouts no longer agree (a bug).")
        _copy_weight(k, src, target, "GPT-2", " (a bug in the conversion).")
    if model.config.tie_weights:
        hf.tie_weights()
    return hf
