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

DEFAULT_CHUNK = 256


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


# ---------------------------------------------------------------------------------- the math
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


@torch.no_grad()
def apply_mask_ref_(theta: torch.Tensor, theta_pre: torch.Tensor, theta_d: torch.Tensor,
                    keep: torch.Tensor, chunk: int) -> None:
    """``theta = theta_pre - keep * theta_d`` row by row (``keep``: per-row ``1 - m``)."""
    torch.addcmul(theta_pre.view(-1, chunk), theta_d.view(-1, chunk), keep.view(-1, 1), value=-1.0,
                  out=theta.view(-1, chunk))


@torch.no_grad()
def bilevel_step_ref_(
    theta: torch.Tensor,
    theta_pre: torch.Tensor,
    theta_d: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    keep: torch.Tensor,
    rows_per_tensor: torch.Tensor,
    *,
    chunk: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_end: int,
    step: int,
    grad_scale: torch.Tensor | None = None,
    update: bool = True,
    dots: bool = True,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One step of mask learning over the flat buffers, in torch ops (the fused kernel's reference).

    With ``g = grad`` (evaluated at theta(m)) and ``keep = 1 - m`` per row:

    ``dots`` (computed first, at the point where g was evaluated):
        ``d_i = <theta_d_i, g_i>`` per tensor, fp64. The chain rule through
        ``theta(m) = theta_ft + m * theta_d`` gives ``dL/dm_i = d_i`` and, with
        ``m_i = sigmoid(x_i / T)``, ``dL/dx_i = d_i * m_i (1 - m_i) / T``.

    ``update`` (the simulated user's AdamW step on ``theta_ft = theta_pre - theta_d``, exactly
    torch.optim.AdamW's math; u is the signed change of theta_ft):
        g         *= grad_scale                                  (in place)
        exp_avg    = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) g^2
        u          = -lr / bc1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
                     - lr * wd * theta_ft                       (only on [0, decay_end))
        theta_d   -= u                  (theta_ft += u)
        theta     += keep * u           (frozen tensors, keep = 0, stay at theta_pre)

    Bytes per element (fp32): dots read theta_d, g (8); the update reads g, m, v, theta_d,
    theta (+ theta_pre on the decay prefix) and writes m, v, theta_d, theta (~40). These eager
    ops make about a dozen passes over the buffers; a fused kernel makes one.

    Args:
        keep: per-row ``1 - m`` of the row's tensor, fp32 [rows].
        rows_per_tensor: rows of each segment (``FlatLayout.rows_per_tensor``).
        step: the user step being taken, counted from 1 (bias correction).
        grad_scale: optional 0-d/1-element fp32 device tensor (clip coefficient), multiplied into
            ``grad`` in place by the update; the dots use the raw gradient.
        scratch: a flat fp32 buffer like the others for the update's temporary (allocated per call
            when None; passing one avoids a buffer-sized allocation every step).
    Returns:
        The per-tensor dots (fp64) when ``dots`` is set, else None.
    """
    d = segment_dots(theta_d, grad, rows_per_tensor, chunk) if dots else None
    if not update:
        return d
    if step < 1:
        raise ValueError(f"step must be >= 1 (the step being taken), got {step}")
    g = grad
    if grad_scale is not None:
        g.mul_(grad_scale.reshape(()))
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    u = torch.empty_like(theta_d) if scratch is None else scratch
    torch.sqrt(exp_avg_sq, out=u).div_(bc2_sqrt).add_(eps)
    torch.div(exp_avg, u, out=u).mul_(-lr / bc1)
    if weight_decay != 0 and decay_end > 0:
        # -lr*wd*theta_ft = -lr*wd*(theta_pre - theta_d), without a temporary for theta_ft.
        u[:decay_end].add_(theta_d[:decay_end], alpha=lr * weight_decay)
        u[:decay_end].sub_(theta_pre[:decay_end], alpha=lr * weight_decay)
    theta_d.sub_(u)
    theta.view(-1, chunk).addcmul_(u.view(-1, chunk), keep.view(-1, 1))
    return d
