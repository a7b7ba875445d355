"""The masked (absorbing-state) diffusion objective, MDLM-style (Sahoo et al. 2024).

Forward process: every token of a sequence is replaced by ``<|mask|>`` independently with
probability ``t``, one ``t ~ U(0, 1]`` per sequence (stratified across the batch by default:
:func:`sample_rates`). The bidirectional model predicts the
original tokens at the masked positions. With the linear schedule (alpha_t = 1 - t) the
continuous-time ELBO (MDLM, eq. 10) is

    NLL(x) <= E_t [ (1/t) * sum_{i masked} -log p(x_i | x_t) ]

so the per-token loss ``(1/t) * sum_masked CE / T`` is an upper bound on the per-token
negative log-likelihood, in nats, and can be compared with an autoregressive model's loss.
The sampler that runs the process backwards is :mod:`core.generation.diffusion`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

T_MIN = 1e-3  # t is drawn from (T_MIN, 1]: t = 0 would mask nothing and weigh it infinitely


# -- training objective -------------------------------------------------------------------------

def sample_rates(batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                 antithetic: bool = True) -> torch.Tensor:
    """Per-sequence rates ``t`` ``(batch,)`` in (T_MIN, 1].

    Plain: ``batch`` independent uniforms. Antithetic (MDLM's low-discrepancy sampler): the unit
    interval is cut into ``batch`` equal strata and one uniform is drawn inside each, ``u_i =
    (i + U_i) / batch``, then shuffled across the batch. Each ``u_i`` is still uniform over [0, 1)
    when its stratum is picked at random, so the loss stays an unbiased estimate of the same bound,
    but the batch covers every part of [0, 1) and the variance from ``t`` falls (for a smooth
    integrand, from O(1/B) to O(1/B**3)). The batch mean of ``u`` is exactly 1/2 in expectation
    and never strays more than 1/(2B) from it.
    """
    if antithetic:
        jitter = torch.rand(batch, device=device, generator=generator)
        order = torch.randperm(batch, device=device, generator=generator)
        u = (order.to(jitter.dtype) + jitter) / batch
    else:
        u = torch.rand(batch, device=device, generator=generator)
    return 1.0 - u * (1.0 - T_MIN)


def sample_mask(x0: torch.Tensor, generator: torch.Generator | None = None,
                antithetic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence rates ``t`` ``(B,)`` in (T_MIN, 1] (:func:`sample_rates`) and the boolean mask
    ``(B, T)`` they draw."""
    B, T = x0.shape
    t = sample_rates(B, x0.device, generator, antithetic)
    mask = torch.rand(B, T, device=x0.device, generator=generator) < t[:, None]
    return t, mask


def sequence_bound(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                   mask_id: int) -> torch.Tensor:
    """Per-sequence NLL bound per token ``(B,)``: ``(1/t_b) * sum_{i masked} CE(b, i) / T``.

    Only masked positions are scored; the mask token itself is never a valid prediction (its
    logit is removed, as in MDLM's "zero masking probabilities").
    """
    B, T, V = logits.shape
    rows = mask.nonzero()[:, 0]                                   # (N,) sequence of each masked token
    picked = logits[mask].float().index_fill(1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    ce = F.cross_entropy(picked, x0[mask], reduction="none")      # (N,)
    per_seq = torch.zeros(B, device=logits.device, dtype=ce.dtype).index_add(0, rows, ce)
    return per_seq / (t.to(ce.dtype) * T)


def diffusion_loss(model: nn.Module, x0: torch.Tensor, mask_id: int, *, t: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   antithetic: bool = True) -> torch.Tensor:
    """The training loss on clean tokens ``x0`` ``(B, T)``: the mean of :func:`sequence_bound`.

    ``t`` and ``mask`` may be given (tests, validation); otherwise they are drawn, ``t`` stratified
    across the batch unless ``antithetic`` is False (:func:`sample_rates`).
    """
    if t is None or mask is None:
        t, mask = sample_mask(x0, generator, antithetic)
    xt = x0.masked_fill(mask, mask_id)
    logits = model(xt)                                            # (B, T, V)
    return sequence_bound(logits, x0, mask, t, mask_id).mean()


def validation_rates(n_rows: int) -> torch.Tensor:
    """A fixed midpoint grid of rates, one per validation sequence: averaging the bound over it
    estimates the integral over t in (0, 1] with no sampling noise from t."""
    return (torch.arange(n_rows, dtype=torch.float32) + 0.5) / n_rows


def validation_masks(n_rows: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rates ``(N,)`` and masks ``(N, T)`` of a run's validation set, fixed by its seed, so every
    validation (and any later re-evaluation of a checkpoint) scores the same masked positions."""
    rates = validation_rates(n_rows)
    g = torch.Generator().manual_seed(seed + 1)
    return rates, torch.rand(n_rows, seq_len, generator=g) < rates[:, None]


def validation_loss_sum(forward, batch: torch.Tensor, objective: str, mask_id: int | None = None,
                        rates: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The summed loss (float64 scalar) of a validation ``batch`` of windows ``(B, T + 1)``: the
    autoregressive cross-entropy per token times ``B``, or the diffusion bound of each sequence under
    its fixed ``rates`` and ``masks``. One definition for the trainer's validation and for a saved
    checkpoint's recomputation (core.models.default), so the two agree by construction.
    ``forward`` is the model's call (the trainer's may be wrapped for DDP or FSDP)."""
    if objective == "diffusion":
        x0 = batch[:, :-1]
        return sequence_bound(forward(x0.masked_fill(masks, mask_id)), x0, masks, rates, mask_id).double().sum()
    _, loss = forward(batch[:, :-1], batch[:, 1:])
    return loss.double() * len(batch)
