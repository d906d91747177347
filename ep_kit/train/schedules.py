"""Learning-rate schedules of ``EPKitModule`` (``model.lr_scheduler`` in YAML, chosen by ``class_path``).

A schedule here is a :class:`torch.optim.lr_scheduler.LRScheduler` whose length is the run's: the
module builds it in ``configure_optimizers`` as ``lr_scheduler(optimizer, num_training_steps=N)``,
with ``N`` the optimizer steps the trainer will take (:class:`LRScheduleCallable`). Its other
arguments come from the config, e.g.::

    model:
      lr_scheduler:
        class_path: ep_kit.train.schedules.WarmupCosine
        init_args: {warmup_ratio: 0.05, min_lr_ratio: 0.0}

Lightning steps it after every optimizer step (``interval: step``).
"""

from __future__ import annotations

import math
from typing import Protocol

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class LRScheduleCallable(Protocol):
    """Builds the schedule of one run: ``(optimizer, num_training_steps) -> LRScheduler``.

    Lightning's ``LRSchedulerCallable`` with the run's optimizer-step count passed in by the module, so
    a schedule given as a fraction of the run (warm-up ratio, decay to the end) needs no step count in
    the config. In YAML, any ``LRScheduler`` class whose ``__init__`` takes ``optimizer`` and
    ``num_training_steps`` (both filled in by the module) and typed keyword arguments.
    """

    def __call__(self, optimizer: Optimizer, num_training_steps: int) -> LRScheduler: ...


def warmup_cosine_factor(step: int, num_training_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over the first ``ceil(warmup_ratio * num_training_steps)`` steps, reaching the peak
    at the last warm-up step (``(step + 1) / warmup``); then a half cosine from 1 down to
    ``min_lr_ratio`` at ``num_training_steps``, held there beyond. ``min_lr_ratio=1`` is a constant
    learning rate after the warm-up.
    """
    warmup = math.ceil(warmup_ratio * num_training_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """The paper's schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak.

    The peak is each parameter group's ``lr`` as the optimizer was built. Per step the learning rate is
    ``lr * warmup_cosine_factor(step, ...)`` (:func:`warmup_cosine_factor`).

    Args:
        optimizer: the optimizer whose learning rate is scheduled (given by the module).
        num_training_steps: optimizer steps of the whole run (given by the module).
        warmup_ratio: fraction of the steps with linear warm-up, in ``[0, 1)`` (paper 5%).
        min_lr_ratio: floor of the cosine as a fraction of the peak, in ``[0, 1]``; 1 = constant after
            the warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_training_steps: int,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if int(num_training_steps) < 1:
            raise ValueError(f"WarmupCosine.num_training_steps must be >= 1, got {num_training_steps}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"WarmupCosine.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosine.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.num_training_steps = int(num_training_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step``."""
        return warmup_cosine_factor(step, self.num_training_steps, self.warmup_ratio, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
