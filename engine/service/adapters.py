"""Checks on what a delta checkpoint holds, before any of it reaches arithmetic.

A delta's metadata is unsigned and its tensors come from whoever hands the file in, so every value
is parsed strictly (ASCII digits, no signs, no ``nan``/``inf``, no underscores, bounded lengths) and
every tensor is checked for type, layout, device, dtype and finiteness; a LoRA pair must fit its
module's weight exactly (``A [r, in, *k]``, ``B [out, r]`` or ``[out, r, 1, 1]``) with the rank the
metadata claims. Each check returns named problems; ``merge_delta`` refuses the delta on any.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

# Adapter ranks a merge accepts unless the caller passes the policy's cap (``max_lora_rank``).
MAX_RANK = 1024
# Floating dtypes a delta tensor may have (no ints, bools, complex, quantized or fp8 tensors).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LORA_PARTS = ("lora_A", "lora_B")
MAX_NAME = 512

_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,100}", re.ASCII)  # fullmatch: no sign, space, '_', '.', 0x or non-ASCII digit
_ALPHA = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)


def show(x: Any, limit: int = 80) -> str:
    """``repr`` of a value for a message, cut to ``limit`` characters (names can be megabytes)."""
    r = repr(x)
    return r if len(r) <= limit else f"{r[:limit - 15]}...' ({len(r)} chars)"


def parse_count(value: Any) -> int | None:
    """A whole number written in plain ASCII digits (at most 100), or None."""
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None


def parse_rank(meta: Mapping[str, str], max_rank: int) -> tuple[int | None, list[str]]:
    """The metadata's ``lora_rank``: a whole number in [1, max_rank], written in plain digits."""
    if "lora_rank" not in meta:
        return None, ["LoRA delta without lora_rank metadata"]
    v = meta["lora_rank"]
    rank = parse_count(v)
    if rank is None:
        return None, [f"metadata lora_rank {show(v)} is not a whole number (plain ASCII digits)"]
    if rank == 0:
        return None, [f"metadata lora_rank {show(v)}: rank zero (an adapter has rank >= 1)"]
    if rank > max_rank:
        return None, [f"metadata lora_rank {show(v)} is above the cap of {max_rank} (max_rank)"]
    return rank, []


def parse_alpha(meta: Mapping[str, str]) -> tuple[float | None, list[str]]:
    """The metadata's ``lora_alpha``: a positive finite decimal (no sign, nan, inf or hex)."""
    if "lora_alpha" not in meta:
        return None, ["LoRA delta without lora_alpha metadata"]
    v = meta["lora_alpha"]
    alpha = float(v) if isinstance(v, str) and len(v) <= 40 and _ALPHA.fullmatch(v) else math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        return None, [f"metadata lora_alpha {show(v)} is not a positive finite number"]
    return alpha, []


def parse_steps(meta: Mapping[str, str]) -> int | None:
    """The metadata's ``steps`` (plain digits), or None when missing or malformed."""
    return parse_count(meta.get("steps"))


def adapter_module(name: str) -> tuple[str, str] | None:
    """``'m.lora_A.weight'`` -> ``('m', 'lora_A')``; None for any other name."""
    for part in LORA_PARTS:
        suffix = f".{part}.weight"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], part
    return None


def name_problem(name: Any, state: Mapping[str, torch.Tensor]) -> str | None:
    """A delta tensor name that is not a string, or is long or odd and names nothing of the base."""
    if not isinstance(name, str):
        return f"delta tensor name {show(name)} is a {type(name).__name__}, not a string"
    if name in state:
        return None
    ad = adapter_module(name)
    if ad is not None and f"{ad[0]}.weight" in state:
        return None
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        return (f"delta tensor name {show(name)} has odd characters or length (names are dot-separated "
                f"ASCII [A-Za-z0-9_] parts, at most {MAX_NAME} characters)")
    return None


def tensor_problems(name: str, t: Any, like: torch.Tensor | None) -> list[str]:
    """What makes a delta tensor unusable: not a dense tensor with data on the base tensor's device,
    not of a floating dtype, or holding nan/inf."""
    if not isinstance(t, torch.Tensor):
        return [f"{show(name)} is a {type(t).__name__}, not a tensor"]
    if t.layout != torch.strided or t.device.type == "meta":
        return [f"{show(name)}: a {t.layout} tensor on {t.device} (a delta tensor is dense and holds data)"]
    if like is not None and t.device != like.device:
        return [f"{show(name)}: on {t.device}, the base tensor is on {like.device}"]
    if t.dtype not in FLOAT_DTYPES:
        return [f"{show(name)}: dtype {str(t.dtype).removeprefix('torch.')} is not a floating-point dtype "
                f"({', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)})"]
    if not bool(torch.isfinite(t).all()):
        return [f"{show(name)} holds non-finite values (nan or inf)"]
    return []


def pair_problems(m: str, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, rank: int | None,
                  max_rank: int) -> list[str]:
    """Every way a (valid-tensor) LoRA pair does not fit its module's weight ``w``.

    A Linear weight [out, in] takes A [r, in] and B [out, r]; a Conv2d weight [out, in, kh, kw]
    takes A [r, in, kh, kw] and B [out, r, 1, 1]. ``r`` must be >= 1, at most ``max_rank``, and the
    metadata's ``rank`` (when that parsed).
    """
    if w.dim() not in (2, 4) or not w.is_floating_point():
        return [f"module {show(m)}: its weight is a {w.dim()}-D {str(w.dtype).removeprefix('torch.')} "
                f"tensor {list(w.shape)}; adapters go on Linear (2-D) or Conv2d (4-D) float weights only"]
    if a.dtype != b.dtype:
        return [f"module {show(m)}: lora_A is {str(a.dtype).removeprefix('torch.')}, lora_B "
                f"{str(b.dtype).removeprefix('torch.')} (the pair must share one dtype)"]
    k = tuple(w.shape[2:])
    r = a.shape[0] if a.dim() else -1
    want_a, want_b = (r, w.shape[1], *k), (w.shape[0], r, *(1,) * len(k))
    if a.dim() != w.dim() or b.dim() != w.dim() or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        form = "A [r, in, kh, kw], B [out, r, 1, 1]" if k else "A [r, in], B [out, r]"
        return [f"module {show(m)}: adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit the weight "
                f"{list(w.shape)} (needs {form})"]
    if r == 0:
        return [f"module {show(m)}: rank-zero adapter (A {list(a.shape)}, B {list(b.shape)})"]
    if r > max_rank:
        return [f"module {show(m)}: adapter rank {r} is above the cap of {max_rank} (max_rank)"]
    if rank is not None and r != rank:
        return [f"module {show(m)}: adapter rank {r} (A {list(a.shape)}, B {list(b.shape)}) disagrees with "
                f"metadata lora_rank {rank}"]
    return []
