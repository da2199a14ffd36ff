"""One AdamW step over a flat buffer of SD1.5's trainable size, by optimizer-state format.

Run:  python -m pytest bench/bench_adamw_lowp.py --benchmark-enable [--benchmark-json out.json]

Providers (all step the same elements; fp32 params and grads):

- ``fp32_triton``: ``fused_adamw_`` (fp32 moments, ``kernels/adamw.py``), one launch.
- ``bf16_triton``: ``adamw_bf16_states_`` (bf16 moments, stochastic rounding), one launch.
- ``8bit_triton``: ``adamw_8bit_`` (blockwise 8-bit moments, block 256), one launch.
- ``fp32_torch_fused`` / ``bf16_torch`` / ``8bit_torch``: the eager forms (torch's fused AdamW
  over the two decay ranges; the pure-torch references), what runs without Triton.
- ``bnb_blockwise_flat``: bitsandbytes' ``optimizer_update_8bit_blockwise`` over the whole flat
  buffer in one call (same scheme and tables; it decays every element, no ``decay_end``).
- ``bnb_adamw8bit_tensors``: ``bnb.optim.AdamW8bit`` over per-tensor views of the buffer, split
  like SD1.5's tensors (``adamw_cases.layout``), as a training script would use it (tensors under
  4096 elements keep fp32 states there).

The Triton rows need CUDA (the interpreter is a correctness tool, not a timing) and skip on a
CPU-only machine; the eager and bitsandbytes rows run there on a small buffer.

Sizes: ``BENCH_LOWP_FRAC`` (default 0.5) of a model of ``BENCH_LOWP_NUMEL`` elements (default
859,520,964, SD1.5's UNet, on CUDA: ~430M trainable; 2M on CPU), tensor sizes as SD1.5's.

Each row's ``extra_info``: bytes one step must move per element (``bytes_per_elem``: 28 fp32,
20 bf16, 16 + 16/256 8-bit), GB/s = that x elements / median time, optimizer-state bytes held,
launches known or profiled CUDA kernels, device and versions.
"""
from __future__ import annotations

import os

import pytest
import torch
from adamw_cases import (
    DEVICE,
    SD15_NUMEL,
    layout,
    profiled_cuda_kernels,
    record_timing,
    sync,
    tensor_groups,
)

from freezeasguard.engine.backends import bitsandbytes_backend, triton_backend
from freezeasguard.kernels.adamw import fused_adamw_
from freezeasguard.kernels.adamw_lowp import (
    adamw_8bit_,
    adamw_bf16_states_,
    bytes_per_element_lowp,
    code_tables,
    new_8bit_states,
    state_bytes_per_element,
)

TOTAL = int(os.environ.get("BENCH_LOWP_NUMEL", SD15_NUMEL if DEVICE.type == "cuda" else 2_000_000))
FRAC = float(os.environ.get("BENCH_LOWP_FRAC", "0.5"))
BLOCK = 256
ROUNDS, WARMUP = (30, 3) if DEVICE.type == "cuda" else (5, 1)
HP = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
PROVIDERS = ("fp32_triton", "bf16_triton", "8bit_triton", "fp32_torch_fused", "bf16_torch", "8bit_torch",
             "bnb_blockwise_flat", "bnb_adamw8bit_tensors")
BNB_MIN_8BIT = 4096  # bnb.optim keeps fp32 states for smaller tensors


def skip_reason(provider: str) -> str | None:
    if provider.endswith("_triton"):
        if DEVICE.type != "cuda":
            return "Triton on CPU runs only in the interpreter: not a timing"
        if not triton_backend().available:
            return f"triton unusable: {triton_backend().reason}"
    if provider.startswith("bnb_") and not bitsandbytes_backend().available:
        return f"bitsandbytes unusable: {bitsandbytes_backend().reason}"
    return None


def _kind(provider: str) -> str:
    return "8bit" if provider.startswith(("8bit", "bnb")) else provider.split("_")[0]


