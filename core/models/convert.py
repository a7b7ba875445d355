"""Weight conversion between Hugging Face GPT-2 and our GPT.

Hugging Face stores GPT-2's projections as Conv1D (``[in, out]``); our GPT uses ``nn.Linear``
(``[out, in]``), so exactly these four matrices are transposed. Every shape is checked before
copying: a mismatch fails loudly with the key that broke.
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
            src = sd[k]
            if k.endswith(CONV1D):
                src = src.t()
            if src.shape != target.shape:
                raise LabError(f"Weight {k} has shape {tuple(src.shape)} but the model expects "
                               f"{tuple(target.shape)}; the checkpoint is for a different model size.")
            target.copy_(src)
    return model


def gpt_from_hf_gpt2(hf_model) -> GPT:
    """Our GPT with the weights of a transformers GPT2LMHeadModel."""
    model = GPT(config_from_hf_gpt2(hf_model.config))
    load_gpt2_state_dict(model, hf_model.state_dict())
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()
