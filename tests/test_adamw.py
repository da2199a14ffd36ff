"""The fused AdamW kernel against its eager reference and against torch.optim.AdamW.

On CPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set by conftest).
"""
from __future__ import annotations

import math

import pytest
import torch

from freezeasguard.kernels.adamw import (
    AdamWInputError,
    adamw_launches,
    adamw_ref_,
    bytes_per_element,
    clip_coef,
    fused_adamw_,
    global_grad_norm,
    launch_config,
)

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)

# Tolerance on the stored value, keyed by its dtype: (rtol, atol as a fraction of the buffer's
# largest magnitude).
# - fp32: kernel and reference do the same fp32 ops, but torch's CPU/CUDA lerp and addcmul may
#   contract into FMAs and the compiled kernel may too, so single results differ by ~1 ulp and
#   compound over p = p + step * m / denom: 4 ulp (4 * 2**-23) covers it.
# - fp16 / bf16: the fp32 result is rounded once on store; a 1-ulp fp32 difference can cross a
#   rounding boundary, so allow 1 ulp of the stored format (2**-10 / 2**-7 relative).
TOL = {
    torch.float32: (4 * 2.0**-23, 4 * 2.0**-23),
    torch.float16: (2.0**-10, 2.0**-10),
    torch.bfloat16: (2.0**-7, 2.0**-7),
}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    rtol, atol_frac = TOL[expected.dtype]
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol_frac * scale + 1e-30,
        msg=lambda m: f"{what}: {m}",
    )


def make_state(n: int, pdtype: torch.dtype, device: str = "cpu"):
    """Params ~N(0, 1) and mid-training moments (m ~ 1e-3, v ~ 1e-5), so every term matters."""
    p = torch.randn(n, device=device).to(pdtype)
    m = torch.randn(n, device=device) * 1e-3
    v = torch.rand(n, device=device) * 1e-5
    return p, m, v


def run_both(n, pdtype, gdtype, decay_end, scale, steps, device="cpu", start_step=1):
    p, m, v = make_state(n, pdtype, device)
    ours = [p.clone(), m.clone(), v.clone()]
    ref = [p.clone(), m.clone(), v.clone()]
    gs = None if scale is None else torch.tensor([scale], device=device)
    for step in range(start_step, start_step + steps):
        g = (torch.randn(n, device=device) * 1e-2).to(gdtype)
        kw = dict(HP, decay_end=decay_end, step=step, grad_scale=gs)
        used = fused_adamw_(ours[0], g, ours[1], ours[2], backend="triton", **kw)
        assert used == "triton"
        adamw_ref_(ref[0], g.clone(), ref[1], ref[2], **kw)
        for a, b, name in zip(ours, ref, ("param", "exp_avg", "exp_avg_sq")):
            assert_close_dtype(a, b, f"{name} after step {step} ({pdtype}/{gdtype}, n={n})")


DTYPES_CPU = [
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),  # bf16 is only loaded and upcast: exact in the interpreter
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]


