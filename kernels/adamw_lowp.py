"""Compact AdamW optimizer states over the flat trainable buffer: the one import point.

Two one-launch Triton steps, each with its pure-torch reference in its own module:

- ``adamw_bf16_states_`` (``kernels/adamw_bf16.py``): m and v in bf16, stochastically rounded
  with a counter-based hash of (seed, step, absolute element index); bit-identical to its
  reference.
- ``adamw_8bit_`` (``kernels/adamw_8bit.py``): m and v as blockwise 8-bit codes (one fp32 absmax
  per block) over signed/unsigned "dynamic" tables, as bitsandbytes' blockwise 8-bit Adam.

Both keep fp32 master weights and the exact step of ``kernels/adamw.py`` (decoupled weight decay
on ``[0, decay_end)``, device-side grad scale, bias correction); only the stored moments shrink.

    states | held per param      | moved per element and step (fp32 p, fp32 g)
    fp32   | 8 B                 | 28 B  (read p g m v 16 B, write p m v 12 B)
    bf16   | 4 B                 | 20 B  (read 12 B, write 8 B)
    8bit   | 2 B + 8 B per block | 16 B + 16 B per block (absmax m, v read and written)

At SD1.5's ~430M trainable elements (50%) that is 3.44 GB of fp32 states against 1.72 GB (bf16)
and 0.87 GB (8-bit, block 256). A bf16/fp16 gradient moves 2 B less per element in each row.
"""
from __future__ import annotations

import torch

from freezeasguard.kernels.adamw_8bit import (
    ZERO_CODE_M,
    ZERO_CODE_V,
    adamw_8bit_,
    adamw_8bit_ref_,
    code_tables,
    dynamic_code,
    new_8bit_states,
)
from freezeasguard.kernels.adamw_bf16 import adamw_bf16_states_, adamw_bf16_states_ref_, stochastic_round_bf16
from freezeasguard.kernels.choices import STATE_KINDS

__all__ = [
    "adamw_bf16_states_",
    "adamw_bf16_states_ref_",
    "adamw_8bit_",
    "adamw_8bit_ref_",
    "new_8bit_states",
    "dynamic_code",
    "code_tables",
    "stochastic_round_bf16",
    "bytes_per_element_lowp",
    "state_bytes_per_element",
    "ZERO_CODE_M",
    "ZERO_CODE_V",
]

# Bytes of one stored moment element per kind; the 8-bit block scales are counted apart.
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "8bit": 1}


def _check_kind(kind: str, block_size: int) -> None:
    if kind not in STATE_KINDS:
        raise ValueError(f"kind must be one of {STATE_KINDS}, got {kind!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def bytes_per_element_lowp(kind: str, grad_dtype: torch.dtype = torch.float32, block_size: int = 256) -> float:
    """HBM bytes one step moves per element (fp32 params) with ``kind`` states.

    Reads p, g and the two moments, writes p and the two moments; for '8bit' also the two fp32
    block scales, read and written once per block. The code tables (2 KiB) stay in cache.
    """
    _check_kind(kind, block_size)
    state = MOMENT_BYTES[kind]
    out = 4 + grad_dtype.itemsize + 2 * state + 4 + 2 * state
    return out + (16 / block_size if kind == "8bit" else 0)


def state_bytes_per_element(kind: str, block_size: int = 256) -> float:
    """Bytes of optimizer state held per trainable element: 8 (fp32), 4 (bf16), 2 + 8/block (8bit)."""
    _check_kind(kind, block_size)
    return 2.0 * MOMENT_BYTES[kind] + (8.0 / block_size if kind == "8bit" else 0.0)
