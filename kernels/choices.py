"""The closed sets of names the kernels dispatch on, each spelled once.

The engine's config, its service policy and caps, its memory plan and its optimizer all accept
exactly these tuples (imported from here: the kernels cannot import the engine), so adding or
dropping a value is one edit. Each ``Literal`` is the type; ``typing.get_args`` gives its values
in order. Stdlib only: reading the config needs no torch.
"""
from __future__ import annotations

from typing import Literal, get_args

StateKind = Literal["fp32", "bf16", "8bit"]
"""How AdamW keeps its two moments per trainable element: fp32, bf16 with stochastic rounding, or
8-bit blockwise codes with one fp32 scale per block."""
STATE_KINDS: tuple[str, ...] = get_args(StateKind)
COMPACT_STATE_KINDS: tuple[str, ...] = tuple(k for k in STATE_KINDS if k != "fp32")

Backend = Literal["auto", "triton", "torch"]
"""Which implementation a kernel's launcher runs: 'auto' (see ``_triton.resolve_backend``), the
Triton kernel, or its pure-torch reference."""
BACKENDS: tuple[str, ...] = get_args(Backend)

AdamWBackend = Literal[Backend, "torch_fused"]
"""fp32-moment AdamW also runs as torch's own fused AdamW (fp32 params and grads only)."""
ADAMW_BACKENDS: tuple[str, ...] = get_args(AdamWBackend)
