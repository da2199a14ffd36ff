"""Compact AdamW states: bf16 (stochastically rounded) and blockwise 8-bit, against their eager
references, against fp32 AdamW over many steps, and against bitsandbytes.

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest), on small
buffers: the interpreter's cost is per program and per op, not per element.
"""
from __future__ import annotations

import math

import pytest
import torch

from freezeasguard.kernels.adamw import AdamWInputError
from freezeasguard.kernels.adamw_lowp import (
    ZERO_CODE_M,
    ZERO_CODE_V,
    adamw_8bit_,
    adamw_8bit_ref_,
    adamw_bf16_states_,
    adamw_bf16_states_ref_,
    bytes_per_element_lowp,
    code_tables,
    dynamic_code,
    new_8bit_states,
    state_bytes_per_element,
    stochastic_round_bf16,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
BF16_ULP_AT_1 = 2.0**-7
F32_ULP = 2.0**-23


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, what
    diff = (_bits(a) != _bits(b)).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ"


def assert_bf16_close_cuda(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """CUDA: exactness is expected (no FMA contraction, correctly rounded div/sqrt on both sides);
    the slack admits a rare 1-ulp difference if a compiler knob re-enables contraction: a
    differing fp32 value crosses a stochastic-rounding carry with probability ~2**-16."""
    d = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 1e-4, what


def bf16_state(n: int, device: str = "cpu"):
    """Params ~N(0, 1) and mid-training moments (m ~ 1e-3, v ~ 1e-5), so every term matters."""
    return (torch.randn(n, device=device), (torch.randn(n, device=device) * 1e-3).bfloat16(),
            (torch.rand(n, device=device) * 1e-5).bfloat16())


def run_bf16(n, *, decay_end, scale, steps, gdtype=torch.float32, start_step=1, offset=0, device="cpu"):
    p, m, v = bf16_state(n, device)
    ours, ref = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    gs = None if scale is None else torch.tensor([scale], device=device)
    for step in range(start_step, start_step + steps):
        g = (torch.randn(n, device=device) * 1e-2).to(gdtype)
        kw = dict(HP, decay_end=decay_end, step=step, grad_scale=gs, seed=1234, offset=offset)
        assert adamw_bf16_states_(ours[0], g, ours[1], ours[2], backend="triton", **kw) == "triton"
        adamw_bf16_states_ref_(ref[0], g.clone(), ref[1], ref[2], **kw)
        for a, b, name in zip(ours, ref, ("param", "exp_avg", "exp_avg_sq")):
            what = f"{name} after step {step} (n={n}, grad {gdtype})"
            if device == "cpu":
                assert_bits_equal(a, b, what)
            elif name == "param":
                torch.testing.assert_close(a, b, rtol=4 * F32_ULP, atol=4 * F32_ULP)
            else:
                assert_bf16_close_cuda(a, b, what)
    return ours


def assert_8bit_close(ours: dict, ref: dict, what: str) -> None:
    """Param within 4 fp32 ulp (as tests/test_adamw.py); codes: the same fp32 value on both sides
    gives the same code, so a code can only move when a value 1 ulp apart straddles a midpoint of
    the table: >= 99.9% identical and the rest one code apart; absmax (a max of such values)
    within 2 ulp. In the interpreter both sides do the same fp32 ops and agree exactly."""
    torch.testing.assert_close(ours["p"], ref["p"], rtol=4 * F32_ULP, atol=4 * F32_ULP * ref["p"].abs().max().item(),
                               msg=lambda m: f"{what}: param: {m}")
    for k in ("q_m", "q_v"):
        d = (ours[k].int() - ref[k].int()).abs()
        assert d.max().item() <= 1 and (d == 0).float().mean().item() >= 0.999, f"{what}: {k}"
    for k in ("absmax_m", "absmax_v"):
        torch.testing.assert_close(ours[k], ref[k], rtol=2 * F32_ULP, atol=0, msg=lambda m: f"{what}: {k}: {m}")


def run_8bit(n, *, block_size, decay_end, scale, steps, gdtype=torch.float32, device="cpu"):
    p0 = torch.randn(n, device=device)
    ours = dict(p=p0.clone(), **new_8bit_states(n, block_size, device))
    ref = {k: t.clone() for k, t in ours.items()}
    gs = None if scale is None else torch.tensor([scale], device=device)
    for step in range(1, steps + 1):
        # per-element scales over two decades, so codes spread over several table decades
        g = (torch.randn(n, device=device) * 1e-2 * 10 ** (2 * torch.rand(n, device=device))).to(gdtype)
        kw = dict(HP, decay_end=decay_end, step=step, grad_scale=gs, block_size=block_size)
        st = [ours[k] for k in ("q_m", "q_v", "absmax_m", "absmax_v")]
        assert adamw_8bit_(ours["p"], g, *st, backend="triton", **kw) == "triton"
        adamw_8bit_ref_(ref["p"], g, *(ref[k] for k in ("q_m", "q_v", "absmax_m", "absmax_v")), **kw)
        assert_8bit_close(ours, ref, f"step {step} (n={n}, block {block_size}, grad {gdtype})")
    return ours


# --- bf16 states ---------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 1000, 65536 + 3])
def test_bf16_kernel_matches_reference_bit_exact(n, gdtype):
    run_bf16(n, decay_end=n // 2, scale=0.37, steps=3, gdtype=gdtype)


@pytest.mark.triton
def test_bf16_late_steps_and_index_past_2_to_32():
    """The hash's high index word and late bias corrections match too."""
    run_bf16(3000, decay_end=1000, scale=None, steps=2, start_step=999, offset=2**33 + 5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
def test_bf16_subranges_with_offset_equal_whole_buffer(backend):
    n, decay_end = 5000, 3000
    p, m, v = bf16_state(n)
    whole, parts = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    for step in (1, 2):
        g = torch.randn(n) * 1e-2
        kw = dict(HP, step=step, seed=7)
        adamw_bf16_states_(*whole[:1], g, *whole[1:], decay_end=decay_end, backend=backend, **kw)
        for lo, hi in ((0, 1234), (1234, 4000), (4000, n)):
            de = min(max(decay_end - lo, 0), hi - lo)  # decay_end counts from the slice's start
            adamw_bf16_states_(parts[0][lo:hi], g[lo:hi], parts[1][lo:hi], parts[2][lo:hi], decay_end=de,
                               offset=lo, backend=backend, **kw)
        for a, b, name in zip(parts, whole, ("param", "exp_avg", "exp_avg_sq")):
            assert_bits_equal(a, b, f"{name} after step {step}")


@pytest.mark.triton
def test_bf16_decay_prefix_boundary_exact():
    """Zero gradient and moments: only weight decay moves p, on exactly [0, decay_end); 0 rounds to 0."""
    n, decay_end = 5000, 1234
    p = torch.randn(n)
    p0 = p.clone()
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    adamw_bf16_states_(p, torch.zeros(n), m, v, backend="triton", seed=3, **dict(HP, decay_end=decay_end, step=1))
    factor = torch.tensor(1 - HP["lr"] * HP["weight_decay"], dtype=torch.float32)
    assert torch.equal(p[:decay_end], p0[:decay_end] * factor) and torch.equal(p[decay_end:], p0[decay_end:])
    assert not m.any() and not v.any()


@pytest.mark.triton
def test_bf16_stochastic_rounding_is_unbiased_and_streams_independent():
    """beta1 = 0 stores m = sr(g), beta2 = 0 stores v = sr(g*g): the kernel's rounding itself.

    Each stored value is one of the two bf16 neighbours a < x < a + u, ``a + u`` with probability
    ``p = (x - a) / u``, so the mean of N draws has std ``u * sqrt(p (1 - p) / N) <= u / (2 sqrt N)``.
    With N = 16384 per value, 5 std is 0.02 u; round-to-nearest would be off by 0.3 u here.
    """
    u = BF16_ULP_AT_1
    xs = [1 + 0.3 * u, -(1 + 0.7 * u), 1.5 + 0.9 * u, 3e-5 * (1 + 0.45 * u)]  # the last in another binade
    per = 16384
    g = torch.tensor(xs).repeat_interleave(per)
    p, m, v = torch.zeros_like(g), torch.zeros_like(g, dtype=torch.bfloat16), torch.zeros_like(g, dtype=torch.bfloat16)
    adamw_bf16_states_(p, g, m, v, backend="triton", seed=11,
                       **dict(HP, beta1=0.0, beta2=0.0, weight_decay=0.0, decay_end=0, step=5))
    g2 = g * g
    for i, x in enumerate(xs):
        sl = slice(i * per, (i + 1) * per)
        ulp = 2.0 ** (math.frexp(abs(x))[1] - 8)  # bf16 spacing at |x|: 8 significant bits
        vals = m[sl].float()
        assert bool(((vals > x - ulp) & (vals < x + ulp)).all()) and len(vals.unique()) <= 2, x
        assert abs(vals.double().mean().item() - x) <= 5 * ulp / (2 * math.sqrt(per)), x
        ulp2 = 2.0 ** (math.frexp(g2[sl][0].item())[1] - 8)
        assert abs(v[sl].float().double().mean().item() - g2[sl][0].item()) <= 5 * ulp2 / (2 * math.sqrt(per)), x
    # Different hash streams for m and v: within each value their round-up decisions are
    # uncorrelated (the sample correlation of N independent pairs has std 1/sqrt(N) = 0.008).
    up = torch.stack([(m.float().abs() > g.abs()).float(), (v.float() > g2).float()]).view(2, len(xs), per)
    for i in range(len(xs)):
        if bool((up[:, i].std(dim=1) > 0).all()):
            corr = torch.corrcoef(up[:, i])[0, 1].item()
            assert abs(corr) < 5 / math.sqrt(per), (xs[i], corr)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
def test_bf16_stochastic_rounding_does_not_stall_v(backend):
    """g*g = 2 v: v grows by (1 + (1 - b2)) = 1.001 per step, a 0.1% change below half a bf16 ulp.

    Round to nearest maps 1.001 back to 1.0 forever; stochastic rounding keeps E[v_k] = 1.001**k.
    After 100 steps each v carries rounding noise of std ~2.6e-3 * sqrt(100) (relative), so the
    mean over 2048 elements is within ~6e-4 of 1.105; the bound, 1%, is far from both.
    """
    n, steps = 2048, 100
    v_sr = torch.ones(n, dtype=torch.bfloat16)
    v_rn = v_sr.clone()
    p, m = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)
    kw = dict(HP, weight_decay=0.0, decay_end=0)
    for step in range(1, steps + 1):
        g = torch.sqrt(2 * v_sr.float())
        adamw_bf16_states_(p, g, m, v_sr, step=step, seed=5, backend=backend, **kw)
        g = torch.sqrt(2 * v_rn.float())  # the same fp32 update, rounded to nearest
        v_rn = (v_rn.float() * HP["beta2"] + (1 - HP["beta2"]) * g * g).bfloat16()
    assert torch.equal(v_rn, torch.ones(n, dtype=torch.bfloat16)), "round-to-nearest should stall"
    assert v_sr.float().mean().item() == pytest.approx(1.001**steps, rel=0.01)


def test_stochastic_round_helper_edges():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf"), float("nan"), 1 + 2**-9, -(1 + 2**-9),
                      3.0e38, 1e-40])
    outs = torch.stack([stochastic_round_bf16(x, seed=s).float() for s in range(64)])
    exact = x[:6]
    assert torch.equal(outs[:, :6], exact.expand(64, -1)) and bool(outs[:, 6].isnan().all())
    for j, (a, b) in ((7, (1.0, 1 + 2**-7)), (8, (-(1 + 2**-7), -1.0))):
        assert set(outs[:, j].tolist()) == {a, b}
    assert bool((outs[:, 9] >= 2.9e38).all()) and bool((outs[:, 10] >= 0).all())  # near max, denormal
    # determinism: same seed and step, same bits; another step, other bits
    y = torch.rand(4096) + 1
    assert torch.equal(stochastic_round_bf16(y, seed=1, step=3), stochastic_round_bf16(y, seed=1, step=3))
    assert not torch.equal(stochastic_round_bf16(y, seed=1, step=3), stochastic_round_bf16(y, seed=1, step=4))
    assert not torch.equal(stochastic_round_bf16(y, seed=1), stochastic_round_bf16(y, seed=2))


# --- 8-bit states --------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("n", [1, 100, 5 * 256 + 37, 70001])
def test_8bit_kernel_matches_reference(n, block_size):
    run_8bit(n, block_size=block_size, decay_end=n // 3, scale=0.37, steps=3)


@pytest.mark.triton
def test_8bit_kernel_matches_reference_low_precision_grads():
    run_8bit(3001, block_size=256, decay_end=3001, scale=None, steps=2, gdtype=torch.bfloat16)


@pytest.mark.triton
def test_8bit_partial_block_absmax_and_views():
    """The trailing partial block's absmax covers its own elements only; neighbours are untouched."""
    n, bs, pad = 3 * 256 + 37, 256, 64
    big_p, big_g = torch.randn(n + 2 * pad), torch.randn(n + 2 * pad)
    big_q = torch.full((n + 2 * pad,), 200, dtype=torch.uint8)
    before = [t.clone() for t in (big_p, big_q)]
    st = new_8bit_states(n, bs)
    win = slice(pad, pad + n)
    big_q[win] = ZERO_CODE_M
    adamw_8bit_(big_p[win], big_g[win], big_q[win], st["q_v"], st["absmax_m"], st["absmax_v"], backend="triton",
                **dict(HP, decay_end=0, step=1))
    for t, t0 in zip((big_p, big_q), before):
        assert torch.equal(t[:pad], t0[:pad]) and torch.equal(t[-pad:], t0[-pad:])
    g = big_g[win]
    m1, v1 = (1 - HP["beta1"]) * g, (1 - HP["beta2"]) * g * g  # step 1 from zero moments
    for k in range(4):
        blk = slice(k * bs, min(n, (k + 1) * bs))
        torch.testing.assert_close(st["absmax_m"][k], m1[blk].abs().max(), rtol=2 * F32_ULP, atol=0)
        torch.testing.assert_close(st["absmax_v"][k], v1[blk].max(), rtol=2 * F32_ULP, atol=0)


@pytest.mark.triton
def test_8bit_block_aligned_subranges_equal_whole_buffer():
    n, bs, cut, decay_end = 1500, 128, 512, 700
    p0, g = torch.randn(n), torch.randn(n) * 1e-2
    whole = dict(p=p0.clone(), **new_8bit_states(n, bs))
    parts = {k: t.clone() for k, t in whole.items()}
    kw = dict(HP, step=1, block_size=bs)
    adamw_8bit_(whole["p"], g, whole["q_m"], whole["q_v"], whole["absmax_m"], whole["absmax_v"],
                decay_end=decay_end, **kw)
    for lo, hi in ((0, cut), (cut, n)):
        b = slice(lo // bs, -(-hi // bs))
        adamw_8bit_(parts["p"][lo:hi], g[lo:hi], parts["q_m"][lo:hi], parts["q_v"][lo:hi], parts["absmax_m"][b],
                    parts["absmax_v"][b], decay_end=min(max(decay_end - lo, 0), hi - lo), **kw)
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
def test_8bit_zero_states_decode_to_zero_and_decay_boundary(backend):
    n, decay_end = 1000, 333
    st = new_8bit_states(n, 256)
    tab = code_tables("cpu")
    assert tab.code_m[ZERO_CODE_M].item() == 0.0 and tab.code_v[ZERO_CODE_V].item() == 0.0
    assert st["absmax_m"].shape == (4,) and not st["absmax_m"].any() and not st["absmax_v"].any()
    decoded = tab.code_m[st["q_m"].long()] * st["absmax_m"].repeat_interleave(256)[:n]
    assert torch.equal(decoded, torch.zeros(n))
    p = torch.randn(n)
    p0 = p.clone()
    adamw_8bit_(p, torch.zeros(n), *st.values(), backend=backend, **dict(HP, decay_end=decay_end, step=1))
    factor = torch.tensor(1 - HP["lr"] * HP["weight_decay"], dtype=torch.float32)
    assert torch.equal(p[:decay_end], p0[:decay_end] * factor) and torch.equal(p[decay_end:], p0[decay_end:])
    assert bool((st["q_m"] == ZERO_CODE_M).all()) and bool((st["q_v"] == ZERO_CODE_V).all())
    assert not st["absmax_m"].any() and not st["absmax_v"].any()


def test_dynamic_tables():
    s, u = dynamic_code(signed=True), dynamic_code(signed=False)
    for t in (s, u):
        assert t.shape == (256,) and t.dtype == torch.float32 and bool((t[1:] > t[:-1]).all())
        assert t[-1].item() == 1.0
    assert s[ZERO_CODE_M].item() == 0.0 and (s < 0).sum().item() == 127 and s[0].item() > -1.0
    assert u[ZERO_CODE_V].item() == 0.0 and u[0].item() == 0.0 and (u > 0).sum().item() == 255
    # exponent-like spacing: relative precision is kept over six decades below absmax
    for t in (s, u):
        pos = t[t > 0]
        assert pos.min().item() < 1e-6 and ((pos[1:] - pos[:-1]) / pos[1:]).max().item() < 1.0
    tab = code_tables("cpu")
    assert torch.equal(tab.mid_m, (s[:-1] + s[1:]) / 2) and tab.mid_v.shape == (255,)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
def test_8bit_quantizer_is_nearest_on_and_around_midpoints(backend):
    """beta1 = beta2 = 0 store m = g and v = g*g; with a 1.0 opening each block, absmax is 1 and the
    stored codes are those of g and g*g themselves: they must equal bucketize over the midpoints
    (the nearest entry, ties down) on every midpoint, both its fp32 neighbours and every entry,
    except that a positive v never takes the zero code (it would turn into a lr*m/eps step)."""
    tab, bs = code_tables("cpu"), 1024
    inf = torch.tensor(math.inf)

    def probe(mids, code):
        vals = torch.cat([mids, torch.nextafter(mids, -inf), torch.nextafter(mids, inf), code])
        return torch.cat([torch.ones(1), vals, torch.zeros(bs - 1 - vals.numel())])

    gm = torch.cat([probe(tab.mid_m, tab.code_m), torch.ones(1), torch.rand(bs - 1) * 2 - 1])
    gv = torch.cat([probe(tab.mid_v, tab.code_v).clamp(min=0).sqrt(), torch.ones(1), torch.rand(bs - 1) ** 4])
    gv[-1] = 1e-15  # v = 1e-30, far below the smallest positive entry
    kw = dict(HP, beta1=0.0, beta2=0.0, weight_decay=0.0, decay_end=0, step=1, block_size=bs, backend=backend)
    for g, key, mids in ((gm, "q_m", tab.mid_m), (gv, "q_v", tab.mid_v)):
        st = new_8bit_states(g.numel(), bs)
        adamw_8bit_(torch.zeros_like(g), g, *st.values(), **kw)
        x = g if key == "q_m" else g * g
        want = torch.bucketize(x, mids)
        if key == "q_v":
            want = torch.maximum(want, (x > 0).long())
        assert torch.equal(st[key].long(), want), key
    assert st["q_v"][-1].item() == 1


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["bf16", "8bit"])
def test_grad_scale_equals_prescaled_grad(kind):
    n = 3000
    g, gs = torch.randn(n) * 1e-2, torch.tensor([0.37])
    a = torch.randn(n)
    b = a.clone()
    if kind == "bf16":
        sa = [torch.zeros(n, dtype=torch.bfloat16) for _ in range(2)]
        sb = [t.clone() for t in sa]
        for step in (1, 2):
            adamw_bf16_states_(a, g, *sa, grad_scale=gs, seed=1, backend="triton", **dict(HP, decay_end=100, step=step))
            adamw_bf16_states_(b, g * gs, *sb, seed=1, backend="triton", **dict(HP, decay_end=100, step=step))
    else:
        sa, sb = list(new_8bit_states(n).values()), list(new_8bit_states(n).values())
        for step in (1, 2):
            adamw_8bit_(a, g, *sa, grad_scale=gs, backend="triton", **dict(HP, decay_end=100, step=step))
            adamw_8bit_(b, g * gs, *sb, backend="triton", **dict(HP, decay_end=100, step=step))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))


