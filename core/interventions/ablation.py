"""Hooks that ablate and steer, and the hooks an :class:`~.spec.Interventions` list stands for.

Each helper returns ``{name: fn}`` ready for :func:`core.interventions.hooks`:

- :func:`zero_ablation` / :func:`mean_ablation`: replace a point (or some heads of a per-head point)
  with zero or with a fixed mean, at every position;
- :func:`steering`: add ``scale * direction`` at every position;
- :func:`transcoder_splice`: the transcoder stands in for one MLP, with chosen features zeroed or set.

Means are taken over the prompt's positions (every prompt's, when there are several) in a clean
walk, with no intervention active: "what this component usually writes here", TransformerLens's
mean ablation over a reference set, with the prompt as the set. The BOS a tokenizer puts before the
text (Llama, Gemma, OPT) is left out of the mean: every later token attends to it as a sink, and its
states are far from the text's (in large models by orders of magnitude), so a short prompt's mean
would be mostly the BOS's. The ablation itself still applies at every position, BOS included.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from .api import HookPoint, check_names, run_with_cache
from .spec import Interventions
from ..errors import LabError
from ..models.hooks import act_name

if TYPE_CHECKING:
    from ..interp.transcoder import TranscoderSet
    from ..models.loading import LoadedModel

HEAD_POINTS = ("q", "k", "v", "z")   # per-head points: (B, T, heads, d_head), heads on dim 2


def _head_mask(t: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(t.shape[2], dtype=torch.bool, device=t.device)
    mask[list(heads)] = True
    return mask[:, None]                                              # (heads, 1): broadcasts over d_head


def zero_ablation(name: str, heads: Sequence[int] | None = None) -> dict:
    """``{name: fn}`` writing zeros at ``name`` (only the given heads' slices of a per-head point)."""
    def fn(t: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if heads is None:
            return torch.zeros_like(t)
        return t.masked_fill(_head_mask(t, heads), 0)
    return {name: fn}


def mean_ablation(name: str, mean: torch.Tensor, heads: Sequence[int] | None = None) -> dict:
    """``{name: fn}`` writing ``mean`` (the point's per-position shape without batch and position:
    ``(d,)``, or ``(heads, d_head)`` for a per-head point) at every position."""
    def fn(t: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        m = mean.to(t.device, t.dtype).expand_as(t)
        if heads is None:
            return m.clone()
        return torch.where(_head_mask(t, heads), m, t)
    return {name: fn}


def steering(name: str, direction: torch.Tensor, scale: float = 1.0) -> dict:
    """``{name: fn}`` adding ``scale * direction`` (a ``(d,)`` vector) at every position of ``name``."""
    direction = torch.as_tensor(direction)

    def fn(t: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if direction.shape[-1] != t.shape[-1]:
            raise LabError(f"The steering vector has {direction.shape[-1]} numbers, but {name} holds vectors of "
                           f"{t.shape[-1]}; save a vector of that size.")
        return t + scale * direction.to(t.device, t.dtype)
    return {name: fn}


def prompt_means(lm: "LoadedModel", prompts: Iterable[Sequence[int]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{name: mean over every position of every prompt}`` from clean walks (one per prompt, so
    prompts of different lengths need no padding)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    prefix = list(lm.tokenizer.prefix_ids)
    for ids in prompts:
        ids = list(ids)
        skip = len(prefix) if len(ids) > len(prefix) and ids[:len(prefix)] == prefix else 0  # the BOS: see above
        _, cache = run_with_cache(lm, [ids], names)
        for n in names:
            x = cache[n].float()[:, skip:].flatten(0, 1)                     # (T - skip, ...)
            sums[n] = sums.get(n, 0) + x.sum(0)
        count += len(ids) - skip
    if not count:
        raise LabError("Mean-ablation needs a prompt to take the mean over; give one.")
    return {n: s / count for n, s in sums.items()}


def transcoder_splice(lm: "LoadedModel", tset: "TranscoderSet", layer: int, zero: Sequence[int] = (),
                      set_to: dict[int, float] | None = None) -> dict:
    """Hooks that put layer ``layer``'s transcoder in place of its MLP, with features ``zero``
    zeroed and ``set_to`` features held at fixed activations: the MLP's input
    (``ln2.hook_normalized``) is read, and ``hook_mlp_out`` is replaced by the transcoder's output."""
    tc = tset[layer]
    seen: dict[str, torch.Tensor] = {}
    fixed = dict(set_to or {})
    idx = torch.tensor(sorted(set(zero) | set(fixed)), dtype=torch.long)
    vals = torch.tensor([fixed.get(int(i), 0.0) for i in idx], dtype=torch.float32)
    bad = [int(i) for i in idx if not 0 <= int(i) < tc.n_features]
    if bad:
        raise LabError(f"Layer {layer}'s transcoder has features 0..{tc.n_features - 1}; there is no feature {bad[0]}.")

    def read(t: torch.Tensor, hook: HookPoint) -> None:
        seen["x"] = t

    def write(t: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        a = tc.encode(seen.pop("x").to(tc.W_enc.device, tc.W_enc.dtype))        # (B, T, F)
        if len(idx):
            a = a.index_copy(-1, idx.to(a.device), vals.to(a.device, a.dtype).expand(*a.shape[:-1], len(idx)))
        return tc.decode(a).to(t.device, t.dtype)
    return {act_name("ln2_normalized", layer): read, act_name("mlp_out", layer): write}


def _merge(into: dict[str, list], more: dict) -> None:
    for name, fn in more.items():
        into.setdefault(name, []).append(fn)


def load_vector(path: str) -> torch.Tensor:
    """A steering vector saved with ``numpy.save``: floats, one dimension (no pickles are read)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise LabError(f"The steering vector file {path} does not exist; save one with numpy.save.") from None
    except (OSError, ValueError) as e:
        raise LabError(f"Cannot read the steering vector {path} ({e}); save a float vector with numpy.save.") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise LabError(f"The steering vector in {path} must be one row of finite numbers (got shape {arr.shape}, "
                       f"{arr.dtype}).")
    return torch.from_numpy(arr.astype(np.float32))


def build_hooks(lm: "LoadedModel", iv: Interventions, prompts: Sequence[Sequence[int]] = (),
                tset: "TranscoderSet | None" = None) -> dict[str, list]:
    """``{name: [fn, ...]}`` doing everything ``iv`` asks; ``prompts`` (token-id lists) give the means of
    ``:mean`` ablations, ``tset`` the transcoders of ``feature:`` ablations and ``--steer``."""
    st = lm.stack
    iv.check(st.n_layer, st.n_head)
    if iv.needs_transcoders and tset is None:
        raise LabError("Feature ablation and feature steering need a transcoder set; train one with "
                       f"`python -m core transcoders train --model {lm.spec}` or pass --transcoders DIR.")
    means_wanted = set()
    for a in iv.ablations:
        if a.mode == "mean":
            means_wanted |= set(_ablation_points(a))
    means = prompt_means(lm, prompts, sorted(means_wanted)) if means_wanted else {}
    fns: dict[str, list] = {}
    by_layer: dict[int, tuple[list[int], dict[int, float]]] = {}
    heads: dict[tuple[int, str], list[int]] = {}
    for a in iv.ablations:
        if a.kind == "feature":
            zero, fixed = by_layer.setdefault(a.layer, ([], {}))
            if a.mode == "mean":
                fixed[a.index] = _feature_mean(lm, tset, a.layer, a.index, prompts)
            else:
                zero.append(a.index)
        elif a.kind == "head":
            heads.setdefault((a.layer, a.mode), []).append(a.index)
        else:
            for name in _ablation_points(a):
                _merge(fns, mean_ablation(name, means[name]) if a.mode == "mean" else zero_ablation(name))
    for (layer, mode), hs in heads.items():
        name = act_name("z", layer)
        _merge(fns, mean_ablation(name, means[name], hs) if mode == "mean" else zero_ablation(name, hs))
    for layer, (zero, fixed) in by_layer.items():
        _merge(fns, transcoder_splice(lm, tset, layer, zero, fixed))
    for s in iv.steers:
        tc = tset[s.layer]
        if not 0 <= s.feature < tc.n_features:
            raise LabError(f"Steering '{s.spec}': layer {s.layer}'s transcoder has features 0..{tc.n_features - 1}.")
        if s.scale != 0:   # adding zero would change nothing; not hooking at all keeps the walk exact
            _merge(fns, steering(act_name("mlp_out", s.layer), tc.W_dec[s.feature].detach().float(), s.scale))
    for v in iv.vectors:
        check_names(lm, [v.hook])
        vec = load_vector(v.path)
        width = _width(lm, v.hook)
        if width is not None and vec.shape[0] != width:
            raise LabError(f"The steering vector {v.path} has {vec.shape[0]} numbers, but {v.hook} holds vectors of "
                           f"{width}; save a vector of that size.")
        _merge(fns, steering(v.hook, vec))
    return fns


def _width(lm: "LoadedModel", name: str) -> int | None:
    """The last dimension of a stream point (the model's width), None for points of other sizes."""
    per_head = any(f"attn.hook_{p}" in name for p in ("q", "k", "v", "z", "pattern")) or "mlp.hook_post" in name
    return None if per_head else lm.stack.d_model


def _ablation_points(a) -> list[str]:
    if a.kind == "head":
        return [act_name("z", a.layer)]
    if a.kind == "attn":
        return [act_name("attn_out", a.layer)]
    if a.kind == "mlp":
        return [act_name("mlp_out", a.layer)]
    if a.kind == "layer":
        return [act_name("attn_out", a.layer), act_name("mlp_out", a.layer)]
    return []   # feature: see _feature_mean


def _feature_mean(lm, tset, layer: int, feature: int, prompts) -> float:
    if not 0 <= feature < tset[layer].n_features:
        raise LabError(f"Layer {layer}'s transcoder has features 0..{tset[layer].n_features - 1}; there is no feature "
                       f"{feature}.")
    name = act_name("ln2_normalized", layer)
    total, count = 0.0, 0
    tc = tset[layer]
    for ids in prompts:
        _, cache = run_with_cache(lm, [list(ids)], [name])
        with torch.no_grad():
            a = tc.encode(cache[name].to(tc.W_enc.device, tc.W_enc.dtype))[..., feature]
        total += float(a.sum())
        count += a.numel()
    if not count:
        raise LabError("Mean-ablation needs a prompt to take the mean over; give one.")
    return total / count
