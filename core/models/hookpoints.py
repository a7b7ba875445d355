"""The hooks a walk runs at its named activation points, held per context, never on the model.

The layer-stack adapter passes every activation through :meth:`LayerStack._at`; that method asks
:func:`active_hooks` whether anything in the *current context* wants the point. The answer lives in
a :class:`contextvars.ContextVar`, not on the (shared) model: the app serves every browser session
from one loaded model, each session's script runs in its own thread, and a new thread starts with
an empty context, so one session's ablation can never reach another session's walk.

With nothing active, ``_at`` costs one ``ContextVar.get`` per point; points that need extra work to
expose (per-head q/k/v/z in TransformerLens's layout, the attention pattern, which needs the explicit
softmax instead of fused attention, the MLP's hidden activation) are only computed when a hook asks
for them by name.

The user-facing API (``hooks(lm, {...})``, ``run_with_cache``, ablation, patching, steering) is
:mod:`core.interventions`; this module only holds the per-context state the walk reads.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .hooks import act_name


@dataclass(frozen=True)
class HookPoint:
    """What a hook function is told about the point it runs at (TransformerLens passes ``hook``
    with a ``.name`` the same way): ``fn(tensor, hook) -> tensor | None``."""

    name: str
    layer: int | None


HookFn = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]


class ActiveHooks:
    """Hook functions by point name, as one context sees them (nested contexts are merged: the
    outer context's functions run first)."""

    __slots__ = ("fns",)

    def __init__(self, fns: Mapping[str, Sequence[HookFn]]):
        self.fns = {name: tuple(f) for name, f in fns.items() if f}

    def wants(self, name: str) -> bool:
        return name in self.fns

    def merged(self, other: Mapping[str, Sequence[HookFn]]) -> "ActiveHooks":
        out = dict(self.fns)
        for name, f in other.items():
            out[name] = tuple(out.get(name, ())) + tuple(f)
        return ActiveHooks(out)

    def run(self, name: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        """Each function in turn; one that returns None has read (or edited ``t`` in place)."""
        point = HookPoint(name, layer)
        for fn in self.fns[name]:
            out = fn(t, point)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != t.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"A hook at {name} must return None or a tensor of shape {tuple(t.shape)} "
                                     f"(got {got}).")
                t = out
        return t


_ACTIVE: ContextVar[ActiveHooks | None] = ContextVar("gptlab_active_hooks", default=None)
_NAMES: dict[tuple[str, int | None], str] = {}


def active_hooks() -> ActiveHooks | None:
    """The hooks of the current context, or None (the common, free case)."""
    return _ACTIVE.get()


def point_name(point: str, layer: int | None) -> str:
    """``act_name(point, layer)``, memoised: a hooked walk names every point it passes."""
    key = (point, layer)
    name = _NAMES.get(key)
    if name is None:
        name = _NAMES[key] = act_name(point, layer)
    return name


@contextmanager
def hooks_active(fns: Mapping[str, Sequence[HookFn]]) -> Iterator[ActiveHooks]:
    """Run ``fns`` at their points in every walk of this context until the block ends, however
    it ends (an error, a Stop, a closed generator)."""
    current = _ACTIVE.get()
    merged = current.merged(fns) if current is not None else ActiveHooks(fns)
    token = _ACTIVE.set(merged)
    try:
        yield merged
    finally:
        try:
            _ACTIVE.reset(token)
        except ValueError:  # exited from another context (a generator finished elsewhere)
            _ACTIVE.set(current)


def run_hooked(fns: Mapping[str, Sequence[HookFn]], events: Iterator) -> Iterator:
    """Iterate the generator ``events`` with ``fns`` active only while it computes.

    A ``with`` block around ``yield`` would keep the hooks set in the *consumer's* context while
    the generator is paused (generators share their caller's context), so the consumer's own walks
    would see them; here they are set and reset around every step, and closing this generator
    closes ``events`` with the hooks active, so its clean-up runs under the same hooks."""
    try:
        while True:
            with hooks_active(fns):
                try:
                    event = next(events)
                except StopIteration as stop:
                    return stop.value
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            with hooks_active(fns):
                close()
