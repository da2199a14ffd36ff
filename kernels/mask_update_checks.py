"""Argument checks of the fused mask-learning step (``mask_update.bilevel_step_``).

Kept apart from the kernel so that its file holds the kernel, its launcher and its reference; the
checks run before dispatch, so either implementation refuses the same inputs with the same error.
"""
from __future__ import annotations

import torch

from freezeasguard.kernels._triton import flat_buffer_problem

__all__ = ["MaskUpdateInputError", "check_flat", "validate"]


class MaskUpdateInputError(ValueError):
    """The buffers or hyperparameters handed to the bilevel step are inconsistent."""


def check_flat(name: str, t: object, n: int | None, device: torch.device | None) -> None:
    if (why := flat_buffer_problem(name, t)) is not None:
        raise MaskUpdateInputError(why)
    if t.dtype != torch.float32:
        raise MaskUpdateInputError(f"{name} must be float32, got {t.dtype}")
    if n is not None and t.numel() != n:
        raise MaskUpdateInputError(f"{name} has {t.numel()} elements, expected {n}")
    if device is not None and t.device != device:
        raise MaskUpdateInputError(f"{name} is on {t.device}, theta is on {device}")


def validate(bufs: dict[str, torch.Tensor], keep: torch.Tensor, rows_per_tensor: torch.Tensor, *, chunk: int,
             lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decay_end: int,
             step: int, grad_scale: torch.Tensor | None, update: bool, scratch: torch.Tensor | None) -> None:
    """Refuse what would make the kernel read or write out of bounds, or step wrongly, before any
    buffer is touched; the step's hyperparameters are checked only when it updates."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise MaskUpdateInputError(f"chunk must be an int >= 1, got {chunk!r}")
    check_flat("theta", bufs["theta"], None, None)
    n, dev = bufs["theta"].numel(), bufs["theta"].device
    for name, t in bufs.items():
        check_flat(name, t, n, dev)
    if n == 0 or n % chunk:
        raise MaskUpdateInputError(f"buffers hold {n} elements, not a positive multiple of chunk={chunk} "
                                   "(build them with FlatLayout)")
    if len({t.data_ptr() for t in bufs.values()}) != len(bufs):
        raise MaskUpdateInputError("theta, theta_pre, theta_d, grad, exp_avg and exp_avg_sq must be distinct buffers")
    rows = n // chunk
    check_flat("keep", keep, rows, dev)
    if not isinstance(rows_per_tensor, torch.Tensor) or rows_per_tensor.dim() != 1 \
            or rows_per_tensor.dtype != torch.int64 or rows_per_tensor.device != dev:
        raise MaskUpdateInputError("rows_per_tensor must be a 1-D int64 tensor on the buffers' device "
                                   "(FlatLayout.rows_per_tensor)")
    # The sum needs the values: checked where that is free (a host sync on CUDA every step is not).
    if dev.type == "cpu" and int(rows_per_tensor.sum()) != rows:
        raise MaskUpdateInputError(f"rows_per_tensor sums to {int(rows_per_tensor.sum())}, the buffers have "
                                   f"{rows} rows of {chunk}")
    if scratch is not None:
        check_flat("scratch", scratch, n, dev)
    if grad_scale is not None:
        if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1:
            raise MaskUpdateInputError("grad_scale must be None or a 1-element tensor")
        if grad_scale.dtype != torch.float32 or grad_scale.device != dev:
            raise MaskUpdateInputError(f"grad_scale must be float32 on {dev} (read on the device, no host sync), "
                                       f"got {grad_scale.dtype} on {grad_scale.device}")
    if isinstance(decay_end, bool) or not isinstance(decay_end, int) or not 0 <= decay_end <= n:
        raise MaskUpdateInputError(f"decay_end must be an int in [0, {n}], got {decay_end!r}")
    if not update:
        return
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise MaskUpdateInputError(f"step must be an int >= 1 (the step being taken), got {step!r}")
    for name, x in (("lr", lr), ("weight_decay", weight_decay)):
        if not x >= 0.0:
            raise MaskUpdateInputError(f"{name} must be >= 0, got {x}")
    if not eps > 0.0:  # the zero padding between segments has v = 0: eps = 0 would make it 0/0
        raise MaskUpdateInputError(f"eps must be > 0, got {eps}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise MaskUpdateInputError(f"{name} must be in [0, 1), got {b}")
