"""Attention math and the KV cache shared by our GPT and the layer-stack adapter.

Every model family walks through :func:`attend`, so causal, bidirectional and GPT-Neo's
sliding-window attention, with or without a cache, are written exactly once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys and values for every layer.

    Writes land in place at ``[length : length + T]`` so decoding never re-concatenates
    the past; ``advance`` moves the write head once all layers have seen the new tokens.
    """

    def __init__(self, n_layer: int, max_length: int):
        self.n_layer = n_layer
        self.max_length = max_length
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values ``(B, nh, T, hs)`` for ``layer``; return all keys/values so far."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        held_k, held_v = self.k[layer], self.v[layer]
        if held_k is None or held_k.shape[0] != B or held_k.shape[2] < end:
            # empty, not zeros: positions past ``length`` are never read, and zeroing a buffer per
            # layer costs as much as a few decoded tokens. Room grows by doubling up to the context
            # (a 128k-context model would otherwise reserve its whole context per layer up front).
            room = min(self.max_length, max(end, 2 * (held_k.shape[2] if held_k is not None else 0), 256))
            self.k[layer] = k.new_empty(B, nh, room, hs)
            self.v[layer] = v.new_empty(B, nh, room, hs)
            if held_k is not None and held_k.shape[0] == B and self.length:
                self.k[layer][:, :, :self.length] = held_k[:, :, :self.length]
                self.v[layer][:, :, :self.length] = held_v[:, :, :self.length]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the caches of surviving beams)."""
        for i in range(self.n_layer):
            if self.k[i] is not None:
                self.k[i] = self.k[i].index_select(0, index)
                self.v[i] = self.v[i].index_select(0, index)


def attention_mask(q_len: int, k_len: int, q_offset: int, causal: bool, window: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for queries at ``q_offset..`` over keys ``0..k_len``.

    Returns None when SDPA needs no explicit mask.
    """
    if not causal:
        return None
    i = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, q_offset: int = 0,
           window: int | None = None, scale: float | None = None, dropout: float = 0.0,
           softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention: queries ``(B, nh, T, hs)``, keys and values ``(B, n_kv, S, hs)``.

    ``q_offset`` is the absolute position of the first query (the cache length before this
    call); ``window`` limits how far back a query may look (GPT-Neo local layers, Mistral,
    Gemma-2's sliding layers); ``scale`` overrides 1/sqrt(hs) (GPT-Neo uses 1.0). With fewer
    key/value heads than query heads (grouped-query attention) each kv head serves
    ``nh / n_kv`` consecutive query heads. ``softcap`` passes the scores through
    ``softcap * tanh(scores / softcap)`` before masking (Gemma-2), which SDPA cannot do.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    needs_window = window is not None and q_offset + q_len > window
    if softcap is not None:
        mask = attention_mask(q_len, k_len, q_offset, causal, window if needs_window else None, q.device)
        return _softcapped(q, k, v, mask, scale, softcap, dropout)
    if not causal or (q_len == 1 and not needs_window):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if q_len == k_len and not needs_window:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    mask = attention_mask(q_len, k_len, q_offset, causal, window if needs_window else None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def repeat_kv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Keys or values ``(B, n_kv, S, hs)`` repeated to ``n_head`` heads (each kv head serves
    ``n_head / n_kv`` consecutive query heads), for code that needs one per query head."""
    groups = n_head // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _softcapped(q, k, v, mask, scale, softcap, dropout):
    """Attention written out, for scores that are soft-capped: softmax in float32 as Gemma-2 does."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return weights @ v


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension (GPT-NeoX / Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``(a, b, c, d, ...) -> (-b, a, -d, c, ...)``: pairs of neighbours (GPT-J layout)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dimensions of each head of ``x`` ``(B, heads, T, d_head)``
    by the angles whose cos/sin are ``(T, r)`` (or ``(1, T, r)``); the rest pass unchanged
    (partial rotary: Pythia rotates a quarter of each head)."""
    r = cos.shape[-1]
    if cos.dim() == 3:
        cos, sin = cos[0], sin[0]
    turn = rotate_every_two if interleaved else rotate_half
    if r == x.shape[-1]:
        return x * cos + turn(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + turn(rot) * sin, rest), dim=-1)

def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(T, head_dim)`` of RoPE's angles (Su et al. 2021; the GPT-NeoX / Llama
    half-split layout) for ``positions`` ``(T,)``: our GPT's rotary positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C)


def attend_with_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, on_pattern, *, causal: bool,
                        q_offset: int = 0, window: int | None = None, scale: float | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """:func:`attend` written out: scores, (soft-cap,) mask, softmax, then ``pattern @ v``, with the
    pattern ``(B, nh, Tq, Tk)`` handed to ``on_pattern`` (which may return an edited one) in between.

    Used only when something reads or rewrites the attention pattern (TransformerLens's
    ``attn.hook_pattern``); the fused kernel stays the default. Keys and values with fewer heads
    than the queries (grouped-query attention) are repeated to match; soft-capped scores (Gemma-2)
    are capped before the mask and softmaxed in float32, as :func:`attend` does.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                     # (B, nh, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask(q.shape[-2], k.shape[-2], q_offset, causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype) if softcap is not None else scores.softmax(-1)
    return on_pattern(weights) @ v                                 # (B, nh, Tq, hs)
