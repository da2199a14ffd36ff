"""AdamW over the engine's flat trainable buffer, in one kernel launch.

What is fused: gradient scaling (global clip coefficient, read from device memory), decoupled
weight decay on the prefix ``[0, decay_end)``, both moment updates, bias correction and the
parameter update, for every trainable element of the model, in ONE launch. Frozen tensors are
absent from the buffer, so they cost nothing; the step's time scales with the trainable count.

Per element the kernel reads p, g, m, v and writes p, m, v (m, v always fp32):

    param   grad   | read p + g + m + v | write p + m + v | bytes / element
    fp32    fp32   |   4  + 4 + 4 + 4   |   4  + 4 + 4    |      28
    fp32    bf16/16|   4  + 2 + 4 + 4   |   4  + 4 + 4    |      26
    bf16/16 fp32   |   2  + 4 + 4 + 4   |   2  + 4 + 4    |      24
    bf16/16 bf16/16|   2  + 2 + 4 + 4   |   2  + 4 + 4    |      22

(``bytes_per_element`` computes it.) The grad-scale scalar and the per-launch arguments are
O(1). The eager reference moves each buffer several times (one pass per torch op), which is
why fusing pays even though the math is trivial: the step is purely bandwidth-bound.

Math (torch.optim.AdamW, ``amsgrad=False``, ``maximize=False``), all in fp32:

    g  = g * grad_scale                       (grad_scale: device scalar, default 1)
    p *= 1 - lr * wd                          (only for i < decay_end)
    m  = lerp(m, g, 1 - b1)
    v  = b2 * v + (1 - b2) * g * g
    p += -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - b_k ** step

The scalars are formed on the host in double precision and rounded once to fp32, as torch does
when it passes a Python scalar to a float tensor op. Division and square root use the
correctly rounded forms (``div_rn``, ``sqrt_rn``) so the CUDA kernel matches the eager
reference to a few ulp instead of the ~2 ulp of the fast approximations; the step is memory
bound, so the extra ALU work is free.
"""
from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as torch_adamw

from freezeasguard.kernels._triton import HAS_TRITON, flat_buffer_problem, interpreting, next_pow2, resolve_backend
from freezeasguard.kernels.choices import ADAMW_BACKENDS, AdamWBackend

__all__ = [
    "AdamWInputError",
    "adamw_ref_",
    "fused_adamw_",
    "adamw_launches",
    "bytes_per_element",
    "launch_config",
    "global_grad_norm",
    "clip_coef",
]

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32

_CUDA_BLOCK = 1024  # 8 fp32 per thread at 4 warps: two 16-byte loads per buffer per thread
_CUDA_WARPS = 4
_INTERP_BLOCK = 1 << 16  # the interpreter pays per program, not per element: few, big blocks
_INT32_LIMIT = 2**31


class AdamWInputError(ValueError):
    """The buffers or hyperparameters handed to the AdamW step are inconsistent."""


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        scale_ptr,
        n,
        decay_end,
        decay_factor,  # 1 - lr * wd
        w1,  # 1 - b1 (lerp weight)
        beta2,
        one_minus_beta2,
        bc2_sqrt,  # sqrt(1 - b2 ** step)
        neg_step_size,  # -lr / (1 - b1 ** step)
        eps,
        HAS_SCALE: tl.constexpr,
        LERP_FROM_END: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INT64:  # pid * BLOCK overflows int32 once n reaches 2**31
            start = pid.to(tl.int64) * BLOCK
        else:
            start = pid * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n

        # Low-precision loads are upcast before any arithmetic (the interpreter's bf16 math is
        # wrong, and fp32 math is what torch's AdamW does for fp32 master weights anyway).
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)

        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        p = tl.where(offs < decay_end, p * decay_factor, p)
        # torch's lerp picks the formula by |weight| < 0.5 for accuracy; mirror it.
        if LERP_FROM_END:
            m = g - (g - m) * (1.0 - w1)
        else:
            m = m + w1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def launch_config(n: int, device: torch.device) -> tuple[int, int, bool]:
    """Deterministic launch shape for an ``n``-element buffer (no autotuning).

    Returns:
        ``(BLOCK, num_warps, int64_offsets)``. Under the interpreter the block grows with n (up
        to 2**16) because its cost is per program; on CUDA it is fixed.
    """
    if device.type == "cuda" and not interpreting():
        block, warps = _CUDA_BLOCK, _CUDA_WARPS
    else:
        block, warps = min(_INTERP_BLOCK, next_pow2(max(n, 1))), 1
    # The last program's offsets reach ceil(n / BLOCK) * BLOCK - 1.
    int64 = math.ceil(n / block) * block >= _INT32_LIMIT
    return block, warps, int64