# --- accuracy against fp32 AdamW ------------------------------------------------------------

# 200 steps on a noisy quadratic (per-coordinate curvature over two decades, so coordinates
# converge at different rates), weight decay on the first half, against torch.optim.AdamW
# with fp32 states. Measured: the deviation ||w - w_fp32|| / ||w_fp32 - w_0|| (relative to the
# distance the run moved) is ~0.3% for bf16 and ~4% (noisy) / ~6.5% (noiseless) for 8-bit.
# - bf16: each stored moment is off by < 1 bf16 ulp (2**-8 relative), zero-mean, so one step's
#   direction is off by < ~0.6% and the errors average out; 2% is 3x one step's worst case.
# - 8-bit: nearest rounding in the dynamic table is off by up to half its local spacing: 0.35-0.7%
#   near absmax, 7% at 0.1 absmax and more below, and it is biased (deterministic), so errors
#   persist for coordinates far below their block's absmax; 12% / 18% leave ~3x the measured.
ACCURACY_TOL = {("bf16", 0.3): 0.02, ("bf16", 0.0): 0.02, ("8bit", 0.3): 0.12, ("8bit", 0.0): 0.18}


@pytest.mark.parametrize("sigma", [0.3, 0.0], ids=["noisy", "noiseless"])
@pytest.mark.parametrize("kind", ["bf16", "8bit"])
def test_accuracy_vs_fp32_adamw_over_200_steps(kind, sigma):
    n, steps, lr, de = 4096, 200, 1e-2, 2048
    gen = torch.Generator().manual_seed(0)
    w_star, w0 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h = torch.logspace(-2, 0, n)[torch.randperm(n, generator=gen)]
    noise = [torch.randn(n, generator=gen) * sigma for _ in range(steps)]
    ref = [torch.nn.Parameter(w0[:de].clone()), torch.nn.Parameter(w0[de:].clone())]
    opt = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.01}, {"params": ref[1:], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    w = w0.clone()
    states = ([torch.zeros(n, dtype=torch.bfloat16) for _ in range(2)] if kind == "bf16"
              else list(new_8bit_states(n).values()))
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decay_end=de)
    for k in range(steps):
        for t, sl in zip(ref, (slice(0, de), slice(de, n))):
            t.grad = h[sl] * (t.detach() - w_star[sl]) + noise[k][sl]
        opt.step()
        g = h * (w - w_star) + noise[k]
        # the eager references: bit-identical (bf16) / code-identical (8-bit) to the kernels, above
        if kind == "bf16":
            adamw_bf16_states_(w, g, *states, step=k + 1, seed=0, backend="torch", **kw)
        else:
            adamw_8bit_(w, g, *states, step=k + 1, backend="torch", **kw)
    w_ref = torch.cat([t.detach() for t in ref])
    moved = (w_ref - w0).norm().item()
    assert moved > 0.3 * (w0 - w_star).norm().item()  # the run did travel
    assert (w - w_ref).norm().item() / moved <= ACCURACY_TOL[(kind, sigma)]


