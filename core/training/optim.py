"""Optimiser recipes (``--model-version gpt2|gpt3``) and the optimisers built from them.

Decay groups come from the parameters themselves (nanoGPT's rule): every tensor of 2 or more
dimensions (matmul weights, embeddings) decays, vectors (biases, LayerNorm gains) do not.
With ``--optimizer muon`` the 2-D weights inside the blocks go to Muon and everything else
(embeddings, tied head, vectors) stays on AdamW, as Muon's authors recommend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import LabError
from .config import TrainConfig


@dataclass(frozen=True)
class _StepNumbers:
    """What a recipe sets and a run then trains with: peak learning rate, Adam's betas and eps,
    weight decay, gradient clipping (global norm)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class Recipe(_StepNumbers):
    min_lr_ratio: float                 # cosine floor as a fraction of the peak
    warmup_steps: int | None = None     # the paper's warmup, in optimizer steps ...
    warmup_tokens: int | None = None    # ... or in tokens


# The exact tables behind --model-version (gpt-training-suite.md: "adjusts weight decay, betas,
# warmup, gradient clipping, and cosine scheduler settings").
RECIPES: dict[str, Recipe] = {
    # GPT-2 (Radford et al. 2019) publishes no optimiser settings and inherits GPT-1's
    # (Radford et al. 2018): Adam, peak lr 2.5e-4, linear warmup over 2000 updates, cosine
    # annealing to 0, weight decay 0.01; Adam's default betas (0.9, 0.999); clipping at 1.0.
    "gpt2": Recipe(lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, grad_clip=1.0,
                   min_lr_ratio=0.0, warmup_steps=2000),
    # GPT-3 (Brown et al. 2020, appendix B): Adam betas (0.9, 0.95), eps 1e-8, global-norm
    # clipping at 1.0, weight decay 0.1, linear warmup over the first 375M tokens, cosine decay
    # to 10% of the peak; peak lr 6e-4 is the 125M model's.
    "gpt3": Recipe(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                   min_lr_ratio=0.1, warmup_tokens=375_000_000),
}
# The papers' warmups assume runs of 1e5+ steps; in a short run they would never end, so warmup
# is capped at this fraction of the run's steps.
WARMUP_CAP = 0.05


@dataclass(frozen=True)
class Hyper(_StepNumbers):
    """The resolved numbers a run trains with (recipe + explicit overrides)."""

    warmup_steps: int
    min_lr_ratio: float
    total_steps: int


def resolve_hyper(cfg: TrainConfig, total_steps: int, tokens_per_step: int) -> Hyper:
    r = RECIPES[cfg.model_version]
    if cfg.warmup_steps is not None:
        warmup = int(cfg.warmup_steps)
    else:
        paper = r.warmup_steps if r.warmup_steps is not None else math.ceil(r.warmup_tokens / max(1, tokens_per_step))
        warmup = min(paper, int(WARMUP_CAP * total_steps))
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return Hyper(lr=pick(cfg.lr, r.lr), betas=(pick(cfg.beta1, r.betas[0]), pick(cfg.beta2, r.betas[1])),
                 eps=r.eps, weight_decay=pick(cfg.weight_decay, r.weight_decay),
                 grad_clip=pick(cfg.grad_clip, r.grad_clip), warmup_steps=warmup,
                 min_lr_ratio=pick(cfg.min_lr_ratio, r.min_lr_ratio), total_steps=total_steps)


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon's share: 2-D weights inside the transformer blocks (not embeddings or the head)."""
    return p.dim() == 2 and name.startswith("transformer.h.")


def build_optimizers(model: nn.Module, kind: str, hp: Hyper) -> list[torch.optim.Optimizer]:
    """One AdamW, or Muon (hidden matrices) + AdamW (the rest); each group starts at ``hp.lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The fused kernel (one pass over all tensors) is ~4x faster than the foreach one on the CPU too.
    adamw = lambda ps: torch.optim.AdamW(decay_groups(ps, hp.weight_decay), lr=hp.lr, betas=hp.betas,  # noqa: E731
                                         eps=hp.eps, fused=True)
    if kind == "adamw":
        return [adamw(named)]
    if kind != "muon":
        raise LabError(f"optimizer must be adamw or muon (got '{kind}').")
    if not hasattr(torch.optim, "Muon"):
        raise LabError(f"Muon needs torch 2.9 or newer (this is {torch.__version__}); use --optimizer adamw.")
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
    # match_rms_adamw scales Muon's update to AdamW's RMS, so one learning rate and one schedule
    # serve both optimisers (Liu et al. 2025, "Muon is scalable for LLM training").
    muon = torch.optim.Muon(hidden, lr=hp.lr, weight_decay=hp.weight_decay, adjust_lr_fn="match_rms_adamw")
    return [muon, adamw(rest)]


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
