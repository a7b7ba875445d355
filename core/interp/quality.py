"""How good a transcoder set is, per layer, on held-out text.

- ``fve``: fraction of the MLP output's variance the transcoder explains,
  ``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` over all validation tokens, with ``y`` the
  target the transcoder was trained on: ``hook_mlp_out``, or for one trained on a TransformerLens
  model with centred writing weights (``TranscoderConfig.target_centered``, set on import),
  ``hook_mlp_out`` less its mean over the model dimension.
- ``l0``: mean number of active features per token.
- ``dead_fraction``: share of features that never fire on the validation tokens.
- Replacement fidelity: the model's loss on the same tokens as it is (``loss_clean``), with this
  layer's MLP replaced by its transcoder (``loss_replaced``), and with the MLP zero-ablated
  (``loss_ablated``); ``loss_recovered = (ablated - replaced) / (ablated - clean)`` is 1 for a
  perfect stand-in and 0 for one no better than deleting the MLP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .activations import iter_batches, mlp_io, model_inputs, model_loss, zero_mlp

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from .transcoder import Transcoder, TranscoderSet


@dataclass
class LayerQuality:
    layer: int
    fve: float
    l0: float
    dead_fraction: float
    loss_clean: float
    loss_replaced: float
    loss_ablated: float
    loss_recovered: float
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerQuality":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def recovered(clean: float, replaced: float, ablated: float) -> float:
    gap = ablated - clean
    return float((ablated - replaced) / gap) if abs(gap) > 1e-9 else float("nan")


class _Moments:
    """Running sums for FVE, L0 and firing counts of one layer."""

    def __init__(self, n_features: int, device: torch.device):
        self.sse = 0.0
        self.sum_y = None
        self.sum_y2 = 0.0
        self.n = 0
        self.active = 0.0
        self.fired = torch.zeros(n_features, dtype=torch.bool, device=device)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, acts: torch.Tensor) -> None:
        y, y_hat = y.float().reshape(-1, y.shape[-1]), y_hat.float().reshape(-1, y.shape[-1])    # (N, d)
        acts = acts.reshape(-1, acts.shape[-1])                                                  # (N, F)
        self.sse += float(((y - y_hat) ** 2).sum())
        s = y.sum(0).double()
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.sum_y2 += float((y.double() ** 2).sum())
        self.n += y.shape[0]
        on = acts > 0
        self.active += float(on.sum())
        self.fired |= on.any(0)

    def fve(self) -> float:
        total = self.sum_y2 - float((self.sum_y ** 2).sum()) / max(self.n, 1)
        return float(1.0 - self.sse / total) if total > 0 else float("nan")


@torch.no_grad()
def evaluate_transcoders(lm: "LoadedModel", transcoders: "dict[int, Transcoder] | TranscoderSet",
                         windows: np.ndarray, batch_size: int = 8, seed: int = 0) -> dict[int, LayerQuality]:
    """Every quality number of the module docstring, per layer, on ``windows`` ``(n, T)``."""
    tcs = transcoders.mlps() if hasattr(transcoders, "mlps") else transcoders
    layers = sorted(tcs)
    device = lm.stack.device
    moments = {i: _Moments(tcs[i].n_features, device) for i in layers}
    losses = {key: [] for key in ["clean"] + [f"r{i}" for i in layers] + [f"z{i}" for i in layers]}
    weights = []
    for b, (_, ids) in enumerate(iter_batches(windows, batch_size)):
        gen = lambda: torch.Generator().manual_seed(seed * 7919 + b)  # noqa: E731 same masks for every variant
        x_in = model_inputs(lm, ids, gen(), rate=None) if lm.objective == "diffusion" else ids
        io = mlp_io(lm, x_in, layers)
        for i in layers:
            x, y = io[i]
            if tcs[i].cfg.target_centered:
                y = y - y.mean(-1, keepdim=True)
            acts = tcs[i].encode(x)
            moments[i].add(y, tcs[i].decode(acts), acts)
        weights.append(ids.shape[0])
        losses["clean"].append(model_loss(lm, ids, None, gen()))
        for i in layers:
            losses[f"r{i}"].append(model_loss(lm, ids, {i: tcs[i]}, gen()))
            losses[f"z{i}"].append(model_loss(lm, ids, {i: zero_mlp}, gen()))
    w = np.asarray(weights, dtype=np.float64)
    mean = {k: float(np.average(np.asarray(v, dtype=np.float64), weights=w)) for k, v in losses.items()}
    out = {}
    for i in layers:
        m = moments[i]
        out[i] = LayerQuality(
            layer=i, fve=m.fve(), l0=m.active / max(m.n, 1), dead_fraction=float((~m.fired).float().mean()),
            loss_clean=mean["clean"], loss_replaced=mean[f"r{i}"], loss_ablated=mean[f"z{i}"],
            loss_recovered=recovered(mean["clean"], mean[f"r{i}"], mean[f"z{i}"]), n_tokens=m.n)
    return out


def metrics_json(quality: dict[int, LayerQuality], **extra) -> dict:
    """The metrics.json a set folder holds: per layer (keyed by the layer as a string) plus totals."""
    layers = {str(i): q.to_dict() for i, q in sorted(quality.items())}
    return {"layers": layers, **extra}