def bytes_per_element(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> int:
    """HBM bytes one fused step moves per element: read p, g, m, v; write p, m, v."""
    return 2 * param_dtype.itemsize + grad_dtype.itemsize + 4 * STATE_DTYPE.itemsize


def adamw_launches(n: int, backend: str) -> int | None:
    """Kernel launches of one step over an ``n``-element buffer with a resolved backend.

    Returns:
        1 for 'triton' (0 when n == 0); None for 'torch', whose eager op count depends on the
        dtypes and on whether a decay prefix and a grad scale are present.
    """
    if backend == "triton":
        return 1 if n > 0 else 0
    if backend == "torch":
        return None
    raise ValueError(f"unknown resolved backend {backend!r}; expected 'triton' or 'torch'")


@torch.no_grad()
def adamw_ref_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_end: int,
    step: int,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Eager AdamW step over flat buffers, in place, op for op as torch.optim.AdamW.

    Low-precision params/grads are upcast to fp32, updated, and rounded back on store.
    """
    p = param if param.dtype == torch.float32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if grad_scale is not None:
        g = g * grad_scale.to(torch.float32)
    if weight_decay != 0 and decay_end > 0:
        p[:decay_end].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


def _validate(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_end: int,
    step: int,
    grad_scale: torch.Tensor | None,
) -> None:
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in named.items():
        if (why := flat_buffer_problem(name, t)) is not None:
            raise AdamWInputError(why)
    n = param.numel()
    for name, t in named.items():
        if t.numel() != n:
            raise AdamWInputError(f"{name} has {t.numel()} elements, param has {n}")
        if t.device != param.device:
            raise AdamWInputError(f"{name} is on {t.device}, param is on {param.device}")
    if param.dtype not in PARAM_DTYPES:
        raise AdamWInputError(f"param dtype {param.dtype} not supported; use one of {PARAM_DTYPES}")
    if grad.dtype not in GRAD_DTYPES:
        raise AdamWInputError(f"grad dtype {grad.dtype} not supported; use one of {GRAD_DTYPES}")
    for name in ("exp_avg", "exp_avg_sq"):
        if named[name].dtype != STATE_DTYPE:
            raise AdamWInputError(f"{name} must be {STATE_DTYPE}, got {named[name].dtype}")
    if grad_scale is not None:
        if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1:
            raise AdamWInputError("grad_scale must be None or a 1-element tensor")
        if grad_scale.dtype != torch.float32:
            raise AdamWInputError(f"grad_scale must be float32, got {grad_scale.dtype}")
        if grad_scale.device != param.device:
            raise AdamWInputError(
                f"grad_scale is on {grad_scale.device}, param is on {param.device}; keep it on "
                "the device so the step needs no host sync"
            )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise AdamWInputError(f"step must be an int >= 1 (the step being taken), got {step!r}")
    if isinstance(decay_end, bool) or not isinstance(decay_end, int) or not 0 <= decay_end <= n:
        raise AdamWInputError(f"decay_end must be an int in [0, {n}], got {decay_end!r}")
    if not lr >= 0.0:
        raise AdamWInputError(f"lr must be >= 0, got {lr}")
    if not eps >= 0.0:
        raise AdamWInputError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise AdamWInputError(f"weight_decay must be >= 0, got {weight_decay}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise AdamWInputError(f"{name} must be in [0, 1), got {b}")


def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_end: int,
    step: int,
    grad_scale: torch.Tensor | None = None,
    backend: AdamWBackend = "auto",
) -> str:
    """One AdamW step over the flat trainable buffer, in place.

    Args:
        param: 1-D master weights (fp32, bf16 or fp16).
        grad: 1-D gradients, same length (fp32, bf16 or fp16).
        exp_avg, exp_avg_sq: 1-D fp32 moment buffers, same length.
        lr, beta1, beta2, eps, weight_decay: AdamW hyperparameters.
        decay_end: elements ``[0, decay_end)`` get decoupled weight decay, the rest none.
        step: the step being taken, counted from 1 (bias correction).
        grad_scale: optional 1-element fp32 device tensor multiplied into the gradient
            (global clip coefficient, optionally times an AMP unscale); read on device.
        backend: one of ``ADAMW_BACKENDS``, read by ``_triton.resolve_backend``: 'auto' (the
            Triton kernel on CUDA, else the eager reference), 'triton' (raise if it cannot run),
            'torch' (the eager reference) or 'torch_fused' (torch's fused AdamW, fp32 only).

    Returns:
        The backend that ran, 'triton' or 'torch' (see ``adamw_launches``).
    """
    _validate(
        param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decay_end=decay_end, step=step, grad_scale=grad_scale,
    )
    used = resolve_backend(backend, param.device, "AdamW", choices=ADAMW_BACKENDS)[0]
    if used == "torch_fused":
        _torch_fused_adamw_(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, decay_end=decay_end, step=step, grad_scale=grad_scale)
        return used
    if used == "torch":
        adamw_ref_(
            param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decay_end=decay_end, step=step, grad_scale=grad_scale,
        )
        return used

    n = param.numel()
    if n == 0:
        return used
    block, warps, int64 = launch_config(n, param.device)
    w1 = 1.0 - beta1
    _adamw_kernel[(triton.cdiv(n, block),)](
        param, grad, exp_avg, exp_avg_sq,
        grad_scale if grad_scale is not None else exp_avg,  # dummy pointer, never read
        n, decay_end,
        1.0 - lr * weight_decay, w1, beta2, 1.0 - beta2,
        math.sqrt(1.0 - beta2**step), -lr / (1.0 - beta1**step), eps,
        HAS_SCALE=grad_scale is not None,
        LERP_FROM_END=abs(w1) >= 0.5,
        INT64=int64,
        BLOCK=block,
        num_warps=warps,
    )
    return used


_SCALE_CHUNK = 1 << 20  # elements of scaled gradient staged at a time (4 MiB of fp32)


def _torch_fused_adamw_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
                        decay_end, step, grad_scale) -> None:
    """torch's fused AdamW (``torch.optim.adamw.adamw(fused=True)``, what ``torch.optim.AdamW(fused=True)``
    runs) over the two weight-decay ranges; vectorised on CPU, multi-tensor kernels on CUDA.

    The gradient buffer is only read. torch's own ``grad_scale`` argument would *divide* the gradient
    and write it back, so a clip coefficient is applied instead to a bounded scratch copy, one
    ``_SCALE_CHUNK`` at a time (AdamW is elementwise: chunking changes no result). Same math as
    ``adamw_ref_`` up to fp32 rounding.
    """
    if param.dtype != torch.float32 or grad.dtype != torch.float32:
        raise AdamWInputError("backend 'torch_fused' takes fp32 params and grads")
    n = param.numel()
    chunk = _SCALE_CHUNK if grad_scale is not None else max(n, 1)
    scratch = torch.empty(min(chunk, n), dtype=grad.dtype, device=grad.device) if grad_scale is not None else None
    scale = None if grad_scale is None else grad_scale.reshape(())
    for lo, hi, wd in ((0, decay_end, weight_decay), (decay_end, n, 0.0)):
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            g = grad[a:b] if scale is None else torch.mul(grad[a:b], scale, out=scratch[:b - a])
            # The functional form increments each state step before use: hand it step - 1.
            steps = [torch.tensor(float(step - 1), device=param.device)]
            torch_adamw([param[a:b]], [g], [exp_avg[a:b]], [exp_avg_sq[a:b]], [], steps, fused=True,
                        amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False)


def global_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of the flat grad buffer as a 0-d fp32 device tensor (no host sync)."""
    return torch.linalg.vector_norm(grad, ord=2, dtype=torch.float32)


def clip_coef(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Global clipping coefficient ``min(1, max_norm / (norm + 1e-6))`` on the device.

    Pass it as ``grad_scale``. Like ``torch.nn.utils.clip_grad_norm_``: a non-finite norm
    yields 0 (inf) or nan, which the caller's overflow check must catch.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_grad_norm(grad)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
