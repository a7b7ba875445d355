"""Read and rewrite any named activation of any walk: ``hooks``, ``run_with_cache``, ``hook_names``.

Names are TransformerLens's (``blocks.3.attn.hook_z``, ``blocks.3.hook_mlp_out``, ...), the same
tensor in every family (see :mod:`core.models.hooks`). A hook is ``fn(tensor, hook) -> tensor | None``
as in TransformerLens (``hook.name``, ``hook.layer``): return a replacement, or None to leave the
tensor as it is (after reading it, or editing it in place).

Hooks belong to the context that set them (:mod:`core.models.hookpoints`), never to the model, so
two app sessions sharing one loaded model never see each other's; they are undone when the ``with``
block ends, however it ends. Every walk in the block sees them: generation (with its KV cache, a
decoded token passes each point as a ``T = 1`` slice), consensus, the logit lens, transcoder work.
"""
from __future__ import annotations

from contextlib import contextmanager
from difflib import get_close_matches
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import LabError
from ..models.hookpoints import HookFn, HookPoint, hooks_active, run_hooked  # noqa: F401 (re-exported)
from ..models.hooks import act_name

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

BLOCK_POINTS = ("resid_pre", "ln1_normalized", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_in",
                "ln2_normalized", "mlp_post", "mlp_out", "resid_post")   # in the order a block passes them


def hook_names(lm: "LoadedModel") -> list[str]:
    """Every point a walk of ``lm`` passes, in walk order: ``hook_embed``, ``hook_pos_embed`` (when
    positions are learned), each block's points, ``ln_final.hook_normalized``."""
    st = lm.stack
    names = [act_name("embed")]
    if getattr(st, "wpe", None) is not None:
        names.append(act_name("pos_embed"))
    for i in range(st.n_layer):
        names += [act_name(p, i) for p in BLOCK_POINTS if p != "mlp_post" or st._mlp_parts(i) is not None]
    return names + [act_name("ln_final_normalized")]


def check_names(lm: "LoadedModel", names: Iterable[str]) -> None:
    """Raise :class:`LabError` for a name no walk of ``lm`` passes, suggesting the nearest ones."""
    names = list(names)
    if not names:
        return
    known = hook_names(lm)
    allowed = set(known)
    for name in names:
        if name not in allowed:
            near = get_close_matches(str(name), known, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else f"; known points look like {known[2]}."
            raise LabError(f"{lm.name} has no activation point '{name}'{hint}")


def _as_fns(fns: Mapping[str, HookFn | Sequence[HookFn]]) -> dict[str, tuple[HookFn, ...]]:
    out = {}
    for name, f in fns.items():
        out[name] = tuple(f) if isinstance(f, (list, tuple)) else (f,)
        if not all(callable(g) for g in out[name]):
            raise TypeError(f"The hook for {name} must be a function fn(tensor, hook).")
    return out


@contextmanager
def hooks(lm: "LoadedModel", fns: Mapping[str, HookFn | Sequence[HookFn]]) -> Iterator[None]:
    """Within the block, every walk runs ``fns[name]`` at point ``name`` (one function or a list).

    Names are checked against ``lm`` first. Nested blocks add up (the outer block's functions run
    first). Do not hold the block open across the ``yield`` of a generator other code iterates: use
    :func:`hooked` to wrap such a generator instead."""
    fns = _as_fns(fns)
    check_names(lm, fns)
    with hooks_active(fns):
        yield


def hooked(lm: "LoadedModel", fns: Mapping[str, HookFn | Sequence[HookFn]], events: Iterator) -> Iterator:
    """The generator ``events`` (a generation or consensus stream) with ``fns`` active while it computes,
    and only then (see :func:`core.models.hookpoints.run_hooked`)."""
    fns = _as_fns(fns)
    check_names(lm, fns)
    return run_hooked(fns, events)


class ActivationCache(dict):
    """Activations by name; ``cache["z", 3]`` is ``cache["blocks.3.attn.hook_z"]`` as in
    TransformerLens (short keys are :data:`core.models.hooks.ACT_NAMES`'s)."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key = act_name(*key)
        elif key not in self and key in ("embed", "pos_embed", "ln_final_normalized"):
            key = act_name(key)
        return super().__getitem__(key)


def as_ids(lm: "LoadedModel", tokens) -> torch.Tensor:
    """``(B, T)`` token ids on the model's device from text, a list of ids, a list of lists, or a tensor."""
    if isinstance(tokens, str):
        if not tokens.strip():
            raise LabError("The prompt is empty; type some text.")
        ids = lm.tokenizer.encode(tokens)
        if not ids:
            raise LabError("The prompt encodes to no tokens; type some text.")
        tokens = [ids]
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise LabError(f"Tokens must be a text, a list of ids or a (batch, positions) array (got shape {tuple(t.shape)}).")
    if t.shape[1] > lm.stack.context_length:
        raise LabError(f"The prompt is {t.shape[1]} tokens but {lm.name}'s context is {lm.stack.context_length}; "
                       f"shorten it.")
    return t.to(lm.stack.device)


def run_with_cache(lm: "LoadedModel", tokens, names: Iterable[str] | str | Callable[[str], bool] | None = None,
                   *, fns: Mapping[str, HookFn | Sequence[HookFn]] | None = None
                   ) -> tuple[torch.Tensor, ActivationCache]:
    """``(logits (B, T, V), cache)``: one forward over ``tokens`` keeping the activations ``names``
    (a list, one name, a filter ``name -> bool``, or None for every point of :func:`hook_names`).

    Only the points asked for are exposed (the attention pattern is computed only when asked).
    ``fns`` are hooks to run during the same walk (they run before the cache reads a point, so the
    cache holds what the model actually used)."""
    known = hook_names(lm)
    if names is None:
        wanted = known
    elif callable(names):
        wanted = [n for n in known if names(n)]
    else:
        wanted = [names] if isinstance(names, str) else list(names)
        check_names(lm, wanted)
    ids = as_ids(lm, tokens)
    cache = ActivationCache()

    def keep(t: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = t.detach()

    with hooks(lm, fns or {}), hooks(lm, {n: keep for n in wanted}), torch.no_grad():
        logits = lm.stack.logits(ids)
    return logits, cache


def run_with_hooks(lm: "LoadedModel", tokens, fns: Mapping[str, HookFn | Sequence[HookFn]]) -> torch.Tensor:
    """Logits ``(B, T, V)`` of one forward over ``tokens`` with ``fns`` active."""
    ids = as_ids(lm, tokens)
    with hooks(lm, fns), torch.no_grad():
        return lm.stack.logits(ids)
