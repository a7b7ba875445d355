"""Our GPT, read top to bottom in one file (its config and presets: :mod:`core.models.config`).

Module names mirror Hugging Face's GPT-2 (transformer.h[i].attn.c_attn, ...) so converting
weights is a transpose of the Conv1D matrices and nothing else. ``causal=False`` gives the
bidirectional variant that the masked-diffusion objective trains.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, apply_rotary, attend, merge_heads, rotary_cos_sin, split_heads
from .config import PRESETS, ROTARY_BASE, GPTConfig, preset_config  # noqa: F401  (the model's config lives beside it)
from ..errors import LabError


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.causal
        self.rotary = cfg.positions == "rotary"
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, nh, T, hs)
        offset = cache.length if cache is not None else 0
        if self.rotary:
            q, k = rotate(q, k, offset)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, causal=self.causal, q_offset=offset,
                   dropout=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


def rotate(q: torch.Tensor, k: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(B, heads, T, d_head)`` of tokens at positions ``offset..`` turned by RoPE,
    so attention scores depend on how far apart two tokens are (a rotary GPT's only position signal)."""
    cos, sin = _angles(offset, q.shape[-2], q.shape[-1], q.dtype, q.device, torch.is_inference_mode_enabled())
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


@functools.lru_cache(maxsize=16)
def _angles(offset: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions ``offset..offset+length``, made once per forward instead of once per
    layer (every layer turns the same positions). ``inference`` is part of the key because a tensor
    made under inference mode cannot be saved for a training step's backward."""
    pos = torch.arange(offset, offset + length, device=device)
    return rotary_cos_sin(pos, head_dim, ROTARY_BASE, dtype)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_expansion * cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(cfg.mlp_expansion * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.d_model))
        if cfg.positions == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.d_model)
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm weights
                nn.init.ones_(p)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise LabError(f"Sequence of {start_pos + T} tokens exceeds the model's context of "
                           f"{self.config.block_size}; shorten the prompt or the generation.")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start_pos, start_pos + T, device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False):
        """Logits ``(B, T, V)`` (or ``(B, 1, V)`` with ``last_only``); with targets, ``(logits, loss)``."""
        x = self.embed(idx, cache.length if cache is not None else 0)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(idx.shape[1])
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss
