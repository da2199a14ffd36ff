"""Flat layout and the bilevel step over flat buffers vs a per-tensor torch.optim.AdamW loop."""
import math

import pytest
import torch
from torch import nn

from freezeasguard.engine.learn.flat import FlatLayout, apply_mask_ref_
from freezeasguard.kernels.mask_update import bilevel_step_ref_
from freezeasguard.kernels.segment import segment_dots

# Deliberately odd shapes: conv kernels, matrices, biases, a scalar-like tensor, one that spans
# several rows and one that fills exactly one row (chunk 16).
SHAPES = {"conv.weight": (3, 5, 3, 3), "conv.bias": (3,), "lin.weight": (13, 4), "norm.weight": (7,),
          "one": (1,), "big.weight": (37, 11), "row.bias": (16,)}
CHUNK = 16
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _flat_state(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    ft = {n: p + 0.1 * torch.randn(p.shape, generator=g) for n, p in pre.items()}
    return pre, ft


def test_layout_puts_decayed_tensors_first_and_aligns_segments():
    lay = FlatLayout.from_shapes(SHAPES, CHUNK)
    decayed = [n for n in lay.names if len(SHAPES[n]) >= 2]
    assert list(lay.names[:len(decayed)]) == [n for n in SHAPES if len(SHAPES[n]) >= 2]
    assert lay.decay_end == lay.offsets[len(decayed)]
    assert all(o % CHUNK == 0 for o in lay.offsets) and lay.total % CHUNK == 0
    assert lay.model_names == tuple(SHAPES)
    assert lay.rows_per_tensor().tolist() == [math.ceil(math.prod(SHAPES[n]) / CHUNK) for n in lay.names]
    assert lay.row_tensor().tolist() == sum(([i] * r for i, r in enumerate(lay.rows_per_tensor().tolist())), [])
    buf = torch.arange(lay.total, dtype=torch.float32)
    views = lay.views(buf)
    views["lin.weight"][0, 0] = -1.0
    assert buf[lay.offsets[lay.index()["lin.weight"]]] == -1.0  # a view, not a copy


def test_bound_module_accumulates_gradients_into_the_flat_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    model(x).square().sum().backward()
    expect = {n: p.grad.clone() for n, p in model.named_parameters()}
    lay = FlatLayout.from_module(model, CHUNK)
    theta, grad = lay.flatten(ref), torch.zeros(lay.total)
    model.zero_grad(set_to_none=True)
    lay.bind(model, theta, grad)
    model(x).square().sum().backward()
    for n, g in lay.views(grad).items():
        torch.testing.assert_close(g, expect[n], rtol=0, atol=0)  # same kernels, same order
    assert grad.count_nonzero() == sum(g.count_nonzero() for g in expect.values())  # padding untouched
    with torch.no_grad():
        theta.mul_(2)
    assert torch.equal(dict(model.named_parameters())["3.weight"], 2 * ref["3.weight"])


def test_segment_dots_match_fp64_per_tensor_sums_and_are_deterministic():
    lay = FlatLayout.from_shapes({"a": (5000, 3), "b": (1,), "c": (33,)}, 64)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(lay.total, generator=g), torch.randn(lay.total, generator=g)
    pad = torch.ones(lay.total, dtype=torch.bool)
    for o, k in zip(lay.offsets, lay.numels):
        pad[o:o + k] = False
    a[pad] = 0.0  # the buffers keep their padding at zero
    va, vb = lay.views(a), lay.views(b)
    d = segment_dots(a, b, lay.rows_per_tensor(), lay.chunk)
    ref = [float((va[n].double() * vb[n].double()).sum()) for n in lay.names]
    # fp32 dots of 64-element rows, fp64 across rows: ~1e-7 relative error per row.
    torch.testing.assert_close(d, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.equal(d, segment_dots(a, b, lay.rows_per_tensor(), lay.chunk))


def _reference_steps(pre, ft, keep_by_name, grads, steps, max_norm):
    """Per-tensor loop: torch.optim.AdamW on theta_ft, manual dot products, theta(m) by hand."""
    params = {n: nn.Parameter(t.clone()) for n, t in ft.items()}
    groups = [{"params": [p for n, p in params.items() if p.dim() >= 2], "weight_decay": HP["weight_decay"]},
              {"params": [p for n, p in params.items() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], foreach=False)
    theta = {n: pre[n] - keep_by_name[n] * (pre[n] - ft[n]) for n in pre}
    all_dots = []
    for s in range(steps):
        d = {n: pre[n] - params[n].detach() for n in pre}
        all_dots.append({n: float((d[n].double() * grads[s][n].double()).sum()) for n in pre})
        old = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[s][n].clone()
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        opt.step()
        for n in pre:
            theta[n] = theta[n] + keep_by_name[n] * (params[n].detach() - old[n])
    state = {n: opt.state[p] for n, p in params.items()}
    return params, theta, state, all_dots


@pytest.mark.parametrize("max_norm", [1e9, 0.5])  # no clipping / clipping active
def test_bilevel_step_matches_per_tensor_adamw_loop(max_norm):
    lay = FlatLayout.from_shapes(SHAPES, CHUNK)
    pre, ft = _flat_state(lay)
    g = torch.Generator().manual_seed(2)
    m = torch.rand(len(lay), generator=g)
    m[0], m[1] = 1.0, 0.0  # a fully frozen and a fully free tensor
    keep_by_name = {n: float(1 - m[i]) for i, n in enumerate(lay.names)}
    grads = [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(3)]

    theta_pre, theta_d = lay.flatten(pre), lay.flatten(pre) - lay.flatten(ft)
    theta = torch.empty_like(theta_pre)
    keep = (1 - m)[lay.row_tensor()].contiguous()
    apply_mask_ref_(theta, theta_pre, theta_d, keep, CHUNK)
    exp_avg, exp_avg_sq = torch.zeros_like(theta), torch.zeros_like(theta)
    rows = lay.rows_per_tensor()
    got_dots = []
    from freezeasguard.kernels.adamw import clip_coef

    for s in range(3):
        grad = lay.flatten(grads[s])
        d = bilevel_step_ref_(theta, theta_pre, theta_d, grad, exp_avg, exp_avg_sq, keep, rows, chunk=CHUNK,
                              decay_end=lay.decay_end, step=s + 1, grad_scale=clip_coef(grad, max_norm), **HP)
        got_dots.append(dict(zip(lay.names, d.tolist())))

    params, theta_ref, state, dots_ref = _reference_steps(pre, ft, keep_by_name, grads, 3, max_norm)
    # fp32: the reference rounds theta_ft to fp32 each step, we keep theta_d; the difference of
    # the two representations is a few ulp of |theta| (~1), and the clip norms are summed in a
    # different order. 2e-6 absolute is ~16 ulp at 1.
    for n in SHAPES:
        torch.testing.assert_close(lay.views(theta_d)[n], pre[n] - params[n].detach(), rtol=0, atol=2e-6)
        torch.testing.assert_close(lay.views(theta)[n], theta_ref[n], rtol=0, atol=2e-6)
        torch.testing.assert_close(lay.views(exp_avg)[n], state[n]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lay.views(exp_avg_sq)[n], state[n]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        for s in range(3):
            assert got_dots[s][n] == pytest.approx(dots_ref[s][n], rel=1e-5, abs=1e-5)
    frozen = lay.names[0]
    assert torch.equal(lay.views(theta)[frozen], pre[frozen])  # m = 1: stays at theta_pre exactly
    pad = torch.ones(lay.total, dtype=torch.bool)
    for o, k in zip(lay.offsets, lay.numels):
        pad[o:o + k] = False
    for buf in (theta, theta_d, exp_avg, exp_avg_sq):
        assert not buf[pad].any()


def test_dots_only_leaves_every_buffer_untouched():
    lay = FlatLayout.from_shapes(SHAPES, CHUNK)
    pre, ft = _flat_state(lay)
    bufs = [lay.flatten(pre), lay.flatten(pre), lay.flatten(pre) - lay.flatten(ft),
            lay.flatten({n: torch.randn(s) for n, s in SHAPES.items()}), torch.zeros(lay.total), torch.zeros(lay.total)]
    before = [b.clone() for b in bufs]
    keep = torch.full((lay.rows,), 0.5)
    d = bilevel_step_ref_(*bufs, keep, lay.rows_per_tensor(), chunk=CHUNK, decay_end=lay.decay_end, step=1,
                          update=False, **HP)
    assert d.dtype == torch.float64 and d.shape == (len(lay),)
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))
    assert bilevel_step_ref_(*bufs, keep, lay.rows_per_tensor(), chunk=CHUNK, decay_end=lay.decay_end, step=1,
                             dots=False, **HP) is None
