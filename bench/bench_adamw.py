"""One AdamW step over the trainable part of an SD1.5-sized model, by optimizer implementation.

Run:  python -m pytest bench/bench_adamw.py --benchmark-enable [--benchmark-json out.json]

Providers: torch AdamW (foreach), torch AdamW (fused), this package's one-launch Triton kernel
over the flat buffer (CUDA only: the interpreter is a correctness tool, not a timing), and
bitsandbytes AdamW8bit when it is usable. Torch and bitsandbytes step the per-tensor views of
the flat buffer, as they would in training; the Triton kernel steps the flat buffer itself.

Sizes: the trainable fraction (0.3, 0.5, 1.0) of a total of 859,520,964 elements (SD1.5's
UNet) on CUDA, 2M on CPU; tensor sizes follow SD1.5's 686 tensors scaled to the total, with a
seeded random subset trainable. Override with BENCH_ADAMW_NUMEL=<elements>.

Each row's ``extra_info``: achieved GB/s (bytes one step must move / median time), launches per
step (known for the Triton kernel; profiled CUDA kernels for all providers on CUDA), device,
dtypes, element and tensor counts, torch/triton versions.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Lets the package report Triton as runnable on CPU (the fused case is still skipped here).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adamw_cases import (  # noqa: E402
    DEVICE,
    FRACTIONS,
    PROVIDERS,
    ROUNDS,
    TOTAL,
    WARMUP,
    layout,
    make_step,
    profiled_cuda_kernels,
    record_timing,
    skip_reason,
    sync,
)

from freezeasguard.engine.backends import triton_backend


@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"trainable{f:g}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_step(benchmark, provider: str, frac: float) -> None:
    reason = skip_reason(provider)
    if reason:
        pytest.skip(reason)
    tensors = layout(TOTAL, frac)
    n = sum(s for s, _ in tensors)
    step, bpe, launches = make_step(provider, tensors)

    def timed():
        step()
        sync()

    for _ in range(WARMUP):  # first step allocates optimizer state and compiles kernels
        timed()
    profiled = profiled_cuda_kernels(timed)
    benchmark.group = f"adamw step, {frac:g} of {TOTAL:,} trainable"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    info = benchmark.extra_info
    if DEVICE.type == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    info.update(
        provider=provider,
        device=device_name,
        param_dtype="float32",
        grad_dtype="float32",
        state_dtype="uint8 (blockwise)" if provider == "bnb_adamw8bit" else "float32",
        total_numel=TOTAL,
        trainable_numel=n,
        trainable_tensors=len(tensors),
        decay_numel=sum(s for s, d in tensors if d),
        bytes_per_elem=bpe,
        launches_per_step=launches,
        cuda_kernels_profiled=profiled,
        torch=torch.__version__,
        triton=triton_backend().version,
    )
    record_timing(benchmark, info, n * bpe)
