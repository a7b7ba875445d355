"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The rate is a pure function of the step, so a resumed run needs nothing but the step count to
land on the same schedule.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup climbs linearly to ``base_lr`` over the first ``warmup_steps`` steps (step 0 already
    gets ``base_lr / warmup_steps``, never 0); cosine then falls to ``base_lr * min_ratio`` at
    the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    floor = base_lr * min_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - floor)
