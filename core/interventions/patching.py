"""Activation patching: run a corrupted prompt with some activations taken from a clean one.

The classic experiment (Meng et al. 2022; Wang et al. 2022): a clean prompt and a corrupted one
of the same length differ in a few tokens, and so in their answer; restoring the clean activation
at one (layer, position) of the residual stream and measuring how much of the clean answer comes
back shows where the information that decides it lives. :func:`patching_sweep` does every
(layer, position) of one point as one call, one batched walk per layer (row ``p`` of the batch
patches position ``p``).

The measure is the logit difference at the last position between the clean answer and the
corrupted answer, and the share of it restored: ``(patched - corrupted) / (clean - corrupted)``
(1 = the clean run's difference, 0 = the corrupted run's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .api import HookPoint, as_ids, hooks, run_with_cache
from .config import PATCH_POINTS
from ..errors import LabError
from ..models.hooks import act_name

if TYPE_CHECKING:
    from ..models.loading import LoadedModel



def patching_hooks(name: str, source: torch.Tensor, positions: Sequence[int] | None = None) -> dict:
    """``{name: fn}`` replacing the activation at ``positions`` (all when None) with ``source``'s
    (the same point from another run, ``(B, T, ...)``, batch 1 broadcasts)."""
    def fn(t: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        src = source.to(t.device, t.dtype)
        if src.shape[1:] != t.shape[1:]:
            raise LabError(f"Patching {name} needs two prompts of the same number of tokens ({src.shape[1]} and "
                           f"{t.shape[1]}); make them the same length.")
        if positions is None:
            return src.expand_as(t).clone()
        out = t.clone()
        out[:, list(positions)] = src.expand_as(t)[:, list(positions)]
        return out
    return {name: fn}


def patch(lm: "LoadedModel", corrupted, clean, names: Sequence[str], positions: Sequence[int] | None = None
          ) -> torch.Tensor:
    """Logits of ``corrupted`` with the points ``names`` (at ``positions``, all when None) taken from the
    ``clean`` run (tokens, or a cache from :func:`run_with_cache`)."""
    cache = clean if isinstance(clean, dict) else run_with_cache(lm, clean, list(names))[1]
    fns: dict[str, list] = {}
    for n in names:
        for k, f in patching_hooks(n, cache[n], positions).items():
            fns.setdefault(k, []).append(f)
    ids = as_ids(lm, corrupted)
    with hooks(lm, fns), torch.no_grad():
        return lm.stack.logits(ids)


@dataclass
class PatchingResult:
    point: str                 # the short point key patched (e.g. "resid_pre")
    tokens: list[str]          # the corrupted prompt's tokens, one per column
    clean_tokens: list[str]
    answer: tuple[int, str]    # (id, text) the clean run predicts
    wrong: tuple[int, str]     # (id, text) it is measured against
    clean_diff: float          # logit(answer) - logit(wrong) at the last position, clean run
    corrupted_diff: float      # ... corrupted run
    logit_diff: np.ndarray     # (L, T) the same difference with (layer, position) patched
    restored: np.ndarray       # (L, T) (logit_diff - corrupted) / (clean - corrupted)

    def to_json(self) -> dict:
        return dict(point=self.point, tokens=self.tokens, clean_tokens=self.clean_tokens, answer=list(self.answer),
                    wrong=list(self.wrong), clean_diff=self.clean_diff, corrupted_diff=self.corrupted_diff,
                    logit_diff=self.logit_diff.tolist(), restored=self.restored.tolist())


def patching_sweep(lm: "LoadedModel", clean, corrupted, *, point: str = "resid_pre", answer: int | None = None,
                   wrong: int | None = None, on_layer: Callable[[int], None] | None = None) -> PatchingResult:
    """Patch each (layer, position) of ``point`` from the clean run into the corrupted one (module
    docstring). ``answer`` defaults to the clean run's top next token, ``wrong`` to the corrupted
    run's (its second best when both agree)."""
    if point not in PATCH_POINTS:
        raise LabError(f"Patching sweeps one of {', '.join(PATCH_POINTS)} (got '{point}').")
    c_ids, x_ids = as_ids(lm, clean)[:1], as_ids(lm, corrupted)[:1]
    if c_ids.shape[1] != x_ids.shape[1]:
        raise LabError(f"The clean prompt has {c_ids.shape[1]} tokens and the corrupted one {x_ids.shape[1]}; patching "
                       f"compares position by position, so make them the same number of tokens.")
    L, T = lm.stack.n_layer, c_ids.shape[1]
    names = [act_name(point, i) for i in range(L)]
    clean_logits, cache = run_with_cache(lm, c_ids, names)
    with torch.no_grad():
        corrupt_logits = lm.stack.logits(x_ids)
    c_last, x_last = clean_logits[0, -1].float(), corrupt_logits[0, -1].float()
    answer = int(c_last.argmax()) if answer is None else int(answer)
    if wrong is None:
        top2 = x_last.topk(2).indices.tolist()
        wrong = top2[1] if top2[0] == answer else top2[0]
    wrong = int(wrong)
    if answer == wrong:
        raise LabError("The answer and the wrong token are the same token; pick two different tokens to compare.")

    def diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[..., answer] - logits[..., wrong]).float()

    clean_diff, corrupted_diff = float(diff(c_last)), float(diff(x_last))
    grid = np.zeros((L, T), dtype=np.float32)
    batch = x_ids.expand(T, T)                                            # row p patches position p
    rows = torch.arange(T)
    for layer, name in enumerate(names):
        src = cache[name][0]                                             # (T, ...)

        def fn(t: torch.Tensor, hook: HookPoint, src=src) -> torch.Tensor:
            out = t.clone()
            out[rows, rows] = src.to(t.device, t.dtype)[rows]
            return out

        with hooks(lm, {name: fn}), torch.no_grad():
            logits = lm.stack.logits(batch, last_only=True)[:, -1]       # (T, V)
        grid[layer] = diff(logits).cpu().numpy()
        if on_layer is not None:
            on_layer(layer)
    gap = clean_diff - corrupted_diff
    restored = (grid - corrupted_diff) / gap if abs(gap) > 1e-9 else np.full_like(grid, np.nan)
    tok = lm.tokenizer
    return PatchingResult(point=point, tokens=[tok.token_str(int(i)) for i in x_ids[0]],
                          clean_tokens=[tok.token_str(int(i)) for i in c_ids[0]],
                          answer=(answer, tok.token_str(answer)), wrong=(wrong, tok.token_str(wrong)),
                          clean_diff=clean_diff, corrupted_diff=corrupted_diff, logit_diff=grid,
                          restored=restored.astype(np.float32))
