"""AdamW over one flat fp32 buffer that the trainable parameters are views of.

Trainable tensors are views of ONE contiguous fp32 buffer and their gradients views of a flat
gradient buffer that exists only within a step (``optim.gradbuf``: a few chunks, each allocated at
its first gradient and released after the update, so the gradients never sit beside the whole
forward's activations), so the global norm is a few reductions and AdamW a few calls (one per
chunk; elementwise, so bit for bit one call): the Triton kernel on CUDA, torch's public fused
AdamW on CPU, and on CUDA too where Triton cannot run.
The moments are fp32, bf16 or 8-bit blockwise (``optim.states``); ``optim.inbackward`` keeps the
buffer but no gradient buffer, stepping each tensor inside backward.
Frozen tensors are not in the buffer at all. A step reads the gradient buffer and never writes it.
Tensors under a direction lock sit first, grouped by shape, and their chunks are stepped and
projected one at a time (``optim.project.LockGroups``); the rest is still one call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.optim import states as state_kinds
from freezeasguard.engine.optim.gradbuf import DEFAULT_CHUNKS, StepGradients
from freezeasguard.engine.optim.project import DEFAULT_CHUNK_NUMEL, Bases, LockGroups, group_key
from freezeasguard.kernels import _triton
from freezeasguard.kernels.adamw_8bit import code_tables

_EAGER = {"torch_fused": "torch's fused AdamW", "torch": "the kernel's torch form"}


def resolve_flat_backend(backend: str, device: torch.device, kind: str = "fp32") -> tuple[str, str]:
    """The AdamW implementation for a flat buffer with ``kind`` moments on ``device``, and why.

    ``_triton.resolve_backend`` decides, as for every kernel: 'auto' is the Triton kernel on CUDA
    where Triton runs, else the kind's eager form (``states.backend_choices``; on CPU the
    interpreter is correct but far too slow to train with). An explicit choice is kept; 'triton'
    where it cannot run is refused with the reason.
    """
    choices, eager = state_kinds.backend_choices(kind)
    used, why = _triton.resolve_backend(backend, device, "flat AdamW", choices=choices, eager=eager)
    return used, (f"{why}: {_EAGER[used]}" if used == eager and why != "requested" else why)


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over one flat fp32 buffer that the trainable parameters are views of.

    Decay tensors (dim >= 2) come first, so weight decay applies to the range ``[0, decay_end)``.
    ``step()`` is a single call of the moment kind's kernel (``optim.states``); the global
    gradient-clipping coefficient set by ``clip_grad_norm_`` is applied inside it (no extra pass
    over the gradients, no host sync on CUDA).

    ``locks`` (name -> (U, V), see ``optim.project``): those tensors' updates are projected off
    their locked subspaces inside the step; they come first in the buffer, grouped by shape.

    ``states``: how the moments are stored (``optim.states``: 'fp32', 'bf16' with stochastic
    rounding seeded by ``seed``, or '8bit' blockwise).

    ``grad_buffer``: 'step' (the default: chunks allocated within a step and released by
    ``zero_grad``, ``optim.gradbuf``), 'persistent' (one buffer for the optimizer's life, as FSDP2's
    ``ShardedFlatAdamW`` binds its sharded gradients to it once), or False: no gradient buffer
    (``optim.inbackward`` steps each tensor from its own transient gradient).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto",
                 locks: Bases | None = None, lock_chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                 states: str = "fp32", seed: int = 0, grad_buffer: str | bool | None = None,
                 grad_chunks: int = DEFAULT_CHUNKS):
        self.state_kind = state_kinds.check_kind(states)
        self.seed = int(seed)
        self.align = align = state_kinds.alignment(states)
        if not named:
            raise ValueError("FlatAdamW needs at least one trainable tensor")
        locks = dict(locks or {})
        known = {n for n, p in named if p.dim() >= 2}
        stray = sorted(set(locks) - known)
        if stray:
            raise ValueError(f"locks name tensors that are not trainable matrices here: {stray[:5]}")
        keys: dict[tuple, int] = {}
        for n, p in named:
            if n in locks:
                keys.setdefault(group_key(p.shape, locks[n]), len(keys))
        locked = sorted([x for x in named if x[0] in locks], key=lambda x: keys[group_key(x[1].shape, locks[x[0]])])
        ordered = locked + [x for x in named if x[1].dim() >= 2 and x[0] not in locks] + \
            [x for x in named if x[1].dim() < 2]
        device = ordered[0][1].device

        def padded(n: int) -> int:
            return -(-n // align) * align

        total = sum(padded(p.numel()) for _, p in ordered)
        # zeros: padding between segments (8-bit blocks) stays zero weight, gradient and moment
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        if grad_buffer is None or grad_buffer is True:
            grad_buffer = "step"
        if grad_buffer not in ("step", "persistent", False):
            raise ValueError(f"grad_buffer must be 'step', 'persistent' or False, got {grad_buffer!r}")
        self.segments: list[tuple[str, int, int]] = []
        off = 0
        self.decay_end = 0
        with torch.no_grad():
            for name, p in ordered:
                n = p.numel()
                flat[off:off + n].copy_(p.detach().reshape(-1))
                p.data = flat[off:off + n].view_as(p)
                p.grad = None
                self.segments.append((name, off, n))
                off += padded(n)
                if p.dim() >= 2:
                    self.decay_end = off
        self.named = ordered
        layout = [(n, o, k, tuple(p.shape)) for (n, o, k), (_, p) in zip(self.segments, ordered) if n in locks]
        self.locks = LockGroups(layout, locks, device, lock_chunk_numel) if locks else None
        self._step_start = 0 if self.locks is None else -(-self.locks.end // align) * align
        self.grads = None if grad_buffer is False else StepGradients(
            ordered, self.segments, total, device, persistent=grad_buffer == "persistent", chunks=grad_chunks,
            fixed_end=self._step_start)
        flat.grad = self.grads.whole if self.grads is not None else None
        self.backend, self.backend_reason = resolve_flat_backend(backend, device, self.state_kind)
        self._scale: torch.Tensor | None = None  # clip coefficient for the next step (device scalar)
        self._norm: torch.Tensor | None = None  # gradient norm clip_grad_norm_ measured for it
        super().__init__([flat], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        st = self.state[flat]
        st["step"] = 0
        st.update(state_kinds.new_states(self.state_kind, total, device))
        # the tables the 8-bit kernels decode with, held here so that what the optimizer needs is
        # reachable from it (and counted: ``code_table_bytes``)
        self.code_tables = code_tables(device) if self.state_kind == "8bit" else None

    @property
    def code_table_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.code_tables) if self.code_tables else 0

    @property
    def lock_bytes(self) -> int:
        """Bytes of the stacked lock bases held on the buffer's device (zero-padded per shape group)."""
        if self.locks is None:
            return 0
        return sum(b.numel() * b.element_size() for g in self.locks.groups for b in (g.out, g.inp) if b is not None)

    @property
    def lock_transient_bytes(self) -> int:
        """The largest pre-step copy one locked chunk takes during ``step()`` (freed after it)."""
        if self.locks is None:
            return 0
        return max(hi - lo for lo, hi in map(LockGroups.span, self.locks.chunks)) * self.flat.element_size()

    @property
    def flat(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def describe(self) -> str:
        dec = [(n, p) for n, p in self.named if p.dim() >= 2]
        nod = [(n, p) for n, p in self.named if p.dim() < 2]
        lock = "" if self.locks is None else (
            f"; {sum(g.count for g in self.locks.groups)} locked tensors in {len(self.locks.groups)} shape groups, "
            f"{len(self.locks.chunks)} chunk(s)")
        return (f"flat optimizer groups: decay: {len(dec)} tensors, {self.decay_end:,} params; "
                f"no_decay: {len(nod)} tensors, {self.flat.numel() - self.decay_end:,} params; "
                f"one {self.flat.numel():,}-element fp32 buffer, {self.state_kind} moments, AdamW backend "
                f"{self.backend} ({self.backend_reason})" + lock)

    @property
    def grads_between_steps(self) -> bool:
        """Whether gradients outlive a step (what the memory ledger's peak model asks)."""
        return self.grads is not None and self.grads.persistent

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - the buffer decides
        """Release the step's gradient chunks (persistent buffer: zero it; its views must survive)."""
        self.grads.release()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Global L2 norm of the gradients; with ``max_norm``, clip inside the next step."""
        self.grads.bind()
        norm = self.grads.norm()
        self._norm = norm
        self._scale = None if max_norm is None else torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        """One AdamW step. On CPU a non-finite gradient norm (an inf or NaN gradient) is refused before
        anything is written (clipping would turn inf into a zero scale and still move every weight
        by its momentum and decay); on CUDA that check is the caller's, as it costs a host sync
        (the trainer makes it)."""
        norm, self._norm = self._norm, None
        self.grads.bind()
        if self.flat.device.type == "cpu":
            norm = self.grads.norm() if norm is None else norm
            if not math.isfinite(float(norm)):
                self._scale = None
                raise TrainingError(f"the gradient norm is {float(norm)}: the AdamW step was refused; no parameter, "
                                    "moment or step count changed")
        st = self.state[self.flat]
        st["step"] += 1
        flat, grads = self.flat, self.grads

        def run(lo: int, hi: int) -> None:
            self.step_range_(lo, hi, grads.range(lo, hi), self._scale)

        start = 0
        if self.locks is not None:  # locked chunks: copy, step, project the update; then the rest
            for chunk in self.locks.chunks:
                lo, hi = LockGroups.span(chunk)
                old = flat[lo:hi].clone()
                run(lo, hi)
                LockGroups.project_chunk_(chunk, flat, old)
            start = self._step_start  # the next segment (8-bit: a block start)
        for lo, hi in grads.ranges:  # the rest, one call per gradient chunk (elementwise: as one call)
            if hi > start:
                run(max(lo, start), hi)
        self._scale = None

    def step_range_(self, lo: int, hi: int, grad: torch.Tensor, scale: torch.Tensor | None) -> None:
        """AdamW on ``flat[lo:hi]`` with gradient ``grad`` at the current step count (no locks)."""
        g, st = self.param_groups[0], self.state[self.flat]
        state_kinds.step_range_(self.state_kind, st, self.flat, grad, lo, hi, lr=g["lr"], betas=g["betas"],
                                eps=g["eps"], weight_decay=g["weight_decay"], decay_end=self.decay_end,
                                step=st["step"], grad_scale=scale, backend=self.backend, seed=self.seed)

    def load_state_dict(self, state_dict) -> None:
        """As ``Optimizer.load_state_dict``, which casts every state tensor to the parameter's dtype
        (fp32): bf16 moments and 8-bit codes get their own dtype back (the round trip is exact).
        A state of another kind or size is refused."""
        theirs = next(iter(state_dict.get("state", {}).values()), {})
        mine = {k: v for k, v in self.state[self.flat].items() if torch.is_tensor(v)}
        got = {k: (tuple(v.shape), v.dtype) for k, v in theirs.items() if torch.is_tensor(v)}
        want = {k: (tuple(v.shape), v.dtype) for k, v in mine.items()}
        if got != want:
            raise TrainingError(f"optimizer state does not fit this buffer ({self.state_kind} moments over "
                                f"{self.flat.numel():,} elements): it holds {sorted(got)}, this one {sorted(want)}")
        super().load_state_dict(state_dict)
        st = self.state[self.flat]
        for k, (_, dtype) in want.items():
            st[k] = st[k].to(dtype)

    # Optimizer.state_dict stores tensors by param index; the ints round-trip as they are.
