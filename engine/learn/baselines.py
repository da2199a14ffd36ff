"""Baseline masks at the learned mask's exact budget, to compare the learned mask against.

* ``random``: a seeded random set (``FreezeMask.random``).
* ``magnitude``: the tensors the fine-tuning moved most, relative to their size:
  ``RMS(theta_pre - theta_ft) / max(RMS(theta_pre), floor)`` per tensor, with
  ``floor = 1e-3 * RMS(theta_pre over all tensors)`` so that zero-initialised tensors (biases,
  zero-init output convs) do not divide by zero and win by default.
* ``saliency``: one-shot first-order saliency, no loop: the mask gradient of the publisher's data
  objective ``U = -L_illegal + lambda L_innocent`` at ``m = 1/2`` (every tensor half frozen),
  summed over a few batches. Freezing tensor i fully (m_i: 1/2 -> 1) changes U by about
  ``dU/dm_i / 2``, so the score is ``-dU/dm_i``: the larger, the more freezing it helps.

All three go through ``FreezeMask.from_scores``/``random``, so budgets are exact by tensors or by
parameters exactly as for the learned mask.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.learn.learner import MaskLearner

BASELINES = ("random", "magnitude", "saliency")


def random_mask(shapes: Mapping[str, tuple[int, ...]], budget: float, by: str, seed: int = 0) -> FreezeMask:
    return FreezeMask.random(dict(shapes), budget, by, seed)


@torch.no_grad()
def magnitude_scores(theta_pre: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor],
                     floor: float = 1e-3) -> dict[str, float]:
    """Relative RMS change of each tensor (see the module docstring), by name."""
    sq_pre, n_all = 0.0, 0
    rms_d, rms_pre = {}, {}
    for n, p in theta_pre.items():
        p64 = p.detach().double()
        d = p64 - theta_ft[n].detach().double()
        s = float((p64 * p64).sum())
        sq_pre, n_all = sq_pre + s, n_all + p.numel()
        rms_pre[n] = math.sqrt(s / p.numel())
        rms_d[n] = math.sqrt(float((d * d).sum()) / p.numel())
    eps = floor * math.sqrt(sq_pre / max(n_all, 1))
    return {n: rms_d[n] / max(rms_pre[n], eps, 1e-30) for n in theta_pre}


def magnitude_mask(theta_pre: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor],
                   budget: float, by: str) -> FreezeMask:
    shapes = {n: tuple(t.shape) for n, t in theta_pre.items()}
    return FreezeMask.from_scores(shapes, magnitude_scores(theta_pre, theta_ft), budget, by)


def saliency_scores(learner: MaskLearner, batches: int = 4) -> dict[str, float]:
    """``-dU/dm`` at m = 1/2 summed over the global batches of steps ``0..batches-1``, by name.

    The learner's logits and theta are restored afterwards; its optimizers are not touched.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    saved = learner.logits.detach().clone()
    with torch.no_grad():
        learner.logits.zero_()  # m = sigmoid(0) = 1/2
    learner.refresh_theta()
    try:
        total = sum(learner.mask_gradient(s) for s in range(batches))
    finally:
        with torch.no_grad():
            learner.logits.copy_(saved)
        learner.refresh_theta()
    score = (-total).cpu().tolist()
    idx = learner.layout.index()
    return {n: score[idx[n]] for n in learner.layout.model_names}


def saliency_mask(learner: MaskLearner, budget: float, by: str, batches: int = 4) -> FreezeMask:
    shapes = {n: tuple(t.shape) for n, t in learner.base_state().items()}
    return FreezeMask.from_scores(shapes, saliency_scores(learner, batches), budget, by)


def baseline_masks(learner: MaskLearner, budget: float | None = None, by: str | None = None,
                   seed: int = 0, saliency_batches: int = 4) -> dict[str, FreezeMask]:
    """The three baselines for a learner's base/fine-tuned weights, at its budget by default."""
    budget = learner.cfg.mask.budget if budget is None else budget
    by = by or learner.cfg.mask.budget_by
    base = learner.base_state()
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    return {"random": random_mask(shapes, budget, by, seed),
            "magnitude": magnitude_mask(base, learner.finetuned_state(), budget, by),
            "saliency": saliency_mask(learner, budget, by, saliency_batches)}
