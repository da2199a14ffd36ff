"""AdamW with blockwise 8-bit moments over the flat trainable buffer, in one launch.

The moments are stored as one byte per element plus one fp32 scale per block of ``block_size``
consecutive elements (the scheme of bitsandbytes' blockwise 8-bit Adam): element ``i`` of block
``b`` holds ``table[code[i]] * absmax[b]``. Per step and block the kernel decodes m and v to
fp32, runs the fp32 AdamW step of ``kernels/adamw.py`` (the parameter moves by the fresh,
unquantized m and v), takes the block's new ``absmax = max |value|``, and re-encodes every value
as the NEAREST table entry of ``value / absmax`` (ties to the lower entry), found by an 8-step
binary search over the 255 midpoints of the sorted table. ``q_m`` / ``q_v`` are uint8 indices into
two sorted 256-entry fp32 tables, the signed one for m, the unsigned one for v.

One deliberate departure from nearest (and from bitsandbytes): a positive v never takes the zero
code, but at least the smallest positive one. Rounded to 0, a v below ~1.6e-7 of its block's
absmax makes the next step divide m by ``sqrt((1 - b2) g*g) + eps``, and where g passes through 0
that is a step of ``lr * m / eps`` (seen on a noiseless quadratic: params thrown 70 units). The
floor overestimates such a v instead, which only shortens that coordinate's step.

The tables ("dynamic" codes, Dettmers 2015): exponent-like spacing keeps relative precision for
values far below the block's absmax. Decade ``k = 0..6`` covers ``[0.1, 1] * 10**(k - 6)`` with the
midpoints of ``2**k`` (signed, per sign) or ``2**(k+1)`` (unsigned) equal intervals; with 0 and 1
added that is 127 negative, 0, 128 positive (signed) or 0 and 255 positive (unsigned) entries.
Relative spacing within a decade goes from 9/2**k (signed; 9/2**(k+1) unsigned) at its bottom to
a tenth of that at its top, and rounding errs by at most half the spacing: 0.7% of m (0.35% of v)
just below absmax, 7% (3.5%) at 0.1 absmax, more further down. m below 2.75e-7 absmax encodes as
0. Zero has an exact code (127 for m, 0 for v), so zeroed states decode to 0.0 exactly
(``new_8bit_states``).

Per element, fp32 params and grads (absmax: 2 x 4 B read + 2 x 4 B written per block; the
tables stay in cache):

    read p + g + q_m + q_v | write p + q_m + q_v | bytes / element
      4  + 4 +  1  +  1    |   4   + 1  +  1     |  16 + 16 / block_size

Memory held: 2 B/param + 8 B/block (2.03 B/param at 256) against 8 B/param for fp32 states.
Blocks are local to the buffers passed (block 0 starts at element 0), so a caller stepping
sub-ranges aligns them to ``block_size``; a trailing partial block is fine.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from freezeasguard.kernels._triton import HAS_TRITON, interpreting, next_pow2, resolve_backend
from freezeasguard.kernels.adamw import AdamWInputError
from freezeasguard.kernels.adamw_bf16 import (
    StepScalars,
    adamw_math_ref,
    check_buffer,
    check_step_args,
)
from freezeasguard.kernels.choices import Backend

__all__ = ["adamw_8bit_", "adamw_8bit_ref_", "new_8bit_states", "dynamic_code", "code_tables",
           "ZERO_CODE_M", "ZERO_CODE_V"]

ZERO_CODE_M = 127  # index of 0.0 in the signed table
ZERO_CODE_V = 0  # index of 0.0 in the unsigned table
_CUDA_ELEMS = 1024  # elements per program on CUDA: 8 per thread at 4 warps
_INTERP_ELEMS = 1 << 16  # the interpreter pays per program: few, big ones
_REF_CHUNK = 1 << 20  # elements per eager pass (rounded down to whole blocks)


def dynamic_code(signed: bool) -> torch.Tensor:
    """The sorted 256-entry fp32 code table (built in double precision, rounded once)."""
    vals = [0.0, 1.0]
    for k in range(7):
        count = 2 ** (k if signed else k + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        vals += mids.tolist() + ((-mids).tolist() if signed else [])
    table = torch.tensor(sorted(vals), dtype=torch.float64).to(torch.float32)
    assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
    return table


class CodeTables(NamedTuple):
    code_m: torch.Tensor  # 256 signed entries
    mid_m: torch.Tensor  # 255 midpoints (fp32) between consecutive entries
    code_v: torch.Tensor
    mid_v: torch.Tensor


@functools.lru_cache(maxsize=None)
def _tables(device: str) -> CodeTables:
    out = []
    for signed in (True, False):
        t = dynamic_code(signed)
        out += [t.to(device), ((t[:-1] + t[1:]) / 2).to(device)]
    tables = CodeTables(*out)
    assert tables.code_m[ZERO_CODE_M] == 0 and tables.code_v[ZERO_CODE_V] == 0
    return tables


def code_tables(device: torch.device | str) -> CodeTables:
    """The code tables and their midpoints on ``device`` (cached)."""
    return _tables(str(torch.device(device)))


def new_8bit_states(n: int, block_size: int = 256, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zero moments for ``n`` elements: codes of 0.0 (exact) and zero absmax per block."""
    nb = -(-n // block_size)
    return {
        "q_m": torch.full((n,), ZERO_CODE_M, dtype=torch.uint8, device=device),
        "q_v": torch.full((n,), ZERO_CODE_V, dtype=torch.uint8, device=device),
        "absmax_m": torch.zeros(nb, dtype=torch.float32, device=device),
        "absmax_v": torch.zeros(nb, dtype=torch.float32, device=device),
    }


def launch_config_8bit(n: int, block_size: int, device: torch.device) -> tuple[int, int, bool]:
    """``(ROWS, num_warps, int64_offsets)``: each program steps ROWS whole blocks."""
    nb = -(-n // block_size)
    if device.type == "cuda" and not interpreting():
        rows = max(1, _CUDA_ELEMS // block_size)
        warps = 4 if rows * block_size <= _CUDA_ELEMS else 8
    else:
        rows, warps = max(1, min(_INTERP_ELEMS // block_size, next_pow2(nb))), 1
    return rows, warps, -(-nb // rows) * rows * block_size >= 2**31


if HAS_TRITON:
    import triton
    import triton.language as tl

    from freezeasguard.kernels.adamw_bf16 import adamw_math

    @triton.jit
    def _nearest(x, mid_ptr):
        """Index of the nearest table entry: #(midpoints < x), by binary search over 255 sorted midpoints."""
        code = tl.zeros(x.shape, dtype=tl.int32)
        for k in tl.static_range(8):
            cand = code + (128 >> k)
            code = tl.where(tl.load(mid_ptr + cand - 1) < x, cand, code)
        return code

    @triton.jit
    def _adamw_8bit_kernel(
        p_ptr, g_ptr, qm_ptr, qv_ptr, am_ptr, av_ptr, code_m_ptr, mid_m_ptr, code_v_ptr, mid_v_ptr, scale_ptr,
        n, n_blocks, decay_end,
        decay_factor, w1, beta2, omb2, bc2_sqrt, neg_step, eps, max_step,
        HAS_SCALE: tl.constexpr, LERP_FROM_END: tl.constexpr, INT64: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_blocks
        if INT64:
            starts = rows.to(tl.int64) * BLOCK_SIZE
        else:
            starts = rows * BLOCK_SIZE
        offs = starts[:, None] + tl.arange(0, BLOCK_SIZE)[None, :]
        mask = offs < n  # also excludes rows past the last block

        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        cm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.int32)
        cv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.int32)
        am = tl.load(am_ptr + rows, mask=row_ok, other=0.0)
        av = tl.load(av_ptr + rows, mask=row_ok, other=0.0)
        m = tl.load(code_m_ptr + cm) * am[:, None]
        v = tl.load(code_v_ptr + cv) * av[:, None]

        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        p, m, v = adamw_math(p, g, m, v, offs < decay_end, decay_factor, w1, beta2, omb2, bc2_sqrt, neg_step, eps,
                             max_step, LERP_FROM_END)
        tl.store(p_ptr + offs, p, mask=mask)

        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        new_am = tl.max(tl.abs(m), axis=1)
        new_av = tl.max(v, axis=1)
        safe_am = tl.where(new_am > 0, new_am, 1.0)
        safe_av = tl.where(new_av > 0, new_av, 1.0)
        xm = tl.div_rn(m, safe_am[:, None])  # an all-zero block divides its zeros by 1
        xv = tl.div_rn(v, safe_av[:, None])
        tl.store(qm_ptr + offs, _nearest(xm, mid_m_ptr).to(tl.uint8), mask=mask)
        qv = tl.maximum(_nearest(xv, mid_v_ptr), (xv > 0).to(tl.int32))  # nonzero v never encodes as 0
        tl.store(qv_ptr + offs, qv.to(tl.uint8), mask=mask)
        tl.store(am_ptr + rows, new_am, mask=row_ok)
        tl.store(av_ptr + rows, new_av, mask=row_ok)


def _validate(param, grad, q_m, q_v, absmax_m, absmax_v, *, block_size, **hyper) -> None:
    check_step_args(param, grad, **hyper)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (
            16 <= block_size <= 8192 and block_size & (block_size - 1) == 0):
        raise AdamWInputError(f"block_size must be a power of two in [16, 8192], got {block_size!r}")
    n = param.numel()
    nb = -(-n // block_size)
    for name, t in (("q_m", q_m), ("q_v", q_v)):
        check_buffer(name, t, n, (torch.uint8,), param.device, f"param has {n}")
    for name, t in (("absmax_m", absmax_m), ("absmax_v", absmax_v)):
        check_buffer(name, t, nb, (torch.float32,), param.device,
                     f"expected ceil({n} / {block_size}) = {nb} (one per block)")


def _int32(x: torch.Tensor) -> torch.Tensor:
    """int64 lanes holding uint32 patterns as int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _prefix_lookup(device: str) -> tuple[torch.Tensor, ...]:
    """The eager quantizer's shortcut: the fp32 values sharing their top 16 bits span a range that
    holds at most one midpoint of either table (asserted), so ``#(mids < x) = c0 + (mids[c0] < x)``
    with ``c0`` the count below the range, looked up by those 16 bits: two gathers, not a search."""
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    lo, hi = _int32(top).view(torch.float32), _int32(top | 0xFFFF).view(torch.float32)
    vmin, vmax = torch.minimum(lo, hi), torch.maximum(lo, hi)  # negative patterns count down
    out = []
    for mids in (code_tables("cpu").mid_m, code_tables("cpu").mid_v):
        c0, c1 = torch.bucketize(vmin, mids), torch.bucketize(vmax, mids)
        assert int((c1 - c0)[~vmin.isnan()].max()) <= 1
        out += [c0.to(torch.int32).to(device), torch.cat([mids, torch.tensor([math.inf])]).to(device)]
    return tuple(out)


def _decode_ref(q: torch.Tensor, zero: int, code: torch.Tensor, absmax: torch.Tensor, bs: int) -> torch.Tensor:
    """Codes of whole blocks (the last padded with the zero code) -> fp32 values, shape (blocks, bs)."""
    pad = absmax.numel() * bs - q.numel()
    q = F.pad(q, (0, pad), value=zero) if pad else q
    return code.index_select(0, q.int()).view(-1, bs) * absmax[:, None]


def _encode_ref(x2: torch.Tensor, absmax: torch.Tensor, c0: torch.Tensor, mids: torch.Tensor, floor: bool):
    """(blocks, bs) values and their new absmax -> nearest codes (ties down), flat uint8."""
    x = (x2 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).view(-1)  # all-zero block: 0
    c = c0.index_select(0, (x.view(torch.int32) >> 16) & 0xFFFF)
    c += mids.index_select(0, c) < x
    if floor:  # v: a positive value takes at least the smallest positive code
        c = torch.maximum(c, (x > 0).int())
    return c.to(torch.uint8)


@torch.no_grad()
def adamw_8bit_ref_(param, grad, q_m, q_v, absmax_m, absmax_v, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, decay_end: int, step: int, grad_scale: torch.Tensor | None = None,
                    block_size: int = 256) -> None:
    """Eager reference of ``adamw_8bit_``, in place: vectorised over blocks, as (blocks, block_size)
    arrays with the last block zero-padded, ``_REF_CHUNK`` elements of whole blocks per pass."""
    sc = StepScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    tab = code_tables(param.device)
    c0_m, mids_m, c0_v, mids_v = _prefix_lookup(str(param.device))
    n, bs = param.numel(), block_size
    per = max(1, _REF_CHUNK // bs)
    for b0 in range(0, -(-n // bs), per):
        a, b = b0 * bs, min(n, (b0 + per) * bs)
        blocks = slice(b0, b0 + -(-(b - a) // bs))
        m2 = _decode_ref(q_m[a:b], ZERO_CODE_M, tab.code_m, absmax_m[blocks], bs)
        v2 = _decode_ref(q_v[a:b], ZERO_CODE_V, tab.code_v, absmax_v[blocks], bs)
        # the step updates the valid part in place; the padding stays 0 and cannot raise absmax
        adamw_math_ref(param[a:b], grad[a:b].float(), m2.view(-1)[: b - a], v2.view(-1)[: b - a], start=a,
                       decay_end=decay_end, sc=sc, grad_scale=grad_scale)
        new_m, new_v = m2.abs().amax(dim=1), v2.amax(dim=1)
        q_m[a:b] = _encode_ref(m2, new_m, c0_m, mids_m, floor=False)[: b - a]
        q_v[a:b] = _encode_ref(v2, new_v, c0_v, mids_v, floor=True)[: b - a]
        absmax_m[blocks] = new_m
        absmax_v[blocks] = new_v


def adamw_8bit_(
    param: torch.Tensor,
    grad: torch.Tensor,
    q_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax_m: torch.Tensor,
    absmax_v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_end: int,
    step: int,
    grad_scale: torch.Tensor | None = None,
    block_size: int = 256,
    backend: Backend = "auto",
) -> str:
    """One AdamW step with blockwise 8-bit moments over the flat trainable buffer, in place.

    Args:
        param: 1-D fp32 master weights; grad: same length (fp32, bf16 or fp16).
        q_m, q_v: 1-D uint8 codes, same length (``new_8bit_states`` makes zero ones).
        absmax_m, absmax_v: 1-D fp32 block scales, ``ceil(n / block_size)`` each.
        lr, beta1, beta2, eps, weight_decay, decay_end, step, grad_scale: as ``fused_adamw_``.
        block_size: elements per block, a power of two in [16, 8192]; blocks start at element 0.
        backend: as ``_triton.resolve_backend`` reads it: 'auto' (the Triton kernel on CUDA, else
            the reference), 'triton' (raise if it cannot run) or 'torch' (the eager reference).

    Returns:
        The backend that ran, 'triton' or 'torch'. Non-finite gradients must be caught by the
        caller before the step (they would poison a whole block's absmax).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay_end=decay_end,
                 step=step, grad_scale=grad_scale)
    _validate(param, grad, q_m, q_v, absmax_m, absmax_v, block_size=block_size, **hyper)
    used = resolve_backend(backend, param.device, "AdamW (8-bit states)")[0]
    if used == "torch":
        adamw_8bit_ref_(param, grad, q_m, q_v, absmax_m, absmax_v, block_size=block_size, **hyper)
        return used
    n = param.numel()
    if n == 0:
        return used
    sc = StepScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    tab = code_tables(param.device)
    rows, warps, int64 = launch_config_8bit(n, block_size, param.device)
    n_blocks = -(-n // block_size)
    _adamw_8bit_kernel[(math.ceil(n_blocks / rows),)](
        param, grad, q_m, q_v, absmax_m, absmax_v, tab.code_m, tab.mid_m, tab.code_v, tab.mid_v,
        grad_scale if grad_scale is not None else param,  # dummy pointer, never read
        n, n_blocks, decay_end,
        sc.decay_factor, sc.w1, sc.beta2, sc.omb2, sc.bc2_sqrt, sc.neg_step, sc.eps, sc.max_step,
        HAS_SCALE=grad_scale is not None, LERP_FROM_END=sc.lerp_from_end, INT64=int64,
        ROWS=rows, BLOCK_SIZE=block_size, num_warps=warps, enable_fp_fusion=False,
    )
    return used
