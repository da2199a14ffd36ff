"""One fused pass of mask learning over the chunked flat fp32 buffers (``engine.learn.flat``).

What is fused, per element, in ONE Triton launch: the per-row partial dot products
``<theta_d, g>`` (raw gradient, values before the update), the clip scaling of the gradient,
the simulated user's AdamW step on ``theta_ft = theta_pre - theta_d`` (moments, bias
correction, decoupled weight decay on the prefix ``[0, decay_end)``) and the bookkeeping
``theta_d -= u; theta += keep * u`` with the per-row keep factor ``1 - m``. The per-row partials
(fp32, one per ``chunk`` elements) are then summed per tensor in fp64 by the same
``segment_sum_rows`` the reference uses: fixed order, no atomics, bit-reproducible run to run.

The math is ``bilevel_step_ref_``'s, op for op (its docstring is the specification; the kernel
computes the row dots before anything is written and mirrors torch's two-sided lerp formula).
Host scalars are formed in double and rounded once to fp32, as torch does with Python scalars;
division and square root are the correctly rounded forms (``div_rn``, ``sqrt_rn``). Against the
reference the buffers agree to a few fp32 ulp, not bit for bit: torch's CPU sqrt is not
correctly rounded on AVX-512 builds (off by 1 ulp in ~17% of elements, measured), torch's
vectorised lerp/addcmul and the compiled kernel may contract a multiply-add into an FMA, and
torch on CUDA divides by a host scalar through its reciprocal. The row dots differ in summation
order within a row; both sides are within ``chunk * 2**-24 * sum|theta_d * g|`` of the exact dot.

HBM bytes per element (fp32; the keep factor and the row dot add 4 B per ``chunk`` elements):

    mode              | read                     | write                 | bytes / element
    dots only         | theta_d, g               | -                     |  8
    update (+ dots)   | g, theta_d, theta, m, v  | theta_d, theta, m, v  | 36
      decay prefix    | + theta_pre              |                       | +4 on [0, decay_end)
      grad_scale      |                          | + g (scaled in place) | +4

The dots ride free with the update: theta_d and g are read by it anyway. ``bytes_moved``
computes the total. The eager reference makes about a dozen passes over the buffers.

Layout contract (``FlatLayout``): every buffer is ``rows * chunk`` long and each row of the
``[rows, chunk]`` view lies in one tensor, so one program handles whole rows and a row's dot
never straddles two programs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freezeasguard.kernels._triton import HAS_TRITON, interpreting, next_pow2, resolve_backend
from freezeasguard.kernels.choices import Backend
from freezeasguard.kernels.mask_update_checks import MaskUpdateInputError, validate
from freezeasguard.kernels.segment import segment_dots, segment_sum_rows

__all__ = [
    "MaskUpdateInputError",
    "LaunchConfig",
    "bilevel_step_",
    "bilevel_step_ref_",
    "bytes_moved",
    "launch_config",
]

_CUDA_TILE = 1024  # elements per program and tile on CUDA: 8 fp32 per thread at 4 warps
_CUDA_WARPS = 4
_INTERP_TILE = 1 << 16  # the interpreter pays per program, not per element: few, big blocks
_INT32_LIMIT = 2**31


# ------------------------------------------------------------------------- the reference
@torch.no_grad()
def bilevel_step_ref_(
    theta: torch.Tensor, theta_pre: torch.Tensor, theta_d: torch.Tensor, grad: torch.Tensor,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, keep: torch.Tensor, rows_per_tensor: torch.Tensor, *,
    chunk: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decay_end: int,
    step: int, grad_scale: torch.Tensor | None = None, update: bool = True, dots: bool = True,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One step of mask learning over the flat buffers, in torch ops (the fused kernel's reference).

    With ``g = grad`` (evaluated at theta(m)) and ``keep = 1 - m`` per row:

    ``dots`` (computed first, at the point where g was evaluated):
        ``d_i = <theta_d_i, g_i>`` per tensor, fp64. The chain rule through
        ``theta(m) = theta_ft + m * theta_d`` gives ``dL/dm_i = d_i`` and, with
        ``m_i = sigmoid(x_i / T)``, ``dL/dx_i = d_i * m_i (1 - m_i) / T``.

    ``update`` (the simulated user's AdamW step on ``theta_ft = theta_pre - theta_d``, exactly
    torch.optim.AdamW's math; u is the signed change of theta_ft):
        g         *= grad_scale                                  (in place)
        exp_avg    = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) g^2
        u          = -lr / bc1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
                     - lr * wd * theta_ft                       (only on [0, decay_end))
        theta_d   -= u                  (theta_ft += u)
        theta     += keep * u           (frozen tensors, keep = 0, stay at theta_pre)

    Args:
        keep: per-row ``1 - m`` of the row's tensor, fp32 [rows].
        rows_per_tensor: rows of each segment (``FlatLayout.rows_per_tensor``).
        step: the user step being taken, counted from 1 (bias correction).
        grad_scale: optional 0-d/1-element fp32 device tensor (clip coefficient), multiplied into
            ``grad`` in place by the update; the dots use the raw gradient.
        scratch: a flat fp32 buffer like the others for the update's temporary (allocated per call
            when None; passing one avoids a buffer-sized allocation every step).
    Returns:
        The per-tensor dots (fp64) when ``dots`` is set, else None.
    """
    d = segment_dots(theta_d, grad, rows_per_tensor, chunk) if dots else None
    if not update:
        return d
    if step < 1:
        raise ValueError(f"step must be >= 1 (the step being taken), got {step}")
    g = grad
    if grad_scale is not None:
        g.mul_(grad_scale.reshape(()))
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    u = torch.empty_like(theta_d) if scratch is None else scratch
    torch.sqrt(exp_avg_sq, out=u).div_(bc2_sqrt).add_(eps)
    torch.div(exp_avg, u, out=u).mul_(-lr / bc1)
    if weight_decay != 0 and decay_end > 0:
        # -lr*wd*theta_ft = -lr*wd*(theta_pre - theta_d), without a temporary for theta_ft.
        u[:decay_end].add_(theta_d[:decay_end], alpha=lr * weight_decay)
        u[:decay_end].sub_(theta_pre[:decay_end], alpha=lr * weight_decay)
    theta_d.sub_(u)
    theta.view(-1, chunk).addcmul_(u.view(-1, chunk), keep.view(-1, 1))
    return d


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bilevel_kernel(
        theta_ptr,
        pre_ptr,
        d_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        keep_ptr,  # [rows] fp32, 1 - m of the row's tensor
        scale_ptr,  # 1-element fp32 clip coefficient (read only when HAS_SCALE)
        rowdot_ptr,  # [rows] fp32 out (written only when DOTS)
        rows,
        decay_end,
        w1,  # 1 - b1 (lerp weight)
        beta2,
        one_minus_beta2,
        bc2_sqrt,  # sqrt(1 - b2 ** step)
        neg_step_size,  # -lr / (1 - b1 ** step)
        eps,
        lr_wd,  # lr * weight_decay
        CHUNK: tl.constexpr,
        TILE: tl.constexpr,  # power of two; a row is covered by ceil(CHUNK / TILE) tiles
        ROWS: tl.constexpr,  # rows per program, power of two
        UPDATE: tl.constexpr,
        DOTS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        LERP_FROM_END: tl.constexpr,
        INT64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)  # rows < 2**31 always (each row is >= 1 element)
        row_ok = r < rows
        if INT64:  # r * CHUNK overflows int32 once the buffer reaches 2**31 elements
            base = r.to(tl.int64) * CHUNK
        else:
            base = r * CHUNK
        if UPDATE:
            keep = tl.load(keep_ptr + r, mask=row_ok, other=0.0)[:, None]
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        acc = tl.zeros([ROWS, TILE], dtype=tl.float32)
        for c0 in range(0, CHUNK, TILE):
            cols = c0 + tl.arange(0, TILE)
            offs = base[:, None] + cols[None, :]  # contiguous along the tile: coalesced, vectorised
            msk = row_ok[:, None] & (cols[None, :] < CHUNK)
            d = tl.load(d_ptr + offs, mask=msk, other=0.0)
            g = tl.load(g_ptr + offs, mask=msk, other=0.0)
            if DOTS:
                acc += d * g  # raw gradient and theta_d as they were when g was evaluated
            if UPDATE:
                m = tl.load(m_ptr + offs, mask=msk, other=0.0)
                v = tl.load(v_ptr + offs, mask=msk, other=0.0)
                th = tl.load(theta_ptr + offs, mask=msk, other=0.0)
                if HAS_SCALE:
                    g = g * scale
                    tl.store(g_ptr + offs, g, mask=msk)
                # torch's lerp picks the formula by |weight| < 0.5 for accuracy; mirror it.
                if LERP_FROM_END:
                    m = g - (g - m) * (1.0 - w1)
                else:
                    m = m + w1 * (g - m)
                v = v * beta2 + one_minus_beta2 * g * g
                denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
                u = tl.div_rn(m, denom) * neg_step_size
                if HAS_DECAY:
                    # -lr*wd*theta_ft with theta_ft = theta_pre - theta_d; theta_pre is loaded on
                    # the decay prefix only (masked lanes move no bytes).
                    dec = msk & (offs < decay_end)
                    pre = tl.load(pre_ptr + offs, mask=dec, other=0.0)
                    u = tl.where(dec, (u + lr_wd * d) - lr_wd * pre, u)
                tl.store(d_ptr + offs, d - u, mask=msk)
                tl.store(theta_ptr + offs, th + u * keep, mask=msk)
                tl.store(m_ptr + offs, m, mask=msk)
                tl.store(v_ptr + offs, v, mask=msk)
        if DOTS:
            tl.store(rowdot_ptr + r, tl.sum(acc, axis=1), mask=row_ok)


