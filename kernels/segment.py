"""Deterministic per-tensor sums over a flat buffer whose tensors start at row boundaries.

A buffer viewed as ``[rows, chunk]`` with every row inside one tensor (``engine.learn.flat``'s
layout) reduces per tensor without atomics: each row is summed (or dotted) in fp32, then each
tensor's rows are added in fp64 by ``torch.segment_reduce`` in a fixed order, on CPU and CUDA
alike, so the result is bit-reproducible run to run. The fused mask-learning kernel
(``kernels.mask_update``) writes the per-row partials and uses the same second stage.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def segment_dots(a: torch.Tensor, b: torch.Tensor, rows_per_tensor: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-tensor ``<a_i, b_i>`` of two flat buffers, fp64 [n_tensors], deterministic.

    Rows are dotted by a batched GEMV (fp32 accumulation over ``chunk`` elements, no temporary
    the size of the buffer), then each tensor's rows are summed in fp64. On CUDA keep TF32 off
    for matmuls (torch's default) or the row dots lose precision.
    """
    rows = a.numel() // chunk
    row_dots = torch.bmm(a.view(rows, 1, chunk), b.view(rows, chunk, 1)).view(rows)
    return segment_sum_rows(row_dots, rows_per_tensor)


def segment_sum_rows(row_sums: torch.Tensor, rows_per_tensor: torch.Tensor) -> torch.Tensor:
    """Per-tensor totals of per-row partial sums ([rows] -> fp64 [n_tensors]), in a fixed order
    (no atomics): shared by the reference and the fused kernel (``kernels.mask_update``)."""
    return torch.segment_reduce(row_sums.double(), "sum", lengths=rows_per_tensor)
