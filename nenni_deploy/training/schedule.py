"""Learning rate as a pure function of the global step, so a resumed run lands on exactly the same value."""

from __future__ import annotations

import math

PIECEWISE_MILESTONES = (0.5, 0.75)  # fractions of the run after which the rate drops 10x
PIECEWISE_FACTOR = 0.1


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0) -> float:
    """The rate for optimiser step `step` (0-based) of `total_steps`.

    Warm-up rises linearly to `base_lr` over `warmup_steps`; the schedule then runs over the remaining steps
    (cosine reaches 0 just after the last step, piecewise drops at 50 % and 75 % of the whole run).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "piecewise":
        passed = sum(step >= math.floor(m * total_steps) for m in PIECEWISE_MILESTONES)
        return base_lr * PIECEWISE_FACTOR**passed
    raise ValueError(f"unknown schedule {schedule!r}")
