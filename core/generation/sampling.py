"""Logit filters for sampling, applied in a fixed order.

Order: repetition penalty -> temperature -> top-k -> top-p -> min-p, as in transformers'
default processor list, so the same settings mean the same thing here and there. Each filter
takes logits ``(B, V)`` and returns new logits with removed tokens at ``-inf``.
"""
from __future__ import annotations

import torch


NEG_INF = float("-inf")
def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive logits are divided by
    ``penalty``, negative ones multiplied, so a penalty > 1 always makes repeats less likely."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    # float64: a penalty beyond float32's range would turn 0 * penalty into NaN; a penalty near 0
    # overflows the division, and the largest finite logit keeps softmax defined
    seen = torch.gather(logits, 1, previous).double()
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    seen = seen.clamp(max=torch.finfo(logits.dtype).max).to(logits.dtype)
    return logits.scatter(1, previous, seen)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature``. Two extremes break a plain float32 division: near 0 the quotient
    overflows to +inf (and softmax to NaN), and beyond float32's range the temperature itself
    becomes inf, so banned ``-inf`` logits turn into NaN. Only then are the logits shifted so the
    top one is 0 (softmax and every filter ignore a shift) and divided in float64: overflow lands
    on -inf, so as the temperature falls to 0 sampling becomes argmax, its limit."""
    if temperature == 1.0:
        return logits
    scaled = logits / temperature
    if not (scaled.isnan().any() or (scaled == float("inf")).any()):
        return scaled
    top = logits.max(dim=-1, keepdim=True).values
    return ((logits.double() - top.double()) / temperature).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` most likely tokens (0 = off)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches ``p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False  # the top token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's (0 = off)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, previous: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """All filters in order on float32 logits ``(B, V)``; ``previous`` ``(B, n)`` are the ids seen so far."""
    logits = apply_repetition_penalty(logits.float(), previous, repetition_penalty)
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, top_k)
    logits = apply_top_p(logits, top_p)
    return apply_min_p(logits, min_p)
