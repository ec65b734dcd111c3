"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay.

A plain multiplier function for ``torch.optim.lr_scheduler.LambdaLR``, so the scheduler's
state is just its step counter and resumes exactly.
"""

from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(schedule: str, warmup_steps: int, max_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """``step -> factor`` of the peak lr: ``(step+1)/warmup`` during warmup, then decay
    from 1 to ``floor`` at ``max_steps`` (cosine or linear) or stay at 1 (constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        raise ValueError(f"unknown schedule {schedule!r}")

    return factor
