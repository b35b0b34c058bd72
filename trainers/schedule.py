"""Learning-rate schedule: mmdetection 2.x's linear warm-up followed by step decay.

The lr is a pure function of the iteration, so resuming needs no scheduler state:
``lr(i) = base · warmup(i) · gamma ** (number of steps ≤ i)``, with
``warmup(i) = 1 − (1 − ratio) · (1 − i / warmup_iters)`` for ``i < warmup_iters``
(mmcv's ``LrUpdaterHook`` 'linear' warm-up, counted from iteration 0).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class StepSchedule:
    base_lr: float
    total_iters: int
    step_iters: tuple[int, ...]  # iterations (0-based) from which the next decay applies
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001

    def lr_at(self, iteration: int) -> float:
        """The lr used for the update of 0-based ``iteration``."""
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.step_iters, iteration)
        if iteration < self.warmup_iters:
            lr *= 1 - (1 - self.warmup_ratio) * (1 - iteration / self.warmup_iters)
        return lr


def build_schedule(schedule, base_lr: float, iters_per_epoch: int) -> StepSchedule:
    """Turn the config's schedule (a ``trainers.config.ScheduleConfig``, in epochs or
    iterations) into iteration counts."""
    if schedule.unit == "epoch":
        total = schedule.epochs * iters_per_epoch
        steps = tuple(step * iters_per_epoch for step in schedule.steps)
    else:
        total = schedule.max_iters
        steps = tuple(schedule.steps)
    return StepSchedule(base_lr=base_lr, total_iters=total, step_iters=tuple(sorted(steps)),
                        gamma=schedule.gamma, warmup_iters=schedule.warmup_iters,
                        warmup_ratio=schedule.warmup_ratio)
