"""The fused mask-learning step (Triton; on CPU in the interpreter) against its torch reference.

The reference, ``mask_flat.bilevel_step_ref_``, is itself checked against torch.optim.AdamW in
``test_learn_flat.py``; here the kernel must reproduce it buffer for buffer, and its dots must be
within the fp32 summation bound of the exact (fp64) per-tensor dot products.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from freezeasguard.engine.learn.flat import FlatLayout, apply_mask_ref_
from freezeasguard.kernels import _triton, mask_update
from freezeasguard.kernels._triton import TritonStatus
from freezeasguard.kernels.mask_update import (
    LaunchConfig,
    MaskUpdateInputError,
    bilevel_step_,
    bilevel_step_ref_,
    bytes_moved,
    launch_config,
)


def resolve_backend(backend, device):
    return _triton.resolve_backend(backend, device, "bilevel step")[0]  # what bilevel_step_ runs


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
BUFS = ("theta", "theta_pre", "theta_d", "grad", "exp_avg", "exp_avg_sq")

# Tolerance on every buffer, keyed by dtype: (rtol, atol as a fraction of the buffer's largest
# magnitude). fp32: each op of the two sides differs by at most 1 ulp (torch's CPU sqrt is not
# correctly rounded on AVX-512, torch's lerp/addcmul and the compiled kernel may fuse a
# multiply-add into an FMA, torch on CUDA divides by a host scalar via its reciprocal); the
# update u is small against theta and theta_d, so one step moves them by ~1 ulp and three steps
# stay within 4.
TOL = {torch.float32: (4 * 2.0**-23, 4 * 2.0**-23)}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24}


def _shapes(seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Segments from 1 to 1e5 elements, mostly not multiples of 256, matrices and vectors mixed."""
    shapes = {"conv.weight": (40, 25, 3, 3), "one.weight": (1, 1), "big.weight": (400, 250), "row.weight": (16, 16),
              "over.weight": (257, 1), "one.bias": (1,), "under.bias": (255,), "norm.weight": (511,),
              "long.bias": (3001,)}
    g = torch.Generator().manual_seed(seed)
    for i, k in enumerate(torch.randint(1, 3000, (24,), generator=g).tolist()):
        shapes[f"r{i}.weight" if i % 2 else f"r{i}.bias"] = (k, 1) if i % 2 else (k,)
    return shapes


def _padding(lay: FlatLayout) -> torch.Tensor:
    pad = torch.ones(lay.total, dtype=torch.bool)
    for o, k in zip(lay.offsets, lay.numels):
        pad[o:o + k] = False
    return pad


