"""How a training step's gradients become an update: clip and step after backward, or, for an
optimizer that updates inside backward (``optim.inbackward``), open the step before backward and
close it after."""
from __future__ import annotations

import math

import torch

from freezeasguard.engine.errors import TrainingError


def check_setup(optimizer, *, world: int, grad_accum: int) -> None:
    """Refuse what in-backward updates cannot do (see ``optim.inbackward``)."""
    if not getattr(optimizer, "in_backward", False):
        return
    if world > 1:
        raise TrainingError("train.update_in_backward does not run under DDP (the reducer averages gradients "
                            "after the in-backward updates); use it on one process, or turn it off")
    if grad_accum != 1:
        raise TrainingError("train.update_in_backward needs train.grad_accum=1 (each tensor is updated from "
                            "its first gradient)")


def before_backward(optimizer, loss: torch.Tensor, step: int) -> None:
    """In-backward updates: refuse a non-finite loss while nothing is written yet, then open the step."""
    if not getattr(optimizer, "in_backward", False):
        return
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"loss is {value} at step {step}: nothing was updated; lower train.lr, enable "
                            "clipping, or check the data")
    optimizer.begin_step()


def apply_update(optimizer, trainable: list[torch.nn.Parameter], max_grad_norm: float | None, *,
                 step: int, loss: float) -> float:
    """Clip and step (or close an in-backward step); returns the global gradient norm. A non-finite
    norm is refused, before anything is written where the optimizer allows it."""
    if getattr(optimizer, "in_backward", False):
        gn = float(optimizer.finish_step())
        if not math.isfinite(gn):
            raise TrainingError(f"gradient norm is {gn} at step {step} (loss {loss:.4g}): the tensors updated in "
                                "backward before it keep their update; resume from the last checkpoint")
        return gn
    if hasattr(optimizer, "clip_grad_norm_"):  # flat buffer: one reduction, clip in-kernel
        gn = float(optimizer.clip_grad_norm_(max_grad_norm))
    elif max_grad_norm is not None:
        gn = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
    else:
        gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
    if not math.isfinite(gn):
        raise TrainingError(f"gradient norm is {gn} at step {step} (loss {loss:.4g}): nothing was "
                            "updated; lower train.lr, check the data, or use train.mixed_precision=fp32")
    optimizer.step()
    return gn