def make_step(provider: str, tensors: list[tuple[int, bool]]):
    """Build the buffers; return (step fn, bytes moved per step, known launches per step)."""
    n = sum(s for s, _ in tensors)
    decay_end = sum(s for s, d in tensors if d)
    param = torch.randn(n, device=DEVICE)
    grad = torch.randn(n, device=DEVICE) * 1e-3
    hp = dict(HP, decay_end=decay_end)
    state = {"step": 0}
    kind = _kind(provider)
    moved = n * bytes_per_element_lowp(kind, grad.dtype, BLOCK)

    if provider in ("fp32_triton", "fp32_torch_fused"):
        m, v = torch.zeros_like(param), torch.zeros_like(param)
        backend = "triton" if provider == "fp32_triton" else "torch_fused"

        def step():
            state["step"] += 1
            fused_adamw_(param, grad, m, v, step=state["step"], backend=backend, **hp)

        return step, moved, 1 if backend == "triton" else None

    if provider in ("bf16_triton", "bf16_torch"):
        m, v = (torch.zeros(n, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
        backend = "triton" if provider == "bf16_triton" else "torch"

        def step():
            state["step"] += 1
            adamw_bf16_states_(param, grad, m, v, step=state["step"], seed=0, backend=backend, **hp)

        return step, moved, 1 if backend == "triton" else None

    if provider in ("8bit_triton", "8bit_torch", "bnb_blockwise_flat"):
        st = new_8bit_states(n, BLOCK, DEVICE)
        backend = "triton" if provider == "8bit_triton" else "torch"
        if provider == "bnb_blockwise_flat":
            import bitsandbytes.functional as bnb_f

            tab = code_tables(DEVICE)

            def step():
                state["step"] += 1
                bnb_f.optimizer_update_8bit_blockwise(
                    "adam", grad, param, st["q_m"], st["q_v"], HP["beta1"], HP["beta2"], 0.0, 0.0, HP["eps"],
                    state["step"], HP["lr"], tab.code_m, tab.code_v, st["absmax_m"], st["absmax_v"],
                    weight_decay=HP["weight_decay"], gnorm_scale=1.0)

            return step, moved, 1

        def step():
            state["step"] += 1
            adamw_8bit_(param, grad, st["q_m"], st["q_v"], st["absmax_m"], st["absmax_v"], step=state["step"],
                        block_size=BLOCK, backend=backend, **hp)

        return step, moved, 1 if backend == "triton" else None

    assert provider == "bnb_adamw8bit_tensors", provider
    import bitsandbytes as bnb

    groups = tensor_groups(param, grad, tensors)
    opt = bnb.optim.AdamW8bit(groups, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                              weight_decay=HP["weight_decay"], min_8bit_size=BNB_MIN_8BIT)
    small = sum(s for s, _ in tensors if s < BNB_MIN_8BIT)
    moved = (n - small) * bytes_per_element_lowp("8bit", grad.dtype, BLOCK) + small * bytes_per_element_lowp("fp32")
    return opt.step, moved, None


def state_bytes(provider: str, tensors: list[tuple[int, bool]]) -> int:
    """Optimizer-state bytes the provider holds for these tensors."""
    n = sum(s for s, _ in tensors)
    small = sum(s for s, _ in tensors if s < BNB_MIN_8BIT) if provider == "bnb_adamw8bit_tensors" else 0
    return int((n - small) * state_bytes_per_element(_kind(provider), BLOCK) + small * 8)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_lowp_step(benchmark, provider: str) -> None:
    reason = skip_reason(provider)
    if reason:
        pytest.skip(reason)
    tensors = layout(TOTAL, FRAC)
    n = sum(s for s, _ in tensors)
    step, moved, launches = make_step(provider, tensors)

    def timed():
        step()
        sync()

    for _ in range(WARMUP):  # the first step compiles kernels and (bitsandbytes) allocates states
        timed()
    profiled = profiled_cuda_kernels(timed)
    benchmark.group = f"adamw step by state format, {n:,} elements"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    kind = _kind(provider)
    info = benchmark.extra_info
    info.update(
        provider=provider,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        state_format=kind,
        param_dtype="float32",
        grad_dtype="float32",
        total_numel=TOTAL,
        trainable_numel=n,
        trainable_tensors=len(tensors),
        bytes_per_elem=moved / n,
        state_bytes=state_bytes(provider, tensors),
        launches_per_step=launches,
        cuda_kernels_profiled=profiled,
        torch=torch.__version__,
        triton=triton_backend().version,
        bitsandbytes=bitsandbytes_backend().version,
    )
    record_timing(benchmark, info, moved)