# --- validation, dispatch, bookkeeping ----------------------------------------------------


def _bf16_bufs(n=8):
    return [torch.randn(n), torch.randn(n), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)]


def _8bit_bufs(n=300):
    return [torch.randn(n), torch.randn(n), *new_8bit_states(n, 256).values()]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: (b[0], b[1][:7], b[2], b[3]), "grad has 7 elements"),
        (lambda b: (b[0].view(2, 4), b[1], b[2], b[3]), "flat 1-D"),
        (lambda b: (torch.randn(16)[::2], b[1], b[2], b[3]), "contiguous"),
        (lambda b: (b[0].bfloat16(), b[1], b[2], b[3]), "param dtype"),
        (lambda b: (b[0], b[1].double(), b[2], b[3]), "grad dtype"),
        (lambda b: (b[0], b[1], b[2].float(), b[3]), "exp_avg dtype"),
        (lambda b: (b[0], b[1], b[2], b[3][:4]), "exp_avg_sq has 4 elements"),
        (lambda b: (b[0], b[1].to("meta"), b[2], b[3]), "grad is on meta"),
        (lambda b: (b[0], b[1].numpy(), b[2], b[3]), "must be a torch.Tensor"),
    ],
)
def test_bf16_invalid_buffers_raise(mutate, match):
    with pytest.raises(AdamWInputError, match=match):
        adamw_bf16_states_(*mutate(_bf16_bufs()), seed=0, **dict(HP, decay_end=0, step=1))