@pytest.mark.triton
@pytest.mark.parametrize("pdtype,gdtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [1, 1000, 65536 + 3, 3 * 65536])
def test_kernel_matches_reference_dtypes(pdtype, gdtype, n):
    run_both(n, pdtype, gdtype, decay_end=n // 2, scale=0.37, steps=3)


@pytest.mark.triton
@pytest.mark.parametrize("decay", ["none", "middle", "all"])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_kernel_decay_split_and_grad_scale(decay, scale):
    n = 70001  # two interpreter blocks, ragged tail
    decay_end = {"none": 0, "middle": 40_000, "all": n}[decay]
    run_both(n, torch.float32, torch.float32, decay_end=decay_end, scale=scale, steps=3)


@pytest.mark.triton
def test_kernel_irregular_large():
    """1823 x 781 elements (~1.4M): many programs, ragged last block, late steps."""
    run_both(1823 * 781, torch.float32, torch.float16, decay_end=1823 * 500 + 7, scale=0.37, steps=2,
             start_step=999)


@pytest.mark.triton
def test_kernel_decay_prefix_boundary_exact():
    """With zero gradient and zero moments only weight decay moves p: exactly [0, decay_end)."""
    n, decay_end = 5000, 1234
    p = torch.randn(n)
    p0 = p.clone()
    fused_adamw_(p, torch.zeros(n), torch.zeros(n), torch.zeros(n), backend="triton",
                 **dict(HP, decay_end=decay_end, step=1))
    factor = torch.tensor(1 - HP["lr"] * HP["weight_decay"], dtype=torch.float32)
    torch.testing.assert_close(p[:decay_end], p0[:decay_end] * factor, rtol=0, atol=0)
    assert torch.equal(p[decay_end:], p0[decay_end:])


@pytest.mark.triton
def test_kernel_stays_inside_views():
    """Masked tail: a view into a bigger buffer leaves the neighbours untouched."""
    n, pad = 1001, 17
    big = [torch.randn(n + 2 * pad) for _ in range(4)]
    before = [b.clone() for b in big]
    p, g, m, v = (b[pad:pad + n] for b in big)
    fused_adamw_(p, g, m, v.abs_(), backend="triton", **dict(HP, decay_end=500, step=1))
    for b, b0 in zip(big, before):
        assert torch.equal(b[:pad], b0[:pad]) and torch.equal(b[-pad:], b0[-pad:])


@pytest.mark.triton
def test_empty_buffer_is_a_no_op():
    e = torch.empty(0)
    assert fused_adamw_(e, e.clone(), e.clone(), e.clone(), backend="triton",
                        **dict(HP, decay_end=0, step=1)) == "triton"
    assert adamw_launches(0, "triton") == 0


# --- against torch.optim.AdamW itself -----------------------------------------------------

SHAPES_DECAY = [(7, 3, 3, 3), (33, 17), (5, 1, 1, 1)]
SHAPES_NO_DECAY = [(33,), (1,), (19, 2)]


def _packed_twins(device: str = "cpu"):
    """torch params (two groups) and a flat buffer holding the same values, decay tensors first."""
    shapes = SHAPES_DECAY + SHAPES_NO_DECAY
    ref = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([t.detach().flatten() for t in ref]).clone()
    decay_end = sum(sizes[: len(SHAPES_DECAY)])
    views, off = [], 0
    for s, k in zip(shapes, sizes):
        views.append(flat[off:off + k].view(s))
        off += k
    return ref, flat, views, decay_end


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_matches_torch_optim_adamw(backend, max_norm):
    ref, flat, views, decay_end = _packed_twins()
    nd = len(SHAPES_DECAY)
    opt = torch.optim.AdamW(
        [{"params": ref[:nd], "weight_decay": 0.1}, {"params": ref[nd:], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False,
    )
    grad = torch.zeros_like(flat)
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    for step in range(1, 6):
        grads = [torch.randn_like(t) * 0.3 for t in ref]
        for t, g in zip(ref, grads):
            t.grad = g.clone()
        off = 0
        for g in grads:  # what autograd does when .grad are views of the flat buffer
            grad[off:off + g.numel()] = g.flatten()
            off += g.numel()
        scale = None
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref, max_norm)
            scale = clip_coef(grad, max_norm)
        opt.step()
        fused_adamw_(flat, grad, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                     decay_end=decay_end, step=step, grad_scale=scale, backend=backend)
    for t, view in zip(ref, views):
        torch.testing.assert_close(view, t.detach(), rtol=1e-6, atol=1e-7)


def test_clip_coef_matches_clip_grad_norm():
    g = torch.randn(10_000) * 3
    coef = clip_coef(g, 1.0)
    assert coef.device == g.device and coef.dtype == torch.float32 and coef.numel() == 1
    t = torch.nn.Parameter(torch.zeros(10_000))
    t.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_([t], 1.0)
    torch.testing.assert_close(global_grad_norm(g), norm)
    torch.testing.assert_close(g * coef, t.grad)
    assert clip_coef(g * 0 + 1e-9, 1.0).item() == 1.0  # never scales up
    torch.testing.assert_close(global_grad_norm(g.half()), torch.linalg.vector_norm(g.half().float()))


# --- validation, dispatch, bookkeeping ----------------------------------------------------


def _bufs(n=8):
    return torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)


def _step(*bufs, **over):
    kw = dict(HP, decay_end=0, step=1)
    kw.update(over)
    return fused_adamw_(*bufs, **kw)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: (b[0], b[1][:7], b[2], b[3]), "grad has 7 elements"),
        (lambda b: (b[0].view(2, 4), b[1], b[2], b[3]), "flat 1-D"),
        (lambda b: (torch.randn(16)[::2], b[1], b[2], b[3]), "contiguous"),
        (lambda b: (b[0].double(), b[1], b[2], b[3]), "param dtype"),
        (lambda b: (b[0], b[1].double(), b[2], b[3]), "grad dtype"),
        (lambda b: (b[0], b[1], b[2].half(), b[3]), "exp_avg must be"),
        (lambda b: (b[0], b[1].to("meta"), b[2], b[3]), "grad is on meta"),
        (lambda b: (b[0], b[1].numpy(), b[2], b[3]), "must be a torch.Tensor"),
    ],
)
def test_invalid_buffers_raise(mutate, match):
    with pytest.raises(AdamWInputError, match=match):
        _step(*mutate(_bufs()))


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(step=0), "step must be"),
        (dict(step=1.0), "step must be"),
        (dict(decay_end=9), "decay_end must be"),
        (dict(decay_end=-1), "decay_end must be"),
        (dict(lr=-1.0), "lr must be"),
        (dict(beta2=1.0), "beta2 must be"),
        (dict(weight_decay=float("nan")), "weight_decay must be"),
        (dict(grad_scale=torch.ones(2)), "1-element"),
        (dict(grad_scale=torch.ones(1, dtype=torch.float64)), "float32"),
        (dict(grad_scale=torch.ones(1, device="meta")), "no host sync"),
    ],
)
def test_invalid_hyperparameters_raise(over, match):
    with pytest.raises(AdamWInputError, match=match):
        _step(*_bufs(), **over)
    assert issubclass(AdamWInputError, ValueError)


