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

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Lets the package report Triton as runnable on CPU (the fused case is still skipped here).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from freezeasguard.engine.backends import bitsandbytes_backend, triton_backend  # noqa: E402
from freezeasguard.kernels.adamw import adamw_launches, bytes_per_element, fused_adamw_  # noqa: E402

SD15_NUMEL = 859_520_964
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOTAL = int(os.environ.get("BENCH_ADAMW_NUMEL", SD15_NUMEL if DEVICE.type == "cuda" else 2_000_000))
FRACTIONS = (0.3, 0.5, 1.0)
PROVIDERS = ("torch_foreach", "torch_fused", "triton_flat", "bnb_adamw8bit")
HP = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
ROUNDS, WARMUP = (30, 3) if DEVICE.type == "cuda" else (10, 2)
# 8-bit states: p r/w 8 B + g 4 B + m, v r/w 1 B each (block absmax ignored)
BNB_BYTES_PER_ELEM = 16

if DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("BENCH_ADAMW_THREADS", "1")))  # stable ratios


def _sd15_tensor_sizes() -> list[tuple[int, bool]]:
    """(numel, gets weight decay) of SD1.5's UNet tensors; a synthetic stand-in without diffusers."""
    try:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        return [(p.numel(), p.dim() > 1) for p in unet.parameters()]
    except ImportError:
        # 393 small bias/norm tensors and 293 weights holding the rest, as in SD1.5.
        small = [(320 * (1 + i % 4), False) for i in range(393)]
        rest = SD15_NUMEL - sum(s for s, _ in small)
        big = [(rest // 293 + (i < rest % 293), True) for i in range(293)]
        return small + big


def layout(total: int, frac: float, seed: int = 0) -> list[tuple[int, bool]]:
    """(numel, gets decay) of the trainable tensors, decay tensors first, ``frac`` of ``total``."""
    sizes = _sd15_tensor_sizes()
    scale = total / sum(s for s, _ in sizes)
    sizes = [(max(1, round(s * scale)), d) for s, d in sizes]
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    chosen, count = [], 0
    for i in order:
        if count >= frac * total:
            break
        chosen.append(sizes[i])
        count += sizes[i][0]
    chosen.sort(key=lambda sd: not sd[1])  # stable: decay tensors first, as in the engine
    return chosen


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _profiled_cuda_kernels(fn) -> int | None:
    """GPU activities (kernels, memsets) recorded during one call of ``fn``; None off CUDA."""
    if DEVICE.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # profiler unavailable (no CUPTI): report unknown, do not fail the timing
        return None


def _make_step(provider: str, tensors: list[tuple[int, bool]]):
    """Build the buffers; return (step fn, bytes moved per element, known launches per step)."""
    n = sum(s for s, _ in tensors)
    decay_end = sum(s for s, d in tensors if d)
    param = torch.randn(n, device=DEVICE)
    grad = torch.randn(n, device=DEVICE) * 1e-3
    if provider == "triton_flat":
        m, v = torch.zeros_like(param), torch.zeros_like(param)
        state = {"step": 0}

        def step():
            state["step"] += 1
            fused_adamw_(param, grad, m, v, lr=HP["lr"], beta1=HP["betas"][0], beta2=HP["betas"][1],
                         eps=HP["eps"], weight_decay=HP["weight_decay"], decay_end=decay_end,
                         step=state["step"], backend="triton")

        return step, bytes_per_element(param.dtype, grad.dtype), adamw_launches(n, "triton")

    params, off = [], 0
    for s, _ in tensors:
        p = torch.nn.Parameter(param[off:off + s])
        p.grad = grad[off:off + s]
        params.append(p)
        off += s
    n_decay = sum(1 for _, d in tensors if d)
    groups = [{"params": params[:n_decay]}, {"params": params[n_decay:], "weight_decay": 0.0}]
    if provider == "bnb_adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, **HP)
        return opt.step, BNB_BYTES_PER_ELEM, None
    kind = {"torch_foreach": dict(foreach=True), "torch_fused": dict(fused=True)}[provider]
    opt = torch.optim.AdamW(groups, **HP, **kind)
    return opt.step, bytes_per_element(param.dtype, grad.dtype), None


def _skip_reason(provider: str) -> str | None:
    if provider == "triton_flat":
        tb = triton_backend()
        if DEVICE.type != "cuda":
            return "Triton on CPU runs only in the interpreter: not a timing"
        if not tb.available:
            return f"triton unusable: {tb.reason}"
    if provider == "bnb_adamw8bit" and not bitsandbytes_backend().available:
        return f"bitsandbytes unusable: {bitsandbytes_backend().reason}"
    return None


@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"trainable{f:g}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_step(benchmark, provider: str, frac: float) -> None:
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    tensors = layout(TOTAL, frac)
    n = sum(s for s, _ in tensors)
    step, bpe, launches = _make_step(provider, tensors)

    def timed():
        step()
        _sync()

    for _ in range(WARMUP):  # first step allocates optimizer state and compiles kernels
        timed()
    profiled = _profiled_cuda_kernels(timed)
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
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # None when disabled
        median = stats.stats.median
        info["median_ms"] = median * 1e3
        info["gb_per_s"] = n * bpe / median / 1e9 if median > 0 else math.nan
