"""Learning-rate schedules as pure functions of the step (no optimizer, no state).

The loop sets ``lr = schedule(step)`` on every parameter group before each optimizer step, so the
schedule's only state is the step count, which checkpoints already hold.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

__all__ = ["corenet_cosine", "warmup_decay", "pretrain_schedule"]


def corenet_cosine(
    step: int,
    *,
    warmup_iterations: int,
    max_iterations: int,
    warmup_init_lr: float,
    max_lr: float,
    min_lr: float,
) -> float:
    """CoreNet ``optims/scheduler/cosine.py`` (iteration based), the OpenELM pre-training schedule.

    Linear warm-up from ``warmup_init_lr`` at step 0 towards ``max_lr`` (reached at step
    ``warmup_iterations``), then cosine from ``max_lr`` to ``min_lr`` with period
    ``max_iterations - warmup_iterations + 1`` (so the last step is just above ``min_lr``).
    """
    if step < warmup_iterations:
        return warmup_init_lr + step * (max_lr - warmup_init_lr) / warmup_iterations
    t = step - warmup_iterations
    period = max_iterations - warmup_iterations + 1
    t = min(t, period)  # past the end: stay at min_lr rather than climbing back up
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * t / period))


def warmup_decay(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, kind: str = "cosine") -> float:
    """HF ``get_{cosine,linear,constant}_schedule_with_warmup`` (instruction tuning, Table 10).

    Warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine or linear decay to 0 at
    ``total_steps`` (or constant).
    """
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    if kind == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return peak_lr * (1.0 - progress)
    if kind == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {kind!r}")


def pretrain_schedule(pretrain_cfg) -> Callable[[int], float]:
    """The recipe's Table 9 schedule as ``step -> lr``."""
    return partial(
        corenet_cosine,
        warmup_iterations=pretrain_cfg.warmup_iterations,
        max_iterations=pretrain_cfg.max_iterations,
        warmup_init_lr=pretrain_cfg.warmup_init_lr,
        max_lr=pretrain_cfg.max_lr,
        min_lr=pretrain_cfg.min_lr,
    )
