"""The flat AdamW's gradient buffer: step-scoped by default, persistent where it must be.

A buffer allocated for the optimizer's whole life holds 4 B per trainable element while the forward
builds its activations, so the step's peak is activations + the whole gradient. Allocated in one
piece at the step's first gradient it is no better: the first gradient arrives when backward has
freed almost nothing. So the buffer is cut, at tensor boundaries, into ``chunks`` ranges of about
equal size, each allocated (zeroed) when the first gradient of one of its tensors arrives and
released after the update (``release``, which ``zero_grad`` calls). Backward produces gradients
as it frees activations, chunk by chunk, as stock autograd does tensor by tensor; at most one chunk
is allocated ahead of its gradients.

Inside a step each trainable tensor's ``.grad`` is a view of its chunk, bound before autograd
accumulates (a tensor hook on the parameter runs before its ``AccumulateGrad``), so accumulation
over micro-batches and DDP's copy of the reduced gradient stay in place, as with one buffer. A
``.grad`` set by hand before its chunk exists is copied in. Ranges the optimizer steps lie inside
one chunk: the locked tensors (stepped by lock chunks) share the first one. A ``.grad`` set or
replaced by hand is what the step reads, as for torch's optimizers (``bind``).

``persistent=True`` keeps one buffer for the optimizer's life (FSDP2 binds its sharded gradients
to it once), zeroed instead of released: the earlier behaviour, bit for bit.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from freezeasguard.kernels.adamw import global_grad_norm

DEFAULT_CHUNKS = 64  # bench savings (small, 64 px, batch 4, 50% frozen): peak 184.7 MiB at 16 chunks, 181.6 at 64


class StepGradients:
    """Gradient storage of a flat buffer of ``total`` elements (see the module docstring).

    ``named`` and ``segments`` (name, offset, numel) in buffer order; ``fixed_end``: the buffer
    offset before which everything is one chunk (the locked tensors)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], segments: list[tuple[str, int, int]], total: int,
                 device: torch.device, *, persistent: bool, chunks: int = DEFAULT_CHUNKS, fixed_end: int = 0):
        self.total, self.device, self.persistent = total, device, persistent
        self.params = [p for _, p in named]
        self.segments = segments
        bounds = [0]
        size = -(-total // max(1, chunks))
        for _, off, _ in segments:  # a boundary at a segment start, never inside the fixed range
            if off >= fixed_end and off - bounds[-1] >= size:
                bounds.append(off)
        if persistent:
            bounds = [0]
        self.bounds = bounds + [total]
        self.ranges = list(zip(self.bounds[:-1], self.bounds[1:]))
        self.members: list[list[int]] = [[] for _ in self.ranges]  # segment indices per chunk
        self.chunk_of: list[int] = []
        c = 0
        for i, (_, off, _) in enumerate(segments):
            while off >= self.ranges[c][1]:
                c += 1
            self.members[c].append(i)
            self.chunk_of.append(c)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.ranges)
        self._handles = []
        if persistent:
            self._allocate(0)
        else:
            for i, p in enumerate(self.params):
                self._handles.append(p.register_hook(functools.partial(self._arrived, i)))

    # allocation ------------------------------------------------------------------------------------
    def _allocate(self, c: int) -> torch.Tensor:
        lo, hi = self.ranges[c]
        buf = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for i in self.members[c]:
                _, off, n = self.segments[i]
                p = self.params[i]
                view = buf[off - lo:off - lo + n].view_as(p)
                if p.grad is not None:  # set by hand before its chunk existed: keep its values
                    view.copy_(p.grad)
                # autograd accumulates into an existing .grad in place, so the view stays live
                p.grad = view
        self.buffers[c] = buf
        return buf

    def _arrived(self, i: int, grad: torch.Tensor) -> None:
        c = self.chunk_of[i]
        if self.buffers[c] is None:
            self._allocate(c)
        return None  # the gradient itself is unchanged

    def bind(self) -> None:
        """Before the gradients are read, make the chunks say what ``.grad`` says: a ``.grad`` set
        or replaced by hand is copied into its chunk (allocated if need be) and bound to it again;
        one set to None reads as zero, as AdamW's missing gradient."""
        with torch.no_grad():
            for c, buf in enumerate(self.buffers):
                if buf is None:
                    if any(self.params[i].grad is not None for i in self.members[c]):
                        self._allocate(c)
                    continue
                lo, base, size = self.ranges[c][0], buf.data_ptr(), buf.element_size()
                for i in self.members[c]:
                    p, (_, off, n) = self.params[i], self.segments[i]
                    g = p.grad
                    if g is not None and g.data_ptr() == base + (off - lo) * size:
                        continue  # the common case, still the chunk's view: no view built per step
                    view = buf[off - lo:off - lo + n].view_as(p)
                    if g is None:
                        view.zero_()
                    else:
                        view.copy_(g)
                    p.grad = view

    def release(self) -> None:
        """After the update: chunks freed and ``.grad`` None (persistent: zeroed in place)."""
        if self.persistent:
            self.buffers[0].zero_()
            return
        for p in self.params:
            p.grad = None
        self.buffers = [None] * len(self.ranges)

    # reading -----------------------------------------------------------------------------------------
    @property
    def whole(self) -> torch.Tensor | None:
        """The one buffer of the persistent form (what ``flat.grad`` is), None otherwise."""
        return self.buffers[0] if self.persistent else None

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers if b is not None)

    def range(self, lo: int, hi: int) -> torch.Tensor:
        """The gradient of ``[lo, hi)`` (inside one chunk); zeros where no gradient arrived."""
        c = self.chunk_of_offset(lo)
        clo, chi = self.ranges[c]
        if hi > chi:
            raise ValueError(f"range [{lo}, {hi}) crosses a gradient chunk boundary at {chi}")
        buf = self.buffers[c]
        if buf is None:  # no tensor of this chunk got a gradient: AdamW steps it with zeros
            return torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        return buf[lo - clo:hi - clo]

    def chunk_of_offset(self, off: int) -> int:
        for c, (lo, hi) in enumerate(self.ranges):
            if lo <= off < hi:
                return c
        raise ValueError(f"offset {off} outside the buffer of {self.total} elements")

    def norm(self) -> torch.Tensor:
        """Global L2 norm (fp32 device scalar). Persistent: one reduction over the buffer."""
        if self.persistent:
            return global_grad_norm(self.buffers[0])
        parts = [global_grad_norm(b) for b in self.buffers if b is not None]
        if not parts:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
