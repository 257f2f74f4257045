"""The one learning-rate schedule: linear warmup, then cosine decay (the verifier's training and the offline pairs')."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, warmup_fraction: float, *, peak: float = 1.0, floor: float = 0.0,
                  clock: float = 0.0, min_warmup: int = 0) -> float:
    """The learning rate at `step` of `steps`: linear warmup to `peak` over the first `warmup_fraction` of the steps
    (at least `min_warmup` of them), then cosine decay to `floor` x peak. `clock` (the share of a time budget spent,
    0 without one) moves the decay on when it is further along than the step count, so a run cut by its time
    budget still ends at the low learning rate."""
    warmup = max(min_warmup, int(steps * warmup_fraction))
    if step < warmup and clock < warmup_fraction:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, steps - warmup), clock)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


__all__ = ["warmup_cosine"]
