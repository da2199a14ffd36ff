"""AdamW with bf16 moments over the flat trainable buffer, in one launch, stochastically rounded.

Same step as ``kernels/adamw.py`` (decoupled weight decay on ``[0, decay_end)``, device-side grad
scale, bias correction), but ``exp_avg`` and ``exp_avg_sq`` live in bf16: each launch loads them
as bf16 -> fp32 (exact), updates in fp32 with the fp32 master weights, and stores them back to
bf16 with STOCHASTIC rounding. Round-to-nearest would be biased and, worse, would stall: with
beta2 = 0.999 one step changes v by at most ~0.1% (``v' = v * (1 + (1 - b2) * (g*g / v - 1))``),
which is below half a bf16 ulp (2**-9 relative, 0.2%), so v would round back to itself forever.
Stochastic rounding keeps every update in expectation: ``E[sr(x)] = x``.

Per element (fp32 params; states 4 B/param instead of fp32's 8):

    grad    | read p + g + m + v | write p + m + v | bytes / element
    fp32    |   4  + 4 + 2 + 2   |   4  + 2 + 2    |      20
    bf16/16 |   4  + 2 + 2 + 2   |   4  + 2 + 2    |      18

Stochastic rounding fp32 -> bf16 on the bit pattern: add 16 random bits to the fp32 pattern and
drop its low 16 bits. The magnitude rounds up with probability ``low16 / 2**16``, for either sign
(IEEE floats are sign-magnitude), which is exactly unbiased; inf stays inf, nan stays a (quiet)
nan, the largest finite values may round up to inf.

The random bits are a counter-based hash, so no RNG state is kept and any sub-range can be
stepped on its own: element ``i`` of a launch is element ``offset + i`` of the caller's buffer and
draws ``mix32(mix32(lo ^ key) + hi) >> 16`` where ``lo, hi`` are the low/high 32 bits of that
absolute index, ``key = stream_key(seed, step, stream)`` (stream 0 for m, 1 for v, formed on the
host), and ``mix32`` is the "lowbias32" integer finalizer (xorshift-multiply, uint32 wraparound).
The Triton kernel computes it on uint32 lanes, the torch reference on int64 lanes masked to 32
bits; both round identically, and the fp32 math is done op for op in the same order without
fused multiply-adds, so kernel and reference store bit-identical states.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from freezeasguard.kernels._triton import HAS_TRITON, flat_buffer_problem, resolve_backend
from freezeasguard.kernels.adamw import AdamWInputError, launch_config
from freezeasguard.kernels.choices import Backend

__all__ = ["adamw_bf16_states_", "adamw_bf16_states_ref_", "stochastic_round_bf16", "stream_key"]

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
_REF_CHUNK = 1 << 16  # elements per eager pass: keeps the int64 hash temporaries cache sized


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (what a kernel's fp32 scalar argument holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class StepScalars:
    """The per-launch fp32 scalars of one AdamW step, formed once on the host in double precision
    and rounded to fp32; kernels and references use exactly these values."""

    decay_factor: float  # 1 - lr * wd
    w1: float  # 1 - b1, the lerp weight
    lerp_from_end: bool  # torch's lerp formula choice, |w1| >= 0.5
    beta2: float
    omb2: float  # 1 - b2
    bc2_sqrt: float  # sqrt(1 - b2 ** step)
    neg_step: float  # -lr / (1 - b1 ** step)
    eps: float
    max_step: float  # adam_step_bound: what exact moments can never exceed, enforced on compact ones

    @classmethod
    def of(cls, *, lr, beta1, beta2, eps, weight_decay, step) -> StepScalars:
        w1 = 1.0 - beta1
        return cls(_f32(1.0 - lr * weight_decay), _f32(w1), abs(w1) >= 0.5, _f32(beta2), _f32(1.0 - beta2),
                   _f32(math.sqrt(1.0 - beta2**step)), _f32(-lr / (1.0 - beta1**step)), _f32(eps),
                   _f32(lr * adam_step_bound(beta1, beta2, step)))


def adam_step_bound(beta1: float, beta2: float, step: int) -> float:
    """The largest ``|m_hat / (sqrt(v_hat) + eps)|`` exact AdamW moments can reach at ``step``.

    ``m_t = (1-b1) sum_k b1^(t-k) g_k`` and ``v_t = (1-b2) sum_k b2^(t-k) g_k^2``; by Cauchy-Schwarz
    ``|m_t| <= (1-b1) / sqrt(1-b2) * sqrt(S_t) * sqrt(v_t)`` with ``S_t = sum_{j<t} (b1^2/b2)^j``, so
    with the bias corrections the step is at most ``lr * sqrt(1-b2^t) / (1-b1^t) * (1-b1) / sqrt(1-b2)
    * sqrt(S_t)`` (exactly ``lr`` at the first step). Quantised moments break the premise: a second
    moment rounded down far below its block's maximum under a first moment that survived would move
    a weight by up to ``lr * m / eps``. Compact-moment kernels clip each element's step to this bound
    (it never binds on exact moments), so a job's largest step is what AdamW's is, whatever the
    moments' precision (the service's learning-rate cap counts on it)."""
    if beta2 == 0.0:  # v_t = g_t^2 alone: no bound on |m_t| / sqrt(v_t), nothing to clip to
        return math.inf
    r = beta1 * beta1 / beta2
    s = float(step) if abs(r - 1.0) < 1e-12 else (1.0 - r**step) / (1.0 - r)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    if bc1 == 0.0:  # beta1 = 0: m_t = g_t and |g_t| <= sqrt(v_t / (1 - b2))
        return math.sqrt(bc2 / (1.0 - beta2))
    return math.sqrt(bc2) / bc1 * (1.0 - beta1) / math.sqrt(1.0 - beta2) * math.sqrt(s)


def adamw_math_ref(p, g, m, v, *, start: int, decay_end: int, sc: StepScalars, grad_scale):
    """fp32 AdamW on fp32 chunks (elements ``[start, start + len)`` of the launch), one torch op per
    kernel op, in the kernel's order: no op is contracted into an FMA. ``p``, ``m``, ``v`` are
    updated in place (the callers hand in the param chunk and fresh fp32 copies of the moments)."""
    if grad_scale is not None:
        g = g * grad_scale
    k = min(max(decay_end - start, 0), p.numel())
    if k:
        p[:k].mul_(sc.decay_factor)
    if sc.lerp_from_end:
        torch.sub(g, (g - m).mul_(_f32(1.0 - sc.w1)), out=m)
    else:
        m.add_((g - m).mul_(sc.w1))
    v.mul_(sc.beta2).add_((g * sc.omb2).mul_(g))
    # torch's CPU fp32 sqrt is not correctly rounded (vectorised approximation); the kernel's sqrt_rn
    # is. sqrt in fp64 rounded once to fp32 is (53 >= 2 * 24 + 2 bits: no double-rounding error).
    # The divisor is a device tensor: torch's CUDA division by a host scalar multiplies by its reciprocal.
    bc2 = torch.full((), sc.bc2_sqrt, dtype=torch.float32, device=v.device)
    denom = torch.sqrt(v.double()).float().div_(bc2).add_(sc.eps)
    p.add_((m * sc.neg_step).div_(denom).clamp_(-sc.max_step, sc.max_step))
    return p, m, v


def check_buffer(name: str, t, numel: int, dtypes: tuple, device, what: str) -> None:
    """One flat state buffer: a 1-D contiguous tensor of ``numel`` elements of an allowed dtype."""
    if (why := flat_buffer_problem(name, t)) is not None:
        raise AdamWInputError(why)
    if t.numel() != numel:
        raise AdamWInputError(f"{name} has {t.numel()} elements, {what}")
    if device is not None and t.device != device:
        raise AdamWInputError(f"{name} is on {t.device}, param is on {device}")
    if t.dtype not in dtypes:
        raise AdamWInputError(f"{name} dtype {t.dtype} not supported; use one of {dtypes}")


def check_step_args(param, grad, *, lr, beta1, beta2, eps, weight_decay, decay_end, step, grad_scale) -> None:
    """The checks both compact-state steps share: fp32 params, grads, grad scale, hyperparameters."""
    n = param.numel() if isinstance(param, torch.Tensor) else 0
    check_buffer("param", param, n, (torch.float32,), None, "")
    check_buffer("grad", grad, n, GRAD_DTYPES, param.device, f"param has {n}")
    if grad_scale is not None:
        if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1:
            raise AdamWInputError("grad_scale must be None or a 1-element tensor")
        if grad_scale.dtype != torch.float32:
            raise AdamWInputError(f"grad_scale must be float32, got {grad_scale.dtype}")
        if grad_scale.device != param.device:
            raise AdamWInputError(f"grad_scale is on {grad_scale.device}, param is on {param.device}; keep it on "
                                  "the device so the step needs no host sync")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise AdamWInputError(f"step must be an int >= 1 (the step being taken), got {step!r}")
    if isinstance(decay_end, bool) or not isinstance(decay_end, int) or not 0 <= decay_end <= n:
        raise AdamWInputError(f"decay_end must be an int in [0, {n}], got {decay_end!r}")
    for name, x in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not x >= 0.0:
            raise AdamWInputError(f"{name} must be >= 0, got {x}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise AdamWInputError(f"{name} must be in [0, 1), got {b}")


# --- the hash and the rounding ------------------------------------------------------------


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one random stream (0: exp_avg, 1: exp_avg_sq) of one step."""
    k = _mix32_int((seed & MASK32) ^ 0x9E3779B9)
    k = _mix32_int(k ^ (seed >> 32 & MASK32))
    k = _mix32_int(k ^ (step & MASK32))
    k = _mix32_int(k ^ (step >> 32 & MASK32))
    return _mix32_int(k ^ ((0x85EBCA6B * (stream + 1)) & MASK32))