@pytest.mark.parametrize(
    "idx,bad,match",
    [
        (2, torch.zeros(300, dtype=torch.int8), "q_m dtype"),
        (3, torch.zeros(299, dtype=torch.uint8), "q_v has 299 elements"),
        (4, torch.zeros(3), r"absmax_m has 3 elements, expected ceil\(300 / 256\) = 2"),
        (5, torch.zeros(2, dtype=torch.float64), "absmax_v dtype"),
        (5, torch.zeros(4)[::2], "contiguous"),
    ],
)
def test_8bit_invalid_buffers_raise(idx, bad, match):
    bufs = _8bit_bufs()
    bufs[idx] = bad
    with pytest.raises(AdamWInputError, match=match):
        adamw_8bit_(*bufs, **dict(HP, decay_end=0, step=1))


@pytest.mark.parametrize(
    "kind,over,match",
    [
        ("bf16", dict(seed=-1), "seed must be"),
        ("bf16", dict(seed=1.5), "seed must be"),
        ("bf16", dict(offset=-3), "offset must be"),
        ("bf16", dict(step=0), "step must be"),
        ("8bit", dict(block_size=100), "block_size must be"),
        ("8bit", dict(block_size=8), "block_size must be"),
        ("8bit", dict(decay_end=301), "decay_end must be"),
        ("8bit", dict(beta1=1.0), "beta1 must be"),
        ("8bit", dict(lr=float("nan")), "lr must be"),
        ("8bit", dict(grad_scale=torch.ones(1, dtype=torch.float64)), "float32"),
        ("bf16", dict(grad_scale=torch.ones(2)), "1-element"),
    ],
)
def test_invalid_arguments_raise(kind, over, match):
    kw = dict(HP, decay_end=0, step=1)
    if kind == "bf16":
        kw["seed"] = 0
    kw.update(over)
    with pytest.raises(AdamWInputError, match=match):
        (adamw_bf16_states_(*_bf16_bufs(), **kw) if kind == "bf16" else adamw_8bit_(*_8bit_bufs(), **kw))


