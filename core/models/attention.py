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
        if self.k[layer] is None or self.k[layer].shape[0] != B:
            # empty, not zeros: positions past ``length`` are never read, and zeroing a
            # context-sized buffer per layer costs as much as a few decoded tokens
            self.k[layer] = k.new_empty(B, nh, self.max_length, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_length, hs)
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
           window: int | None = None, scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention on ``(B, nh, T, hs)`` tensors.

    ``q_offset`` is the absolute position of the first query (the cache length before this
    call); ``window`` limits how far back a query may look (GPT-Neo local layers);
    ``scale`` overrides 1/sqrt(hs) (GPT-Neo uses 1.0).
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    needs_window = window is not None and q_offset + q_len > window
    if not causal or (q_len == 1 and not needs_window):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    if q_len == k_len and not needs_window:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    mask = attention_mask(q_len, k_len, q_offset, causal, window if needs_window else None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C)


def attend_with_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, on_pattern, *, causal: bool,
                        q_offset: int = 0, window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """:func:`attend` written out: scores, mask, softmax, then ``pattern @ v``, with the pattern
    ``(B, nh, Tq, Tk)`` handed to ``on_pattern`` (which may return an edited one) in between.

    Used only when something reads or rewrites the attention pattern (TransformerLens's
    ``attn.hook_pattern``); the fused kernel stays the default. Keys and values with fewer heads
    than the queries (grouped-query attention) are repeated to match.
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                     # (B, nh, Tq, Tk)
    mask = attention_mask(q.shape[-2], k.shape[-2], q_offset, causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    pattern = on_pattern(scores.softmax(-1))
    return pattern @ v                                             # (B, nh, Tq, hs)