def _mix32_ref(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 lanes holding uint32 values. Each product stays inside int64: ``_M1`` is
    below 2**31 and ``_M2`` is applied as ``_M2 - 2**32`` (same low 32 bits, |factor| < 2**31)."""
    x ^= x >> 16  # in place: the callers hand in a fresh tensor
    x.mul_(_M1).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(_M2 - (1 << 32)).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


def _random16_ref(lo: torch.Tensor, hi: torch.Tensor | None, key: int) -> torch.Tensor:
    """16 random bits (int32 lanes) per absolute element index ``hi * 2**32 + lo`` (hi None: 0)."""
    x = _mix32_ref(lo ^ key)
    if hi is not None:
        x.add_(hi).bitwise_and_(MASK32)
    return (_mix32_ref(x) >> 16).to(torch.int32)


def _index_words(start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    if start + n <= 1 << 32:
        return idx, None
    return idx & MASK32, idx >> 32


def _sr_ref(x: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by adding ``r16`` to the bit pattern and truncating (nan kept quiet).

    On int32 lanes: for every non-nan pattern, negative ones too, ``bits + r16`` cannot overflow
    and an arithmetic ``>> 16`` yields the top half as an int16 value, i.e. the bf16 bits."""
    bits = x.view(torch.int32)
    nan = torch.isnan(x)
    out = torch.where(nan, bits | 0x00400000, bits + r16.masked_fill_(nan, 0))
    return (out >> 16).to(torch.int16).view(torch.bfloat16)


def stochastic_round_bf16(x: torch.Tensor, *, seed: int, step: int = 1, stream: int = 0, offset: int = 0):
    """Round a flat fp32 tensor to bf16 stochastically with the steps' hash (eager, for tests)."""
    lo, hi = _index_words(offset, x.numel(), x.device)
    return _sr_ref(x.float().contiguous(), _random16_ref(lo, hi, stream_key(seed, step, stream)))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_math(p, g, m, v, in_decay, decay_factor, w1, beta2, omb2, bc2_sqrt, neg_step, eps, max_step,
                   LERP_FROM_END: tl.constexpr):
        """fp32 AdamW on fp32 lanes, op for op as ``adamw_math_ref`` (the compact kernels share it)."""
        p = tl.where(in_decay, p * decay_factor, p)
        if LERP_FROM_END:
            m = g - (g - m) * (1.0 - w1)
        else:
            m = m + w1 * (g - m)
        v = v * beta2 + omb2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.minimum(tl.maximum(tl.div_rn(neg_step * m, denom), -max_step), max_step)
        return p, m, v

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sr_bf16(x, lo, hi, key):
        r = _mix32(_mix32(lo ^ key) + hi) >> 16
        bits = x.to(tl.uint32, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = tl.where(nan, bits | 0x00400000, bits + r) >> 16
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _adamw_bf16_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr,
        n, decay_end, offset, key_m, key_v,
        decay_factor, w1, beta2, omb2, bc2_sqrt, neg_step, eps, max_step,
        HAS_SCALE: tl.constexpr, LERP_FROM_END: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INT64:
            start = pid.to(tl.int64) * BLOCK
        else:
            start = pid * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        p, m, v = adamw_math(p, g, m, v, offs < decay_end, decay_factor, w1, beta2, omb2, bc2_sqrt, neg_step, eps,
                             max_step, LERP_FROM_END)

        idx = offs.to(tl.int64) + offset  # the absolute element index feeds the hash
        lo = idx.to(tl.uint32)
        hi = (idx >> 32).to(tl.uint32)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, _sr_bf16(m, lo, hi, key_m.to(tl.uint32, bitcast=True)), mask=mask)
        tl.store(v_ptr + offs, _sr_bf16(v, lo, hi, key_v.to(tl.uint32, bitcast=True)), mask=mask)


def _as_i32(key: int) -> int:
    """A uint32 key as the int32 with the same bits (always typed i32 by Triton; bitcast back)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def _validate(param, grad, exp_avg, exp_avg_sq, *, seed, offset, **hyper) -> None:
    check_step_args(param, grad, **hyper)
    n = param.numel()
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_buffer(name, t, n, (torch.bfloat16,), param.device, f"param has {n}")
    for name, x, hi in (("seed", seed, 1 << 64), ("offset", offset, 1 << 62)):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < hi:
            raise AdamWInputError(f"{name} must be an int in [0, 2**{hi.bit_length() - 1}), got {x!r}")


@torch.no_grad()
def adamw_bf16_states_ref_(param, grad, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, decay_end: int, step: int, grad_scale: torch.Tensor | None = None,
                           seed: int, offset: int = 0) -> None:
    """Eager reference of ``adamw_bf16_states_``, in place, bit-identical to the kernel; elementwise,
    so it runs ``_REF_CHUNK`` elements at a time to bound its int64 temporaries."""
    sc = StepScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    keys = stream_key(seed, step, 0), stream_key(seed, step, 1)
    n = param.numel()
    for a in range(0, n, _REF_CHUNK):
        b = min(n, a + _REF_CHUNK)
        _, m, v = adamw_math_ref(param[a:b], grad[a:b].float(), exp_avg[a:b].float(), exp_avg_sq[a:b].float(),
                                 start=a, decay_end=decay_end, sc=sc, grad_scale=grad_scale)
        lo, hi = _index_words(offset + a, b - a, param.device)
        exp_avg[a:b] = _sr_ref(m, _random16_ref(lo, hi, keys[0]))
        exp_avg_sq[a:b] = _sr_ref(v, _random16_ref(lo, hi, keys[1]))


def adamw_bf16_states_(
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
    seed: int,
    offset: int = 0,
    backend: Backend = "auto",
) -> str:
    """One AdamW step with bf16 moments over the flat trainable buffer, in place.

    Args:
        param: 1-D fp32 master weights.
        grad: 1-D gradients, same length (fp32, bf16 or fp16).
        exp_avg, exp_avg_sq: 1-D bf16 moment buffers, same length (zeros before step 1).
        lr, beta1, beta2, eps, weight_decay, decay_end, step, grad_scale: as ``fused_adamw_``;
            ``decay_end`` counts from the start of these buffers.
        seed: the run's seed of the rounding hash (an int in [0, 2**64)).
        offset: the absolute index of element 0 in the caller's buffer: stepping ``[lo, hi)`` of a
            buffer with ``offset=lo`` rounds exactly as stepping the whole buffer does.
        backend: as ``_triton.resolve_backend`` reads it: 'auto' (the Triton kernel on CUDA, else
            the reference), 'triton' (raise if it cannot run) or 'torch' (the bit-identical eager
            reference).

    Returns:
        The backend that ran, 'triton' or 'torch'.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay_end=decay_end,
                 step=step, grad_scale=grad_scale)
    _validate(param, grad, exp_avg, exp_avg_sq, seed=seed, offset=offset, **hyper)
    used = resolve_backend(backend, param.device, "AdamW (bf16 states)")[0]
    if used == "torch":
        adamw_bf16_states_ref_(param, grad, exp_avg, exp_avg_sq, seed=seed, offset=offset, **hyper)
        return used
    n = param.numel()
    if n == 0:
        return used
    sc = StepScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    block, warps, int64 = launch_config(n, param.device)
    _adamw_bf16_kernel[(triton.cdiv(n, block),)](
        param, grad, exp_avg, exp_avg_sq, grad_scale if grad_scale is not None else param,  # dummy, never read
        n, decay_end, offset, _as_i32(stream_key(seed, step, 0)), _as_i32(stream_key(seed, step, 1)),
        sc.decay_factor, sc.w1, sc.beta2, sc.omb2, sc.bc2_sqrt, sc.neg_step, sc.eps, sc.max_step,
        HAS_SCALE=grad_scale is not None, LERP_FROM_END=sc.lerp_from_end, INT64=int64, BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,  # no FMA contraction: bit-identical to the reference
    )
    return used