@pytest.mark.triton
def test_backend_dispatch(monkeypatch):
    kw = dict(HP, decay_end=0, step=1)
    assert adamw_bf16_states_(*_bf16_bufs(), seed=0, backend="auto", **kw) == "torch"  # CPU: never the interpreter
    assert adamw_8bit_(*_8bit_bufs(), backend="auto", **kw) == "torch"
    assert adamw_bf16_states_(*_bf16_bufs(), seed=0, backend="triton", **kw) == "triton"
    assert adamw_8bit_(*_8bit_bufs(), backend="torch", **kw) == "torch"
    assert adamw_8bit_(*_8bit_bufs(0), backend="triton", **kw) == "triton"  # empty: no launch
    with pytest.raises(ValueError, match="backend must be"):
        adamw_8bit_(*_8bit_bufs(), backend="torch_fused", **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert adamw_bf16_states_(*_bf16_bufs(), seed=0, backend="auto", **kw) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is not 1.*backend='auto'"):
        adamw_8bit_(*_8bit_bufs(), backend="triton", **kw)


def test_bytes_per_element():
    assert bytes_per_element_lowp("fp32") == 28  # = kernels.adamw.bytes_per_element(fp32, fp32)
    assert bytes_per_element_lowp("bf16") == 20 and bytes_per_element_lowp("bf16", torch.bfloat16) == 18
    assert bytes_per_element_lowp("8bit") == 16 + 16 / 256
    assert state_bytes_per_element("fp32") == 8 and state_bytes_per_element("bf16") == 4
    assert state_bytes_per_element("8bit", 256) == 2 + 8 / 256
    with pytest.raises(ValueError, match="kind must be"):
        bytes_per_element_lowp("int4")


# --- CUDA, bitsandbytes -------------------------------------------------------------------


@pytest.mark.gpu
def test_kernels_match_reference_cuda():
    run_bf16(1823 * 781, decay_end=1823 * 300, scale=0.37, steps=3, device="cuda")
    run_bf16(100_003, decay_end=0, scale=None, steps=2, gdtype=torch.bfloat16, device="cuda")
    run_8bit(1823 * 781, block_size=256, decay_end=1823 * 300, scale=0.37, steps=3, device="cuda")
    run_8bit(100_003, block_size=2048, decay_end=100_003, scale=None, steps=2, device="cuda")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_matches_bitsandbytes_blockwise_8bit(device):
    """The same flat buffer through bitsandbytes' blockwise 8-bit Adam (block 256, our tables).

    Same scheme, so the same trajectory up to rounding: bitsandbytes updates m as ``b1 m + (1-b1) g``
    (ours: torch's lerp), scales eps by sqrt(bc2), and its quantizer is not always the nearest
    entry for values far below absmax (its CPU one snaps them coarsely). Measured on its CPU
    backend after 20 steps: params 0.6% of the distance moved apart, decoded m / v within 3% / 0.7%
    of absmax; the bounds leave ~3-10x.
    """
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):  # one fp32 ulp: bitsandbytes forms the linspace in fp32
        torch.testing.assert_close(dynamic_code(signed), bnb_f.create_dynamic_map(signed=signed), rtol=2 * F32_ULP,
                                   atol=0)
    n, bs, steps = 256 * 40 + 77, 256, 20
    tab = code_tables(device)
    p0 = torch.randn(n, device=device)
    ours = dict(p=p0.clone(), **new_8bit_states(n, bs, device))
    theirs = dict(p=p0.clone(), q_m=torch.zeros(n, dtype=torch.uint8, device=device),
                  q_v=torch.zeros(n, dtype=torch.uint8, device=device),
                  absmax_m=torch.zeros(41, device=device), absmax_v=torch.zeros(41, device=device))
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    for step in range(1, steps + 1):
        g = torch.randn(n, device=device) * 1e-2 * (1 + torch.arange(n, device=device) % 7)
        adamw_8bit_(ours["p"], g, ours["q_m"], ours["q_v"], ours["absmax_m"], ours["absmax_v"], decay_end=n,
                    step=step, **hp)  # bitsandbytes decays the whole tensor
        bnb_f.optimizer_update_8bit_blockwise(
            "adam", g, theirs["p"], theirs["q_m"], theirs["q_v"], hp["beta1"], hp["beta2"], 0.0, 0.0, hp["eps"],
            step, hp["lr"], tab.code_m, tab.code_v, theirs["absmax_m"], theirs["absmax_v"],
            weight_decay=hp["weight_decay"], gnorm_scale=1.0)
    moved = (theirs["p"] - p0).norm().item()
    assert (ours["p"] - theirs["p"]).norm().item() <= 0.05 * moved
    for code, q, a, tol in (("code_m", "q_m", "absmax_m", 0.1), ("code_v", "q_v", "absmax_v", 0.05)):
        torch.testing.assert_close(ours[a], theirs[a], rtol=0.05, atol=0)
        scale = theirs[a].repeat_interleave(bs)[:n]
        dec = [getattr(tab, code)[s[q].long()] * s[a].repeat_interleave(bs)[:n] for s in (ours, theirs)]
        assert ((dec[0] - dec[1]).abs() / scale).max().item() <= tol, q


