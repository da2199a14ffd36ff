"""The optimizer-step cases shared by bench/bench_adamw.py (pytest-benchmark) and
``bench/run.py optimizer``: buffers laid out like SD1.5's trainable tensors, one step function per
provider, and the bytes each step must move.

Providers: torch AdamW (foreach, fused) stepping per-tensor views of the flat buffer, as a
training script does; this package's flat-buffer step (``flat_engine``: the one-launch Triton
kernel on CUDA, torch's fused AdamW over the two weight-decay ranges on CPU: what the engine's
optimizer runs); the Triton kernel itself (``triton_flat``, CUDA only); the flat buffer with bf16 or
8-bit blockwise moments (``flat_bf16states``, ``flat_8bit``: one Triton launch on CUDA, their torch
reference on CPU); bitsandbytes' per-tensor AdamW8bit.
"""
from __future__ import annotations

import math
import os
import random

import torch

from freezeasguard.engine.backends import bitsandbytes_backend, triton_backend
from freezeasguard.engine.optim.states import new_states, step_range_
from freezeasguard.kernels.adamw import adamw_launches, bytes_per_element, fused_adamw_

SD15_NUMEL = 859_520_964
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOTAL = int(os.environ.get("BENCH_ADAMW_NUMEL", SD15_NUMEL if DEVICE.type == "cuda" else 2_000_000))
FRACTIONS = (0.3, 0.5, 1.0)
PROVIDERS = ("torch_foreach", "torch_fused", "flat_engine", "triton_flat", "flat_bf16states", "flat_8bit",
             "bnb_adamw8bit")
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


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def profiled_cuda_kernels(fn) -> int | None:
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


def record_timing(benchmark, info: dict, bytes_per_step: float) -> None:
    """Add the median step time and the bandwidth it implies to a benchmark's extra info
    (nothing when pytest-benchmark ran disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # None when disabled
        median = stats.stats.median
        info["median_ms"] = median * 1e3
        info["gb_per_s"] = bytes_per_step / median / 1e9 if median > 0 else math.nan


def tensor_groups(param: torch.Tensor, grad: torch.Tensor, tensors: list[tuple[int, bool]]) -> list[dict]:
    """Per-tensor parameters viewing ``param`` (gradients viewing ``grad``), in two weight-decay groups
    (decay tensors first), as a training script hands them to a per-tensor optimizer."""
    params, off = [], 0
    for s, _ in tensors:
        p = torch.nn.Parameter(param[off:off + s])
        p.grad = grad[off:off + s]
        params.append(p)
        off += s
    n_decay = sum(1 for _, d in tensors if d)
    return [{"params": params[:n_decay]}, {"params": params[n_decay:], "weight_decay": 0.0}]


def make_step(provider: str, tensors: list[tuple[int, bool]]):
    """Build the buffers; return (step fn, bytes moved per element, known launches per step)."""
    n = sum(s for s, _ in tensors)
    decay_end = sum(s for s, d in tensors if d)
    param = torch.randn(n, device=DEVICE)
    grad = torch.randn(n, device=DEVICE) * 1e-3
    if provider in ("flat_bf16states", "flat_8bit"):
        kind = "bf16" if provider == "flat_bf16states" else "8bit"
        st = new_states(kind, n, DEVICE)
        counter = {"step": 0}
        backend = "triton" if DEVICE.type == "cuda" else "torch"

        def step():
            counter["step"] += 1
            step_range_(kind, st, param, grad, 0, n, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                        weight_decay=HP["weight_decay"], decay_end=decay_end, step=counter["step"], grad_scale=None,
                        backend=backend, seed=0)

        return step, (20 if kind == "bf16" else 16), (1 if DEVICE.type == "cuda" else None)
    if provider in ("triton_flat", "flat_engine"):
        backend = "triton" if provider == "triton_flat" or DEVICE.type == "cuda" else "torch_fused"
        m, v = torch.zeros_like(param), torch.zeros_like(param)
        state = {"step": 0}

        def step():
            state["step"] += 1
            fused_adamw_(param, grad, m, v, lr=HP["lr"], beta1=HP["betas"][0], beta2=HP["betas"][1],
                         eps=HP["eps"], weight_decay=HP["weight_decay"], decay_end=decay_end,
                         step=state["step"], backend=backend)

        launches = adamw_launches(n, "triton") if backend == "triton" else (2 if decay_end not in (0, n) else 1)
        return step, bytes_per_element(param.dtype, grad.dtype), launches

    groups = tensor_groups(param, grad, tensors)
    if provider == "bnb_adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, **HP)
        return opt.step, BNB_BYTES_PER_ELEM, None
    kind = {"torch_foreach": dict(foreach=True), "torch_fused": dict(fused=True)}[provider]
    opt = torch.optim.AdamW(groups, **HP, **kind)
    return opt.step, bytes_per_element(param.dtype, grad.dtype), None


def skip_reason(provider: str) -> str | None:
    if provider == "triton_flat":
        tb = triton_backend()
        if DEVICE.type != "cuda":
            return "Triton on CPU runs only in the interpreter: not a timing"
        if not tb.available:
            return f"triton unusable: {tb.reason}"
    if provider == "bnb_adamw8bit" and not bitsandbytes_backend().available:
        return f"bitsandbytes unusable: {bitsandbytes_backend().reason}"
    return None