@dataclass(frozen=True)
class LaunchConfig:
    """Launch shape of one bilevel step: programs cover ``rows_per_program`` whole rows, each
    row in ``ceil(chunk / tile)`` tiles of ``tile`` columns."""

    rows_per_program: int
    tile: int
    num_warps: int
    int64: bool

    def grid(self, rows: int) -> tuple[int]:
        return (math.ceil(rows / self.rows_per_program),)


def launch_config(chunk: int, rows: int, device: torch.device) -> LaunchConfig:
    """Deterministic launch shape (no autotuning) for ``rows`` rows of ``chunk`` elements.

    A program holds about ``_CUDA_TILE`` elements on CUDA (as many whole rows as fit, at least
    one; longer rows loop over tiles) and up to 2**16 under the interpreter, whose cost is per
    program. The summation order inside a row follows the launch shape (tile, and on CUDA the
    thread layout it gets), which is a pure function of the arguments: the same buffers on the
    same device give the same row dots, bit for bit.
    """
    cap = _CUDA_TILE if device.type == "cuda" and not interpreting() else _INTERP_TILE
    warps = _CUDA_WARPS if cap == _CUDA_TILE else 1
    tile = min(next_pow2(chunk), cap)
    rows_per_program = max(1, min(cap // tile, next_pow2(rows)))
    # The largest offset touched is (rows_rounded_up - 1) * chunk + tiles * tile - 1.
    programs = math.ceil(rows / rows_per_program)
    span = programs * rows_per_program * chunk + math.ceil(chunk / tile) * tile
    return LaunchConfig(rows_per_program, tile, warps, span >= _INT32_LIMIT)


def bytes_moved(n: int, chunk: int, decay_end: int, *, update: bool = True, dots: bool = True,
                scaled: bool = False) -> int:
    """HBM bytes the fused kernel moves for one step over an ``n``-element buffer.

    Args:
        n: buffer length (a multiple of ``chunk``).
        chunk: row length; the keep factor and the row dots are 4 B per row.
        decay_end: elements ``[0, decay_end)`` also read theta_pre.
        update, dots, scaled: the step's mode (``scaled``: a grad_scale is given).
    """
    rows = n // chunk
    total = 0
    if dots:
        total += 4 * rows  # row partials written (the fp64 reduce over rows is O(rows))
    if update:
        total += 36 * n + 4 * rows + 4 * decay_end + (4 * n if scaled else 0)
    elif dots:
        total += 8 * n
    return total


@torch.no_grad()
def bilevel_step_(
    theta: torch.Tensor, theta_pre: torch.Tensor, theta_d: torch.Tensor, grad: torch.Tensor,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, keep: torch.Tensor, rows_per_tensor: torch.Tensor, *,
    chunk: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decay_end: int,
    step: int, grad_scale: torch.Tensor | None = None, update: bool = True, dots: bool = True,
    scratch: torch.Tensor | None = None, backend: Backend = "auto",
) -> torch.Tensor | None:
    """``bilevel_step_ref_`` (same arguments, same in-place effects, same result) with a choice of
    implementation: the fused one-launch Triton kernel, or the eager reference.

    Args:
        scratch: optional flat fp32 buffer; the kernel keeps its ``[rows]`` row partials in its
            head (no allocation per step), the reference its update temporary.
        backend: as ``_triton.resolve_backend`` reads it: 'auto' (Triton on CUDA tensors, else
            the reference), 'triton' (raise if it cannot run) or 'torch'.
    Returns:
        The per-tensor dots ``<theta_d_i, g_i>`` (fp64, flat order) when ``dots``, else None.
    """
    bufs = {"theta": theta, "theta_pre": theta_pre, "theta_d": theta_d, "grad": grad, "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq}
    validate(bufs, keep, rows_per_tensor, chunk=chunk, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
              weight_decay=weight_decay, decay_end=decay_end, step=step, grad_scale=grad_scale, update=update,
              scratch=scratch)
    hp = dict(chunk=chunk, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              decay_end=decay_end, step=step, grad_scale=grad_scale, update=update, dots=dots)
    if resolve_backend(backend, theta.device, "bilevel step")[0] == "torch":
        return bilevel_step_ref_(theta, theta_pre, theta_d, grad, exp_avg, exp_avg_sq, keep, rows_per_tensor,
                                 scratch=scratch, **hp)
    cfg = launch_config(chunk, theta.numel() // chunk, theta.device)
    return _run_triton(theta, theta_pre, theta_d, grad, exp_avg, exp_avg_sq, keep, rows_per_tensor,
                       scratch=scratch, config=cfg, **hp)


def _run_triton(theta, theta_pre, theta_d, grad, exp_avg, exp_avg_sq, keep, rows_per_tensor, *, chunk, lr,
                beta1, beta2, eps, weight_decay, decay_end, step, grad_scale, update, dots, scratch,
                config: LaunchConfig) -> torch.Tensor | None:
    """Launch the kernel with a given shape (validated inputs); then reduce rows to tensors."""
    if not (update or dots):
        return None
    rows = theta.numel() // chunk
    row_dots = scratch[:rows] if scratch is not None else torch.empty(rows, dtype=torch.float32,
                                                                      device=theta.device)
    step = max(step, 1)  # only read when update, where it was validated
    w1 = 1.0 - beta1
    _bilevel_kernel[config.grid(rows)](
        theta, theta_pre, theta_d, grad, exp_avg, exp_avg_sq, keep,
        grad_scale if grad_scale is not None else keep,  # dummy pointer, never read
        row_dots, rows, decay_end,
        w1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), -lr / (1.0 - beta1**step), eps,
        lr * weight_decay,
        CHUNK=chunk, TILE=config.tile, ROWS=config.rows_per_program,
        UPDATE=update, DOTS=dots, HAS_SCALE=update and grad_scale is not None,
        HAS_DECAY=update and weight_decay != 0 and decay_end > 0,
        LERP_FROM_END=abs(w1) >= 0.5, INT64=config.int64,
        num_warps=config.num_warps,
    )
    return segment_sum_rows(row_dots, rows_per_tensor) if dots else None