# ------------------------------------------------------------------ the step bound of compact moments
@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.999), (0.0, 0.99), (0.5, 0.9), (0.95, 0.9), (0.99, 0.999)])
def test_the_step_bound_holds_for_exact_adamw_and_is_lr_at_the_first_step(beta1, beta2):
    """Exact moments never reach the bound the compact kernels clip to (so the clip changes nothing
    there): torch.optim.AdamW on adversarial gradients (heavy-tailed, sign-flipping, with long
    quiet stretches that make |m| / sqrt(v) large)."""
    from freezeasguard.kernels.adamw_bf16 import adam_step_bound

    assert math.isclose(adam_step_bound(beta1, beta2, 1), 1.0, rel_tol=1e-12)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1.0, betas=(beta1, beta2), eps=0.0, weight_decay=0.0)
    worst = 0.0
    for t in range(1, 301):
        big = torch.randn(4096, generator=g, dtype=torch.float64) * torch.rand(4096, generator=g, dtype=torch.float64) ** -2
        p.grad = big * (1.0 if t % 37 < 3 else 1e-6) * (-1) ** t
        before = p.detach().clone()
        opt.step()
        ratio = float((p.detach() - before).abs().max()) / adam_step_bound(beta1, beta2, t)
        worst = max(worst, ratio)
    assert worst <= 1.0 + 1e-9
    assert worst > 0.3  # the adversarial gradients come close: the bound is not vacuous


def test_compact_moments_never_step_past_the_adamw_bound():
    """A first moment that survived quantisation over a second moment that did not (v at its
    smallest code, m near its block's absmax) would move a weight by ~lr * m / eps; the clip holds
    it to what exact AdamW could do."""
    from freezeasguard.kernels.adamw_bf16 import adam_step_bound

    n, lr = 512, 1e-3
    param = torch.zeros(n)
    st = new_8bit_states(n, 256)
    st["absmax_m"].fill_(1.0)
    st["absmax_v"].fill_(1e-4)
    st["q_m"].fill_(255)  # every m decodes to +1 (its block's absmax)...
    st["q_v"].fill_(1)  # ...and every v to its smallest positive code, ~1.6e-7 of its absmax
    adamw_8bit_(param, torch.zeros(n), st["q_m"], st["q_v"], st["absmax_m"], st["absmax_v"], lr=lr, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, decay_end=0, step=10, backend="torch")
    bound = lr * adam_step_bound(0.9, 0.999, 10)
    assert float(param.abs().max()) <= bound * (1 + 1e-6)
    assert float(param.abs().max()) > 0.99 * bound  # it bound here: unclipped it would be ~100x larger
