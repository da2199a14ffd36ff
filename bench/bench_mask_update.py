"""One mask-learning step over SD1.5-sized flat buffers: the eager reference vs the fused kernel.

Run:  python -m pytest bench/bench_mask_update.py --benchmark-enable [--benchmark-json out.json]

Providers: ``torch`` (``bilevel_step_ref_``, about a dozen eager passes) and ``triton`` (the
one-launch kernel of ``kernels/mask_update.py``, CUDA only: the interpreter is a correctness
tool, not a timing). Modes, as the learner calls them: ``user`` (the simulated user's clipped
AdamW update, no dots), ``mask`` (the per-tensor dots only) and ``fused`` (update and dots in one
pass, the kernel's full form).

Sizes: all 859,520,964 elements of SD1.5's UNet in its 686 tensors on CUDA (seven fp32 buffers,
~24 GB), 2M elements with the same size mix on CPU; override with BENCH_MASK_NUMEL=<elements>.

Each row's ``extra_info``: GB/s = the bytes the fused kernel must move for the mode
(``bytes_moved``, the same figure for both providers, so it reads as effective bandwidth) /
median time; launches per step (Triton: 1 kernel, plus the fp64 row-to-tensor reduce when dots
are taken; profiled CUDA kernels for both providers on CUDA); device; versions.
"""
from __future__ import annotations

import os

import pytest
import torch
from adamw_cases import layout, profiled_cuda_kernels, record_timing, sync

from freezeasguard.engine.backends import triton_backend
from freezeasguard.engine.learn.flat import FlatLayout
from freezeasguard.kernels.mask_update import bilevel_step_, bytes_moved, launch_config

SD15_NUMEL = 859_520_964
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOTAL = int(os.environ.get("BENCH_MASK_NUMEL", SD15_NUMEL if DEVICE.type == "cuda" else 2_000_000))
CHUNK = 256
ROUNDS, WARMUP = (30, 3) if DEVICE.type == "cuda" else (10, 2)
HP = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
MODES = {"user": dict(update=True, dots=False), "mask": dict(update=False, dots=True),
         "fused": dict(update=True, dots=True)}


@pytest.fixture(scope="module")
def state():
    """Flat buffers laid out like SD1.5's tensors (matrices/kernels first), built once."""
    shapes = {f"t{i}": ((n, 1) if decay else (n,)) for i, (n, decay) in enumerate(layout(TOTAL, 1.0))}
    lay = FlatLayout.from_shapes(shapes, CHUNK)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(scale):
        return torch.randn(lay.total, generator=g, device=DEVICE).mul_(scale)

    bufs = dict(theta=randn(1.0), theta_pre=randn(1.0), theta_d=randn(1e-2), grad=randn(1e-3),
                exp_avg=torch.zeros(lay.total, device=DEVICE), exp_avg_sq=torch.zeros(lay.total, device=DEVICE))
    keep = torch.rand(lay.rows, generator=g, device=DEVICE)
    scratch = torch.empty(lay.total, device=DEVICE)
    yield lay, bufs, keep, scratch
    del bufs, scratch
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", ["torch", "triton"])
def test_bilevel_step(benchmark, state, provider: str, mode: str) -> None:
    if provider == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton on CPU runs only in the interpreter: not a timing")
    if provider == "triton" and not triton_backend().available:
        pytest.skip(f"triton unusable: {triton_backend().reason}")
    lay, bufs, keep, scratch = state
    rows = lay.rows_per_tensor(DEVICE)
    # A clip coefficient of 1: the scaling path runs, the gradient keeps its size over the rounds.
    scale = torch.ones((), device=DEVICE) if MODES[mode]["update"] else None
    counter = {"step": 0}

    def timed():
        counter["step"] += 1
        bilevel_step_(*bufs.values(), keep, rows, chunk=CHUNK, decay_end=lay.decay_end, step=counter["step"],
                      grad_scale=scale, scratch=scratch, backend=provider, **MODES[mode], **HP)
        sync()

    for _ in range(WARMUP):  # compiles the kernel, warms the allocator
        timed()
    profiled = profiled_cuda_kernels(timed)
    benchmark.group = f"bilevel step ({mode}), {lay.total:,} elements"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    moved = bytes_moved(lay.total, CHUNK, lay.decay_end, scaled=scale is not None, **MODES[mode])
    info = benchmark.extra_info
    info.update(
        provider=provider,
        mode=mode,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        elements=lay.total,
        tensors=len(lay),
        chunk=CHUNK,
        decay_elements=lay.decay_end,
        bytes_per_elem=moved / lay.total,
        triton_launches=1 if provider == "triton" else None,
        launch_config=str(launch_config(CHUNK, lay.rows, DEVICE)) if provider == "triton" else None,
        cuda_kernels_profiled=profiled,
        torch=torch.__version__,
        triton=triton_backend().version,
    )
    record_timing(benchmark, info, moved)
