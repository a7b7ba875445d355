"""How close to consensus a batch of token clouds is: every statistic in one batched pass.

All statistics are computed in float32 from the hidden states ``h`` ``(B, T, D)`` (``B`` prompts
of ``T`` tokens each) with tensor ops only, so a caller can write them into a device buffer
after every block without a host synchronisation.

For one prompt with token vectors ``h_0 .. h_{T-1}`` and ``cos(a, b) = <a, b> / (|a| |b|)``:

- ``metric = 1 - (1/T) sum_j |cos(h_0, h_j)|`` over all ``j`` *including* ``j = 0`` (whose term
  is 1), exactly as both reference scripts computed it; 0 means every token is parallel or
  anti-parallel to the first.
- ``mean_cosine = (1/(T(T-1))) sum_{i != j} cos(h_i, h_j)``: off-diagonal pairs only, so a
  cloud of orthogonal tokens reads 0 and a collapsed one 1. NaN when ``T = 1``.
- ``mean_dot = (1/(T(T-1))) sum_{i != j} <h_i, h_j>``: the same pairs, raw (not normalised).
  NaN when ``T = 1``.
- ``effective_rank = (sum_k s_k^2)^2 / sum_k s_k^4`` over the singular values ``s_k`` of the
  centred token matrix ``X = h - mean_j h_j``: the participation ratio, ``tr(G)^2 / |G|_F^2``
  for ``G = X X^T``. It is 1 when the tokens spread along one line and ``k`` when they spread
  evenly over ``k`` orthogonal directions. Chosen over the entropy of the singular values because
  it needs no decomposition (a decomposition would synchronise with the host on a GPU every block).
  *Noise floor*: a cloud whose RMS distance to its centroid is at most :data:`NOISE_FLOOR_EPS`
  machine epsilons of the hidden states' dtype (float32 at least) times its RMS token norm,
  ``sum_j |x_j|^2 <= (8 eps)^2 sum_j |h_j|^2`` (8 eps = 9.5e-7 in float32), is one point as far as that
  arithmetic can tell, and reads 1 (its un-centred token matrix has rank 1). Without the floor a converged
  cloud reads the participation ratio of its rounding noise, about 2-5 in float32, although
  its centroid distance is ``1e-7`` of the token norm. Clouds above the floor read the plain
  participation ratio, bit for bit; a single token (``T = 1``) reads 1.
- ``centroid_distance = (1/T) sum_j |h_j - mean_k h_k|``: the cloud's size in the model's units.
- the cosine matrix ``C[i, j] = cos(h_i, h_j)`` ``(T, T)``, when asked.
"""
from __future__ import annotations

import torch

from .results import STAT_NAMES  # noqa: F401  (the order of token_stats columns)
EPS = 1e-12  # a zero vector's cosine with anything is 0, not NaN
NOISE_FLOOR_EPS = 8  # effective rank: a spread within 8 epsilons of the dtype (relative to the norm) is one point


def token_stats(h: torch.Tensor, matrix: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Statistics of ``h`` ``(B, T, D)``: ``(stats (B, 5), cosines (B, T, T) or None)``.

    ``stats[:, k]`` is ``STAT_NAMES[k]``; everything float32 on ``h``'s device.
    """
    x = h.float()
    B, T, _ = x.shape
    norms = x.norm(dim=-1)  # (B, T)
    gram = torch.bmm(x, x.transpose(1, 2))  # (B, T, T) raw dot products
    cos = gram / (norms[:, :, None] * norms[:, None, :]).clamp_min(EPS)  # (B, T, T)
    metric = 1.0 - cos[:, 0, :].abs().mean(-1)  # (B,)
    off = ~torch.eye(T, dtype=torch.bool, device=x.device)  # (T, T) off-diagonal pairs
    pairs = T * (T - 1)
    mean_cos = (cos * off).sum((1, 2)) / pairs if pairs else torch.full((B,), float("nan"), device=x.device)
    mean_dot = (gram * off).sum((1, 2)) / pairs if pairs else torch.full((B,), float("nan"), device=x.device)
    xc = x - x.mean(1, keepdim=True)  # (B, T, D) centred on the centroid
    gc = torch.bmm(xc, xc.transpose(1, 2))  # (B, T, T)
    trace = gc.diagonal(dim1=1, dim2=2).sum(-1)  # (B,) = sum of squared singular values
    frob2 = gc.square().sum((1, 2))  # (B,) = sum of fourth powers
    floor = NOISE_FLOOR_EPS * max(torch.finfo(h.dtype).eps, torch.finfo(torch.float32).eps)
    one_point = trace <= floor ** 2 * norms.square().sum(-1)  # (B,) spread within rounding noise of the norm
    eff_rank = torch.where(one_point, torch.ones_like(trace),
                           trace.square() / frob2.clamp_min(torch.finfo(torch.float32).tiny))
    centroid = xc.norm(dim=-1).mean(-1)  # (B,)
    stats = torch.stack([metric, mean_cos, mean_dot, eff_rank, centroid], dim=1)  # (B, 5)
    return stats, (cos if matrix else None)