@pytest.mark.triton
def test_backend_dispatch(monkeypatch):
    assert _step(*_bufs(), backend="torch") == "torch"
    assert _step(*_bufs(), backend="auto") == "torch"  # CPU: never the interpreter unasked
    assert _step(*_bufs(), backend="triton") == "triton"  # the interpreter is on in tests
    with pytest.raises(ValueError, match="backend must be"):
        _step(*_bufs(), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _step(*_bufs(), backend="auto") == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is not 1.*backend='auto'"):
        _step(*_bufs(), backend="triton")


def test_launch_config_and_bytes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    assert launch_config(10, cuda) == (1024, 4, False)
    assert launch_config(2**31 - 1024, cuda)[2] is False  # last offset 2**31 - 1 still fits
    assert launch_config(2**31 - 1023, cuda)[2] is True
    assert launch_config(859_520_964, cuda) == (1024, 4, False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch_config(1, cuda)[0] == 1
    assert launch_config(1823 * 781, torch.device("cpu"))[0] == 65536
    assert bytes_per_element(torch.float32, torch.float32) == 28
    assert bytes_per_element(torch.bfloat16, torch.bfloat16) == 22
    assert bytes_per_element(torch.float32, torch.float16) == 26
    assert adamw_launches(10, "triton") == 1 and adamw_launches(10, "torch") is None


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pdtype,gdtype",
    DTYPES_CPU + [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=lambda d: str(d).split(".")[-1],
)
def test_kernel_matches_reference_cuda(pdtype, gdtype):
    run_both(1823 * 781, pdtype, gdtype, decay_end=1823 * 300, scale=0.37, steps=3, device="cuda")


@pytest.mark.gpu
@pytest.mark.slow
def test_kernel_int64_offsets_cuda():
    """A buffer past 2**31 elements: the tail, beyond int32 offsets, is updated correctly."""
    n = 2**31 + 3 * 1024 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < n * 14 + (1 << 30):
        pytest.skip("needs ~31 GB of free device memory")
    p = torch.zeros(n, device="cuda", dtype=torch.float16)
    g = torch.ones(n, device="cuda", dtype=torch.float16)
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    win = slice(2**31 - 4096, n)  # straddles the int32 boundary
    expect = [t[win].clone() for t in (p, g, m, v)]
    fused_adamw_(p, g, m, v, backend="triton", **dict(HP, decay_end=2**31 + 7, step=1))
    adamw_ref_(*expect, **dict(HP, decay_end=4096 + 7, step=1))
    for a, b in zip((p[win], m[win], v[win]), (expect[0], expect[2], expect[3])):
        assert_close_dtype(a, b, "int64 window")


def test_torch_fused_backend_matches_reference():
    """The CPU path of the engine's optimizer: torch's fused AdamW over the two decay ranges."""
    from freezeasguard.kernels.adamw import adamw_ref_, fused_adamw_

    torch.manual_seed(1)
    n, decay_end = 70001, 31234
    p0 = torch.randn(n)
    bufs = {k: (p0.clone(), torch.zeros(n), torch.zeros(n)) for k in ("ref", "fused")}
    for step in range(1, 4):
        g = torch.randn(n)
        scale = torch.tensor([0.37])
        for k, fn in (("ref", adamw_ref_), ("fused", None)):
            p, m, v = bufs[k]
            kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay_end=decay_end,
                      step=step, grad_scale=scale)
            if fn is None:
                assert fused_adamw_(p, g, m, v, backend="torch_fused", **kw) == "torch_fused"
            else:
                fn(p, g, m, v, **kw)
    # fp32, a few ops deep, different (vectorised) evaluation order: a few ulp
    for a, b in zip(bufs["ref"], bufs["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
