"""AdamW moment storage over the flat trainable buffer: fp32, bf16 or 8-bit blockwise.

The kind decides what ``FlatAdamW`` keeps per trainable element besides its fp32 master weight,
and which kernel steps a range of the buffer:

    kind   state tensors                                    bytes / element   kernel
    fp32   exp_avg, exp_avg_sq (fp32)                       8                 kernels.adamw
    bf16   exp_avg, exp_avg_sq (bf16, stochastic rounding)  4                 kernels.adamw_bf16
    8bit   q_m, q_v (8-bit codes) + absmax_m, absmax_v      2 + 8 / block     kernels.adamw_8bit
           (fp32, one per ``BLOCK`` elements)

8-bit blocks are local to the range a kernel call is handed, so every range the optimizer steps
(a tensor, a lock chunk, the rest of the buffer) starts on a block boundary: ``alignment(kind)``
is the multiple the buffer pads each tensor's segment to (a few hundred zero elements per tensor:
zero weight, zero gradient and zero moments stay zero under AdamW).
"""
from __future__ import annotations

import torch

from freezeasguard.kernels.adamw import fused_adamw_
from freezeasguard.kernels.adamw_8bit import adamw_8bit_, new_8bit_states
from freezeasguard.kernels.adamw_bf16 import adamw_bf16_states_
from freezeasguard.kernels.adamw_lowp import MOMENT_BYTES
from freezeasguard.kernels.choices import ADAMW_BACKENDS, BACKENDS, STATE_KINDS

BLOCK = 256  # elements per 8-bit block (one fp32 absmax per moment per block)


def check_kind(kind: str) -> str:
    if kind not in STATE_KINDS:
        raise ValueError(f"optimizer state kind must be one of {STATE_KINDS}, got {kind!r}")
    return kind


def backend_choices(kind: str) -> tuple[tuple[str, ...], str]:
    """(the backends the kind's kernel accepts, its eager form for 'auto' off CUDA).

    torch's fused AdamW keeps fp32 moments only, so it is the eager form of fp32 moments alone
    (vectorised, unlike the reference); the compact kinds run their pure-torch reference.
    """
    return (ADAMW_BACKENDS, "torch_fused") if check_kind(kind) == "fp32" else (BACKENDS, "torch")


def alignment(kind: str) -> int:
    """Elements each tensor's segment of the flat buffer is padded to."""
    return BLOCK if check_kind(kind) == "8bit" else 1


def new_states(kind: str, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed moments for an ``n``-element buffer (what AdamW starts from)."""
    if check_kind(kind) == "fp32":
        return {"exp_avg": torch.zeros(n, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=device)}
    if kind == "bf16":
        return {k: torch.zeros(n, dtype=torch.bfloat16, device=device) for k in ("exp_avg", "exp_avg_sq")}
    return new_8bit_states(n, BLOCK, device)


def state_bytes(kind: str, n: int) -> int:
    """Bytes ``new_states(kind, n)`` allocates, counted without allocating (the memory plan's)."""
    return 2 * MOMENT_BYTES[check_kind(kind)] * n + (8 * -(-n // BLOCK) if kind == "8bit" else 0)


def step_range_(kind: str, st: dict, flat: torch.Tensor, grad: torch.Tensor, lo: int, hi: int, *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, decay_end: int, step: int,
                grad_scale: torch.Tensor | None, backend: str, seed: int) -> None:
    """One AdamW step of ``flat[lo:hi]`` with gradient ``grad`` (``hi - lo`` elements) and the
    matching moments; elements before ``decay_end`` (buffer offsets) get weight decay. ``backend``
    is one of ``backend_choices(kind)``."""
    hp = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
              decay_end=min(max(decay_end - lo, 0), hi - lo), step=step, grad_scale=grad_scale)
    if kind == "fp32":
        fused_adamw_(flat[lo:hi], grad, st["exp_avg"][lo:hi], st["exp_avg_sq"][lo:hi], backend=backend, **hp)
    elif kind == "bf16":
        adamw_bf16_states_(flat[lo:hi], grad, st["exp_avg"][lo:hi], st["exp_avg_sq"][lo:hi], seed=seed, offset=lo,
                           backend=backend, **hp)
    else:
        if lo % BLOCK:
            raise ValueError(f"8-bit state ranges must start on a {BLOCK}-element block, got offset {lo}")
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        adamw_8bit_(flat[lo:hi], grad, st["q_m"][lo:hi], st["q_v"][lo:hi], st["absmax_m"][b0:b1],
                    st["absmax_v"][b0:b1], block_size=BLOCK, backend=backend, **hp)

