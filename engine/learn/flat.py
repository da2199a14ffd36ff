"""Flat fp32 buffers for mask learning, and the per-step math over them.

Layout. Every parameter tensor ``i`` of the model owns a segment ``[off_i, off_i + n_i)`` of one
1-D buffer. Segments start at multiples of ``chunk`` elements (zero padding fills the gaps), so
the buffer viewed as ``[rows, chunk]`` has every row inside exactly one tensor. That buys two
things without a per-element index buffer:

* a per-tensor value (the keep factor ``1 - m_i``) broadcasts over rows from a per-row table;
* per-tensor dot products reduce deterministically: each row is dotted by one batched GEMV,
  then the rows of a tensor are summed in fp64 by ``torch.segment_reduce`` (fixed orders on CPU
  and CUDA, no atomics).

Tensors with ``dim >= 2`` come first, so the simulated user's weight decay (matrices and kernels
only, like the service's optimizer groups) is the prefix ``[0, decay_end)``; within each group
tensors keep model order. Padding holds zeros in every buffer and stays zero under every update
(zero gradient, zero moments, zero delta).

Buffers (all fp32, same layout):

    theta       the weights the forward sees, theta(m) = theta_pre - (1 - m) * theta_d;
                the model's parameters are views into it
    theta_pre   the publisher's weights (never written)
    theta_d     theta_pre - theta_ft, theta_ft being the simulated user's fine-tuned weights
    grad        dL/dtheta; the parameters' .grad are views into it
    exp_avg     the simulated user's AdamW first moment (for theta_ft)
    exp_avg_sq  its second moment
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from freezeasguard.engine.learn.config import DEFAULT_CHUNK


@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor lives in the flat buffers.

    ``names``/``shapes``/``numels``/``offsets`` are in flat (segment) order; ``model_names`` is
    the model's ``named_parameters()`` order.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    model_names: tuple[str, ...]
    chunk: int
    total: int  # buffer length, a multiple of chunk
    decay_end: int  # [0, decay_end) holds the tensors with dim >= 2

    @classmethod
    def from_module(cls, module: nn.Module, chunk: int = DEFAULT_CHUNK) -> "FlatLayout":
        return cls.from_shapes({n: tuple(p.shape) for n, p in module.named_parameters()}, chunk)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], chunk: int = DEFAULT_CHUNK) -> "FlatLayout":
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if not shapes:
            raise ValueError("the model has no parameter tensors")
        model_names = tuple(shapes)
        decay = [n for n in model_names if len(shapes[n]) >= 2]
        no_decay = [n for n in model_names if len(shapes[n]) < 2]
        names, offs, numels, off = [], [], [], 0
        decay_end = 0
        for group in (decay, no_decay):
            for n in group:
                k = math.prod(shapes[n])
                names.append(n)
                offs.append(off)
                numels.append(k)
                off += max(1, math.ceil(k / chunk)) * chunk
            if group is decay:
                decay_end = off
        return cls(tuple(names), tuple(tuple(shapes[n]) for n in names), tuple(numels), tuple(offs),
                   model_names, chunk, off, decay_end)

    # ------------------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return len(self.names)

    @property
    def rows(self) -> int:
        return self.total // self.chunk

    def rows_per_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows of each segment, in flat order (the lengths of the segment reduction)."""
        return torch.tensor([max(1, math.ceil(k / self.chunk)) for k in self.numels],
                            dtype=torch.long, device=device)

    def row_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The segment index of every row, [rows] int64."""
        return torch.repeat_interleave(torch.arange(len(self), device=device), self.rows_per_tensor(device))

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def model_order(self) -> list[int]:
        """Segment index of each tensor in model order."""
        idx = self.index()
        return [idx[n] for n in self.model_names]

    # ------------------------------------------------------------------------------ buffers
    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of ``buf`` shaped like the tensor, in model order (no copies)."""
        out = {n: buf[o:o + k].view(s) for n, s, k, o in zip(self.names, self.shapes, self.numels, self.offsets)}
        return {n: out[n] for n in self.model_names}

    def flatten(self, tensors: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        """A new zero-padded fp32 flat buffer holding ``tensors`` (all names, matching shapes)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        dev = device if device is not None else next(iter(tensors.values())).device
        buf = torch.zeros(self.total, dtype=torch.float32, device=dev)
        for n, s, k, o in zip(self.names, self.shapes, self.numels, self.offsets):
            t = tensors[n]
            if tuple(t.shape) != s:
                raise ValueError(f"tensor {n!r}: shape {tuple(t.shape)}, layout has {s}")
            buf[o:o + k].copy_(t.detach().reshape(-1))
        return buf

    def bind(self, module: nn.Module, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """Make ``module``'s parameters views of ``theta`` and their ``.grad`` views of ``grad``.

        Autograd then accumulates into the flat gradient in place (zero it with ``grad.zero_()``,
        never ``zero_grad(set_to_none=True)``, which would drop the views).
        """
        params = dict(module.named_parameters())
        if tuple(params) != self.model_names:
            raise ValueError("the module's parameters do not match the layout")
        tv, gv = self.views(theta), self.views(grad)
        for n, p in params.items():
            p.data = tv[n]
            p.grad = gv[n]


# ---------------------------------------------------------------------------------- theta(m)
@torch.no_grad()
def apply_mask_ref_(theta: torch.Tensor, theta_pre: torch.Tensor, theta_d: torch.Tensor,
                    keep: torch.Tensor, chunk: int) -> None:
    """``theta = theta_pre - keep * theta_d`` row by row (``keep``: per-row ``1 - m``)."""
    torch.addcmul(theta_pre.view(-1, chunk), theta_d.view(-1, chunk), keep.view(-1, 1), value=-1.0,
                  out=theta.view(-1, chunk))
