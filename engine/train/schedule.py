"""The learning-rate schedule of a fine-tuning run, owned by the trainer.

torch's ``LambdaLR`` learns that an update happened by wrapping ``optimizer.step``; updates made
inside backward, by an optimizer's own method, or through a step replaced after the scheduler was
built never pass through that wrapper, and torch then warns on every run that the schedule was
stepped "before ``optimizer.step()``". The trainer knows when it updated, so it moves the schedule
itself: ``LRSchedule.step`` after each update, whatever the optimizer. Its state has LambdaLR's
``base_lrs`` and ``last_epoch``, so checkpoints written with either read with either.
"""
from __future__ import annotations

import math
from typing import Any

from freezeasguard.engine.config import TrainConfig
from freezeasguard.engine.errors import TrainingError


def lr_factor(step: int, tc: TrainConfig) -> float:
    """The learning rate of ``step`` (from 0) as a fraction of ``tc.lr``: linear warm-up over
    ``warmup_steps``, then constant, or a half cosine from 1 that reaches ``min_lr_ratio`` at step
    ``train.steps`` (one step past the last) and stays there if a run goes on."""
    warm = tc.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if tc.lr_schedule == "cosine":
        done = min(1.0, (step - warm) / max(1, tc.steps - warm))
        return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


class LRSchedule:
    """Sets every param group's ``lr`` to its initial lr times ``lr_factor`` of the next step.

    The factor multiplies the group's ``initial_lr`` (recorded once, as torch's schedulers do), so
    the values are the ones LambdaLR gives, bit for bit.
    """

    def __init__(self, optimizer, tc: TrainConfig):
        self.optimizer, self.tc = optimizer, tc
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = 0  # the step whose lr is in force (LambdaLR's name, kept for its state)
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.last_epoch, self.tc)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def get_last_lr(self) -> list[float]:
        """The lr of each param group for the step about to run."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        """After an update: the next step's lr."""
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = list(state["base_lrs"])
        if len(base) != len(self.optimizer.param_groups):
            raise TrainingError(f"the schedule's state has {len(base)} param group(s), the optimizer "
                                f"{len(self.optimizer.param_groups)}")
        self.base_lrs, self.last_epoch = base, int(state["last_epoch"])
        self._apply()
