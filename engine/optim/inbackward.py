"""AdamW applied inside backward: no persistent gradient buffer.

``InBackwardAdamW`` keeps ``FlatAdamW``'s flat fp32 master buffer and moments but allocates no
gradient buffer. A post-accumulate-grad hook on every trainable tensor steps that tensor's segment
of the buffer as soon as autograd has finished its gradient, then drops the gradient, so at most
the gradient autograd is handing over (one tensor's) is alive at a time instead of 4 B per
trainable parameter for the whole step.

What changes, exactly:

* **Clipping** (``max_grad_norm``): the global norm of a step is known only after its last
  gradient, too late for the tensors already updated. The rule here is *clip by the previous
  step's norm*: step ``s`` scales every gradient by ``min(1, max_norm / (norm[s-1] + 1e-6))`` with
  ``norm[s-1]`` the global L2 norm measured (unclipped) during the previous backward; the first
  step is unclipped. AdamW's update is invariant to a constant gradient scale apart from ``eps``,
  so what clipping changes is the relative weight of a step in the moments; under this rule a
  spike is damped one step late. The norm of the current step is still measured and reported.
* **Gradient accumulation** is refused: a tensor that receives a second gradient within one step
  raises ``TrainingError`` (the update already happened). So is DDP (its reducer averages
  gradients after these hooks have run; ``train.update`` refuses the combination).
* **Non-finite gradients**: on CPU each tensor's gradient is checked before its update; from the
  first non-finite one on, nothing more is updated and ``finish_step`` raises, naming it. The
  tensors stepped earlier in that backward keep their update: a failed step leaves the model
  part-updated and the run must resume from a checkpoint (a failed service job publishes
  nothing). On CUDA the per-tensor check would cost a host sync per tensor; the caller's
  post-backward norm check catches it, with the same consequence.
* **Tensors without a gradient** in a backward (unused this step) are stepped with a zero
  gradient in ``finish_step``, as the flat buffer's zeroed gradient would have been.
* **Locks**: a locked tensor's segment is copied, stepped and its update projected, per tensor.

Protocol: ``begin_step()`` before backward, ``finish_step()`` after it (returns the unclipped
global norm as a device scalar); ``step()`` and ``zero_grad()`` do nothing.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.optim.project import LockGroups


class InBackwardAdamW(FlatAdamW):
    """``FlatAdamW`` whose update of each tensor runs in backward, from that tensor's own gradient."""

    in_backward = True

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, max_grad_norm: float | None = None, **kw):
        super().__init__(named, grad_buffer=False, **kw)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self._index = {id(p): i for i, (_, p) in enumerate(self.named)}
        by_offset = {off: i for i, (_, off, _) in enumerate(self.segments)}
        self._lock_of: dict[int, list] = {}  # segment -> one-tensor chunk for LockGroups.project_chunk_
        for g in (self.locks.groups if self.locks is not None else ()):
            for j in range(g.count):
                self._lock_of[by_offset[g.start + j * g.m * g.n]] = [g.slice(j, j + 1)]
        self.state[self.flat]["prev_norm"] = torch.full((), -1.0, device=self.flat.device)  # < 0: none yet
        self.peak_grad_bytes = 0  # the largest gradient held at once (what the ledger counts)
        self._active = False
        self._done: set[int] = set()
        self._sq: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._bad: str | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self.named]

    def describe(self) -> str:
        clip = "unclipped" if self.max_grad_norm is None else \
            f"clipped to {self.max_grad_norm:g} by the previous step's norm"
        return super().describe() + f"; updates applied in backward, no gradient buffer, {clip}"

    # the step protocol ---------------------------------------------------------------------------
    @torch.no_grad()
    def begin_step(self) -> None:
        """Open a step: its count, learning rate and clip coefficient are fixed here."""
        if self._active:
            raise TrainingError("begin_step() called twice without finish_step()")
        st = self.state[self.flat]
        st["step"] += 1
        prev = st["prev_norm"]
        self._scale = None if self.max_grad_norm is None else torch.where(
            prev < 0, torch.ones_like(prev), torch.clamp(self.max_grad_norm / (prev + 1e-6), max=1.0))
        self._sq = torch.zeros((), dtype=torch.float32, device=self.flat.device)
        self._done, self._bad, self._active = set(), None, True

    @torch.no_grad()
    def finish_step(self) -> torch.Tensor:
        """Close the step: tensors that got no gradient are stepped with zeros; returns the global
        (unclipped) gradient norm of this step, which the next step clips by."""
        if not self._active:
            raise TrainingError("finish_step() without begin_step()")
        self._active = False
        if self._bad is not None:
            raise TrainingError(f"the gradient of {self._bad} is not finite: it and every tensor after it were "
                                f"not updated, {len(self._done)} tensor(s) updated before it keep their update "
                                "(in-backward updates cannot be undone); resume from the last checkpoint")
        for i, (_, off, n) in enumerate(self.segments):
            if i not in self._done:
                self._update(i, torch.zeros(n, dtype=torch.float32, device=self.flat.device))
        norm = self._sq.sqrt()
        self.state[self.flat]["prev_norm"] = norm.clone()
        self._scale = self._sq = None  # nothing of the step outlives it but its state
        return norm

    def _hook(self, p: nn.Parameter) -> None:
        i = self._index[id(p)]
        name = self.segments[i][0]
        if not self._active:
            raise TrainingError(f"a gradient for {name} arrived outside a training step (call begin_step() "
                                "before backward when updates run in backward)")
        if i in self._done:
            raise TrainingError(f"{name} received a second gradient in one step: updates applied in backward take "
                                "one gradient per tensor per step (no gradient accumulation, no repeated backward)")
        g = p.grad.detach().reshape(-1)
        p.grad = None
        self.peak_grad_bytes = max(self.peak_grad_bytes, g.numel() * g.element_size())
        if self._bad is not None:
            return
        with torch.no_grad():
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()
            if g.device.type == "cpu" and not math.isfinite(float(sq)):
                self._bad = name
                return
            self._sq += sq
            self._update(i, g if g.dtype == torch.float32 else g.float())
        self._done.add(i)

    def _update(self, i: int, grad: torch.Tensor) -> None:
        _, off, n = self.segments[i]
        chunk = self._lock_of.get(i)
        old = self.flat[off:off + n].clone() if chunk is not None else None
        self.step_range_(off, off + n, grad, self._scale)
        if chunk is not None:
            LockGroups.project_chunk_(chunk, self.flat, old)

    # what the trainer calls on other optimizers ---------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - nothing is kept
        return None

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:  # noqa: ARG002
        raise TrainingError("clipping runs inside backward here (begin_step/finish_step)")

    def step(self, closure=None):  # noqa: ARG002
        raise TrainingError("updates run inside backward here: call begin_step() before backward and "
                            "finish_step() after it, not step()")

    @property
    def lock_transient_bytes(self) -> int:
        """The pre-step copy of the largest locked tensor (one tensor at a time here)."""
        if not self._lock_of:
            return 0
        return max(self.segments[i][2] for i in self._lock_of) * self.flat.element_size()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