def make_state(lay: FlatLayout, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Buffers mid-training (theta_d ~ 0.1, moments non-zero), zero padding; per-row keep with a
    fully frozen (keep 0), a fully free (keep 1) and fractional tensors."""
    g = torch.Generator().manual_seed(seed)
    live = (~_padding(lay)).float()
    scale = torch.exp(torch.randn(len(lay), generator=g))[lay.row_tensor()].repeat_interleave(lay.chunk)
    bufs = {
        "theta_pre": torch.randn(lay.total, generator=g) * live,
        "theta_d": 0.1 * torch.randn(lay.total, generator=g) * scale * live,
        "exp_avg": 1e-3 * torch.randn(lay.total, generator=g) * live,
        "exp_avg_sq": 1e-6 * torch.rand(lay.total, generator=g) * live,
        "grad": torch.zeros(lay.total),
    }
    m = torch.rand(len(lay), generator=g)
    m[0], m[1], m[-1] = 1.0, 0.0, 0.0
    keep = (1 - m)[lay.row_tensor()].contiguous()
    bufs["theta"] = torch.empty(lay.total)
    apply_mask_ref_(bufs["theta"], bufs["theta_pre"], bufs["theta_d"], keep, lay.chunk)
    return {k: bufs[k] for k in BUFS}, keep


def grads(lay: FlatLayout, steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    live = (~_padding(lay)).float()
    return [1e-2 * torch.randn(lay.total, generator=g) * live for _ in range(steps)]


def clone(bufs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bufs.items()}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    rtol, atol_frac = TOL[expected.dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_frac * scale + 1e-30,
                               msg=lambda m: f"{what}: {m}")


def exact_dots(lay: FlatLayout, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 per-tensor <a_i, b_i> and sum |a_i b_i| (the scale of the summation error bound)."""
    prod = a.double() * b.double()
    rows = lay.rows_per_tensor()
    per_row = prod.view(-1, lay.chunk)
    dots = torch.segment_reduce(per_row.sum(1), "sum", lengths=rows)
    mags = torch.segment_reduce(per_row.abs().sum(1), "sum", lengths=rows)
    return dots, mags


def check_dots(lay, got, exact, mags, what):
    # Any fp32 summation order of a chunk-element dot is within gamma_chunk * sum|a b| of the exact
    # value (products rounded, chunk - 1 additions); the fp64 sum across rows adds nothing visible.
    # The row order differs between kernel and reference (tree vs GEMV), so each side is held to
    # this bound against the exact dot of its own buffers (after a step they differ by ulps).
    u = UNIT_ROUNDOFF[torch.float32]
    gamma = lay.chunk * u / (1 - lay.chunk * u)
    assert got.dtype == torch.float64 and got.shape == (len(lay),), what
    err = (got - exact).abs()
    assert (err <= gamma * mags).all(), f"{what}: dots off the fp32 bound by {(err / mags).max():.3g} > {gamma:.3g}"


def run_steps(lay, decay_end, scale, steps=3, hp=HP, config: LaunchConfig | None = None, seed=0):
    """``steps`` steps of kernel and reference from the same state; every buffer and the dots
    compared after each step."""
    ours, keep = make_state(lay, seed)
    ref = clone(ours)
    rows = lay.rows_per_tensor()
    gs = None if scale is None else torch.tensor(scale)
    for s, g in enumerate(grads(lay, steps, seed + 1), start=1):
        ours["grad"].copy_(g)
        ref["grad"].copy_(g)
        exact, mags = exact_dots(lay, ours["theta_d"], g)
        exact_ref, mags_ref = exact_dots(lay, ref["theta_d"], g)
        kw = dict(hp, chunk=lay.chunk, decay_end=decay_end, step=s, grad_scale=gs)
        if config is None:
            d = bilevel_step_(*ours.values(), keep, rows, backend="triton", **kw)
        else:
            d = mask_update._run_triton(*ours.values(), keep, rows, update=True, dots=True, scratch=None,
                                        config=config, **kw)
        d_ref = bilevel_step_ref_(*ref.values(), keep, rows, **kw)
        check_dots(lay, d, exact, mags, f"kernel, step {s}")
        check_dots(lay, d_ref, exact_ref, mags_ref, f"reference, step {s}")
        for name in BUFS:
            assert_close_dtype(ours[name], ref[name], f"{name} after step {s}")
    return ours, keep


@pytest.mark.triton
@pytest.mark.parametrize("scale", [None, 0.37], ids=["no_clip", "clip"])
@pytest.mark.parametrize("decay", ["none", "layout", "mid_row", "all"])
def test_kernel_matches_reference_over_steps(decay, scale):
    lay = FlatLayout.from_shapes(_shapes(), 256)
    decay_end = {"none": 0, "layout": lay.decay_end, "mid_row": lay.decay_end // 2 + 77, "all": lay.total}[decay]
    ours, keep = run_steps(lay, decay_end, scale)
    pad = _padding(lay)
    for name in BUFS:
        assert not ours[name][pad].any(), f"{name}: padding must stay zero"
    o, k = lay.offsets[0], lay.numels[0]  # keep = 0: a fully frozen tensor stays at theta_pre exactly
    assert keep[o // lay.chunk] == 0 and torch.equal(ours["theta"][o:o + k], ours["theta_pre"][o:o + k])
    assert ours["theta_d"].abs().sum() > 0


@pytest.mark.triton
@pytest.mark.parametrize("chunk,beta1", [(48, 0.9), (100, 0.3), (1, 0.9)], ids=["chunk48", "chunk100_lerp_from_end",
                                                                            "chunk1"])
def test_other_chunks_and_lerp_branch(chunk, beta1):
    """Non-power-of-two rows (masked tail lanes), a row per element, and beta1 < 0.5 (the other
    lerp formula)."""
    shapes = dict(list(_shapes().items())[:12]) if chunk > 1 else {"w": (30, 7), "b": (5,), "c": (1,)}
    lay = FlatLayout.from_shapes(shapes, chunk)
    run_steps(lay, lay.decay_end, 0.5, steps=2, hp=dict(HP, beta1=beta1))


@pytest.mark.triton
@pytest.mark.parametrize("config", [LaunchConfig(rows_per_program=64, tile=64, num_warps=1, int64=False),
                                    LaunchConfig(rows_per_program=64, tile=256, num_warps=1, int64=True)],
                         ids=["rows_in_tiles", "int64_offsets"])
def test_cuda_shapes_of_the_kernel(config):
    """The paths the CUDA launch shape takes for long rows (a loop over tiles) and huge buffers
    (64-bit offsets), forced at small sizes."""
    lay = FlatLayout.from_shapes(dict(list(_shapes().items())[:10]), 256)
    run_steps(lay, lay.decay_end, 0.37, steps=2, config=config)


@pytest.mark.triton
def test_dots_only_and_update_only_modes():
    lay = FlatLayout.from_shapes(_shapes(), 256)
    bufs, keep = make_state(lay)
    bufs["grad"].copy_(grads(lay, 1)[0])
    rows = lay.rows_per_tensor()
    kw = dict(HP, chunk=lay.chunk, decay_end=lay.decay_end, step=1, backend="triton")
    before = clone(bufs)
    exact, mags = exact_dots(lay, bufs["theta_d"], bufs["grad"])
    d = bilevel_step_(*bufs.values(), keep, rows, update=False, **kw)
    assert all(torch.equal(bufs[k], before[k]) for k in BUFS)  # dots only: nothing written
    d_ref = bilevel_step_ref_(*clone(before).values(), keep, rows, update=False, chunk=lay.chunk,
                              decay_end=lay.decay_end, step=1, **HP)
    check_dots(lay, d, exact, mags, "dots only")
    check_dots(lay, d_ref, exact, mags, "dots only, reference")
    assert bilevel_step_(*bufs.values(), keep, rows, update=False, dots=False, **kw) is None
    assert all(torch.equal(bufs[k], before[k]) for k in BUFS)

    ref = clone(bufs)
    assert bilevel_step_(*bufs.values(), keep, rows, dots=False, **kw) is None
    bilevel_step_ref_(*ref.values(), keep, rows, dots=False, chunk=lay.chunk, decay_end=lay.decay_end, step=1, **HP)
    for name in BUFS:
        assert_close_dtype(bufs[name], ref[name], f"{name} (update only)")


@pytest.mark.triton
def test_bit_reproducible_and_scratch_is_only_a_workspace():
    lay = FlatLayout.from_shapes(_shapes(), 256)
    runs = []
    for scratch in (None, torch.full((lay.total,), float("nan"))):
        bufs, keep = make_state(lay)
        dots = []
        for s, g in enumerate(grads(lay, 2), start=1):
            bufs["grad"].copy_(g)
            dots.append(bilevel_step_(*bufs.values(), keep, lay.rows_per_tensor(), chunk=lay.chunk,
                                      decay_end=lay.decay_end, step=s, grad_scale=torch.tensor(0.5),
                                      scratch=scratch, backend="triton", **HP))
        runs.append((bufs, dots))
    (a, da), (b, db) = runs
    assert all(torch.equal(x, y) for x, y in zip(da, db))
    assert all(torch.equal(a[k], b[k]) for k in BUFS)


BAD_INPUTS = [
    ({"theta": lambda b: b["theta"].double()}, "theta must be float32"),
    ({"grad": lambda b: b["grad"][:-256]}, "grad has .* elements, expected"),
    ({"exp_avg": lambda b: b["exp_avg"].view(-1, 256)}, "exp_avg must be a flat 1-D buffer"),
    ({"theta_d": lambda b: torch.stack([b["theta_d"], b["theta_d"]], 1)[:, 0]}, "theta_d must be contiguous"),
    ({"theta_pre": lambda b: b["theta"]}, "must be distinct buffers"),
    ({"keep": lambda k: k[:-1]}, "keep has .* elements"),
    ({"rows": lambda r: r.int()}, "rows_per_tensor must be a 1-D int64"),
    ({"rows": lambda r: r[:-1]}, "rows_per_tensor sums to"),
    ({"chunk": 100}, "not a positive multiple of chunk=100"),
    ({"step": 0}, r"step must be an int >= 1"),
    ({"decay_end": -1}, r"decay_end must be an int in \[0, "),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"grad_scale": torch.ones(2)}, "grad_scale must be None or a 1-element tensor"),
    ({"grad_scale": torch.ones(1, dtype=torch.float64)}, "grad_scale must be float32"),
    ({"scratch": torch.empty(10)}, "scratch has 10 elements"),
]


@pytest.mark.parametrize("change,match", BAD_INPUTS, ids=[f"{next(iter(c))}{i}" for i, (c, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_clear_errors(change, match):
    """``change``: a buffer, 'keep' or 'rows' -> a function of its valid value; else a keyword."""
    lay = FlatLayout.from_shapes({"w": (20, 20), "b": (3,)}, 256)
    bufs, keep = make_state(lay)
    rows = lay.rows_per_tensor()
    kw = dict(HP, chunk=lay.chunk, decay_end=lay.decay_end, step=1)
    for k, f in change.items():
        if k in bufs:
            bufs[k] = f(bufs)
        elif k == "keep":
            keep = f(keep)
        elif k == "rows":
            rows = f(rows)
        else:
            kw[k] = f
    for backend in ("triton", "torch"):  # validated before dispatch: the same error either way
        with pytest.raises(MaskUpdateInputError, match=match):
            bilevel_step_(*bufs.values(), keep, rows, backend=backend, **kw)


@pytest.mark.triton
def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"  # never the interpreter for training
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter, on request (TRITON_INTERPRET=1)
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("cuda", cpu)
    gone = lambda: TritonStatus(False, None, "not installed")  # noqa: E731
    monkeypatch.setattr(_triton, "status", gone)  # what blocker() asks
    with pytest.raises(RuntimeError, match="'triton' requested but it cannot run: not installed"):
        resolve_backend("triton", cpu)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


def test_launch_config_rule(monkeypatch):
    monkeypatch.setattr(mask_update, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert launch_config(256, 10**6, cuda) == LaunchConfig(4, 256, 4, False)
    assert launch_config(4096, 10, cuda) == LaunchConfig(1, 1024, 4, False)  # rows loop over 4 tiles
    assert launch_config(100, 10**6, cuda) == LaunchConfig(8, 128, 4, False)  # tail lanes masked
    assert launch_config(256, 2**31 // 256, cuda).int64  # offsets reach 2**31
    assert not launch_config(256, 2**31 // 256 - 4, cuda).int64
    assert launch_config(256, 3, torch.device("cpu")).rows_per_program == 4  # small: no idle rows
    sd15_rows = 3_400_000
    cfg = launch_config(256, sd15_rows, cuda)
    assert cfg.grid(sd15_rows) == (sd15_rows // 4,)


def test_bytes_moved_counts_each_buffer_once():
    n, chunk = 1024 * 256, 256
    rows = n // chunk
    assert bytes_moved(n, chunk, 0, update=False) == 8 * n + 4 * rows
    assert bytes_moved(n, chunk, 0, dots=False) == 36 * n + 4 * rows
    assert bytes_moved(n, chunk, n // 2, scaled=True) == 40 * n + 2 * n + 8 * rows
    assert bytes_moved(n, chunk, 0, update=False, dots=False) == 0


# ------------------------------------------------------------------------------ learner level
@pytest.fixture(scope="module")
def tiny():
    from freezeasguard.engine.model.components import build_components
    from freezeasguard.engine.model.data import digits_dataset
    from freezeasguard.engine.model.tokenizer import caption_words

    ds = digits_dataset(16, classes=(1, 2, 7))
    return build_components("tiny", extra_words=caption_words(ds.captions), seed=0), ds


def _learner(tiny, backend):
    import copy

    from freezeasguard.engine.config import resolve
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import build_learner

    c, ds = tiny
    cfg = resolve(MaskLearnConfig, presets={}, overrides=[
        "illegal=[seven]", "innocent=[one,two]", "steps=6", "bootstrap_steps=0", "user.batch_size=8", "user.lr=1e-3",
        "user.max_grad_norm=0.01", "num_threads=1", "progress=false", "mask.every=3", "mask.lr=0.1",
        "device=cpu", "work_dir=null"])
    learner = build_learner(cfg, components=dataclasses.replace(c, unet=copy.deepcopy(c.unet)), dataset=ds)
    learner.step_backend = backend
    return learner


@pytest.mark.triton
def test_learner_with_the_kernel_learns_the_reference_mask(tiny, monkeypatch):
    calls = []
    real = mask_update._run_triton

    def spy(*a, **k):
        scale = k["grad_scale"]
        calls.append((k["update"], None if scale is None else float(scale)))
        return real(*a, **k)

    monkeypatch.setattr(mask_update, "_run_triton", spy)
    torch.set_num_threads(1)
    ref = _learner(tiny, "auto")  # CPU: 'auto' is the torch reference, even under the interpreter
    ref.fit()
    assert calls == []
    ours = _learner(tiny, "triton")
    ours.fit()
    assert [u for u, _ in calls] == [True, True, False, True, True, False]  # user, user, mask (dots only), ...
    assert all(s is not None and s < 1 for u, s in calls if u)  # clipping active: the grad_scale path runs
    # The two runs see weights a few ulp apart after the first user step, so their gradients
    # differ by more than rounding: AdamW normalises each element's step, and where a gradient
    # sits near zero its step can change by a small fraction of lr. Bounds are therefore set
    # against the step sizes (user lr 1e-3, mask lr 0.1) and the moments' scale, ~1e-3 of each.
    user_lr, mask_lr = ours.cfg.user.lr, ours.cfg.mask.lr
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-3 * mask_lr)
    for name in ("theta", "theta_d"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=1e-3 * user_lr)
    for name in ("exp_avg", "exp_avg_sq"):
        b = getattr(ref, name)
        torch.testing.assert_close(getattr(ours, name), b, rtol=0, atol=1e-4 * b.abs().max().item())
    assert ours.export_mask() == ref.export_mask()
    for h_ours, h_ref in zip(ours.history, ref.history, strict=True):
        assert h_ours["kind"] == h_ref["kind"]
        assert h_ours["L_illegal"] == pytest.approx(h_ref["L_illegal"], rel=1e-5)
        assert h_ours["L_innocent"] == pytest.approx(h_ref["L_innocent"], rel=1e-5)


@pytest.mark.gpu
def test_cuda_auto_runs_the_kernel_and_matches_the_reference():
    lay = FlatLayout.from_shapes(_shapes(), 256)
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's row dots are a GEMV
    ours, keep = make_state(lay)
    ours = {k: v.cuda() for k, v in ours.items()}
    keep = keep.cuda()
    ref = clone(ours)
    rows = lay.rows_per_tensor("cuda")
    gs = torch.tensor(0.37, device="cuda")
    for s, g in enumerate(grads(lay, 3), start=1):
        ours["grad"].copy_(g)
        ref["grad"].copy_(g)
        exact, mags = exact_dots(lay, ours["theta_d"].cpu(), g)
        exact_ref, mags_ref = exact_dots(lay, ref["theta_d"].cpu(), g)
        kw = dict(HP, chunk=lay.chunk, decay_end=lay.decay_end, step=s, grad_scale=gs)
        d = bilevel_step_(*ours.values(), keep, rows, backend="auto", **kw)
        d_ref = bilevel_step_(*ref.values(), keep, rows, backend="torch", **kw)
        check_dots(lay, d.cpu(), exact, mags, f"cuda kernel, step {s}")
        check_dots(lay, d_ref.cpu(), exact_ref, mags_ref, f"cuda reference, step {s}")
        for name in BUFS:
            assert_close_dtype(ours[name].cpu(), ref[name].cpu(), f"cuda {name} after step {s}")
        again = bilevel_step_(*clone(ours).values(), keep, rows, backend="triton", **{**kw, "grad_scale": None},
                              update=False)
        assert torch.equal(again, bilevel_step_(*clone(ours).values(), keep, rows, backend="triton",
                                                **{**kw, "grad_scale": None}, update=False))
