"""What a consensus run will cost, said before it starts and again once its pace is known.

One estimate serves the Consensus page's caption under its Run button and the header of
``python -m core consensus``: :func:`estimate_run` (prompts, layer-steps, the memory the run
allocates against its budget, from :func:`~core.consensus.engine.memory_plan`) and its
:meth:`RunEstimate.caption`. Memory is known up front, and a run that cannot fit is refused before
it starts (``memory_plan``'s check). Time is not: it depends on the device, the model's width and
what else the machine runs, so it is measured: :func:`long_run_notice` turns the pace of a run's
first :data:`~core.consensus.config.PACE_SAMPLE_S` seconds into the time left, and the CLI prints
it, with how to stop or shrink the run, when that is more than
:data:`~core.consensus.config.LONG_RUN_S`. A long run is a researcher's choice, so it is said, not refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .config import LONG_RUN_S, ConsensusConfig
from ..errors import fmt_bytes

if TYPE_CHECKING:
    from ..models.loading import LoadedModel


@dataclass(frozen=True)
class RunEstimate:
    """A run's size before it starts: its prompts, the layer-steps each takes, its memory."""

    lengths: tuple[int, ...]       # tokens per prompt
    new_tokens: int                # consensus decoding: tokens generated per prompt (0: a plain run)
    batch: int                     # prompts of one length that run together
    layer_steps: int               # N iterations x L blocks: per prompt (per new token when decoding)
    memory: int                    # bytes the run allocates, all told (engine.MemoryPlan.total)
    budget: int                    # the memory budget it is checked against
    context: int                   # the model's context length

    def caption(self) -> str:
        """``2 prompts of 5–7 tokens · 80 layer-steps per prompt · needs about 1.2 MB (budget 2.0 GB) · context 256``."""
        lo, hi = min(self.lengths), max(self.lengths)
        span = f"{lo}" if lo == hi else f"{lo}–{hi}"
        batches = f" in batches of {self.batch}" if self.batch < len(self.lengths) else ""
        grow = f" + {self.new_tokens:,} new" if self.new_tokens else ""
        steps = self.layer_steps
        work = (f"{steps:,} layer-steps per new token ({steps * self.new_tokens:,} per prompt)" if self.new_tokens
                else f"{steps:,} layer-steps per prompt")
        prompts = f"{len(self.lengths)} prompt{'s' if len(self.lengths) != 1 else ''}"
        return (f"{prompts} of {span}{grow} tokens{batches} · {work} · needs about {fmt_bytes(self.memory)} "
                f"(budget {fmt_bytes(self.budget)}) · context {self.context}")


def estimate_run(lm: "LoadedModel", token_ids: Sequence[Sequence[int]], cfg: ConsensusConfig, new_tokens: int = 0,
                 texts: Sequence[str] = ()) -> RunEstimate:
    """The :class:`RunEstimate` of running ``cfg`` over prompts with these token ids (``texts``:
    the typed prompts, whose copies count towards the memory too)."""
    from .engine import memory_plan  # torch: loaded only when a model is

    plan = memory_plan(lm, token_ids, cfg, new_tokens, texts)
    return RunEstimate(lengths=tuple(len(t) for t in token_ids), new_tokens=int(new_tokens), batch=plan.batch,
                       layer_steps=int(cfg.iterations) * lm.stack.n_layer, memory=plan.total,
                       budget=int(cfg.memory_budget), context=lm.stack.context_length)


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 7 h``, ``31 years``: two units at most, for messages."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m = s // 60
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    if d < 365:
        return f"{d} d {h} h" if h else f"{d} d"
    return f"{d // 365:,} years"


def time_left(done: int, total: int, elapsed: float) -> float:
    """Seconds the rest of a run takes at the pace of its first ``done`` of ``total`` layer-steps,
    which took ``elapsed`` seconds."""
    return elapsed * (total - done) / max(done, 1)


def long_run_notice(done: int, total: int, elapsed: float, threshold: float = LONG_RUN_S,
                    unit: str = "layer-steps") -> str | None:
    """What to tell the user once ``done`` of ``total`` steps (``unit``) took ``elapsed`` seconds: the
    time the rest takes at that pace and how to stop or shrink the run, when the whole run takes
    more than ``threshold`` seconds; else None."""
    left = time_left(done, total, elapsed)
    if elapsed + left <= threshold:
        return None
    return (f"This run takes about {fmt_duration(left)} more at the pace of its first {fmt_duration(elapsed)} "
            f"({done:,} of {total:,} {unit}). Ctrl-C stops it and keeps what was computed (the run folder "
            f"and the files asked for); a smaller --size or fewer prompts shorten it.")


__all__ = ["RunEstimate", "estimate_run", "fmt_duration", "time_left", "long_run_notice"]
