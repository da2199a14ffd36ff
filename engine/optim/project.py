"""Direction locks enforced in the optimizer step: every update of a locked tensor is projected off
its locked subspace before it lands (weight decay included), so no copy of the base is kept.

Bases arrive as plain tensors, ``name -> (U or None, V or None)`` (``guard.subspace`` reads,
hashes and checks them). Two ways in:

* ``LockGroups``: for the flat buffer (``optim.flat.FlatAdamW``). Locked tensors sit first in the
  buffer, grouped by shape, so a group's updates are one ``[G, m, n]`` view and its projection one
  batched GEMM per side (``kernels.project``). The step runs chunk by chunk: copy the chunk
  (a bounded transient, ``chunk_numel`` elements), step it, project ``new - old``.
* ``register_lock_hooks``: any other torch optimizer (torch AdamW, 8-bit AdamW): a step pre-hook
  copies the locked tensors, a post-hook projects their updates. For LoRA adapters (``mode='whole'``)
  the tensor itself is projected after every step (``B <- (I - U U^T) B`` keeps ``U^T B A = 0``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from freezeasguard.kernels.project import as_matrix, project_off_

Bases = Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]
DEFAULT_CHUNK_NUMEL = 1 << 26  # 256 MiB of fp32 transient per chunk


def group_key(shape: Sequence[int], bases: tuple[torch.Tensor | None, torch.Tensor | None]) -> tuple:
    return (tuple(shape), bases[0] is not None, bases[1] is not None)


def _stack(bs: list[torch.Tensor | None], dim: int, device) -> torch.Tensor | None:
    if bs[0] is None:
        return None
    r = max(b.shape[1] for b in bs)
    out = torch.zeros(len(bs), dim, r, dtype=torch.float32, device=device)
    for i, b in enumerate(bs):
        out[i, :, :b.shape[1]] = b.to(device=device, dtype=torch.float32)
    return out


@dataclass
class _Group:
    start: int  # offset in the flat buffer
    count: int  # tensors
    m: int
    n: int
    out: torch.Tensor | None  # [count, m, r] zero-padded
    inp: torch.Tensor | None  # [count, n, s]

    @property
    def numel(self) -> int:
        return self.count * self.m * self.n

    def slice(self, lo: int, hi: int) -> "_Group":
        """Tensors ``lo..hi`` of the group."""
        return _Group(self.start + lo * self.m * self.n, hi - lo, self.m, self.n,
                      None if self.out is None else self.out[lo:hi], None if self.inp is None else self.inp[lo:hi])


class LockGroups:
    """The locked tensors of a flat buffer as shape groups, cut into chunks for the step.

    Args:
        layout: ``(name, offset, numel, shape)`` of every locked tensor, in buffer order, with the
            tensors of one group contiguous (``FlatAdamW`` orders them so).
        bases: name -> (U, V).
        device: where the stacked bases live (the buffer's device).
        chunk_numel: the most elements one chunk copies (at least one tensor per chunk).
    """

    def __init__(self, layout: list[tuple[str, int, int, tuple[int, ...]]], bases: Bases, device,
                 chunk_numel: int = DEFAULT_CHUNK_NUMEL):
        groups: list[_Group] = []
        run: list[tuple[str, int, int, tuple[int, ...]]] = []

        def flush():
            if not run:
                return
            shape = run[0][3]
            m, n = shape[0], run[0][2] // shape[0]
            groups.append(_Group(run[0][1], len(run), m, n,
                                 _stack([bases[x[0]][0] for x in run], m, device),
                                 _stack([bases[x[0]][1] for x in run], n, device)))
            run.clear()

        for item in layout:
            if run and (group_key(item[3], bases[item[0]]) != group_key(run[0][3], bases[run[0][0]])
                        or item[1] != run[-1][1] + run[-1][2]):
                flush()
            run.append(item)
        flush()
        self.groups = groups
        self.end = groups[-1].start + groups[-1].numel if groups else 0
        self.chunks = self._chunks(max(1, int(chunk_numel)))

    def _chunks(self, limit: int) -> list[list[_Group]]:
        chunks: list[list[_Group]] = []
        cur: list[_Group] = []
        size = 0
        for g in self.groups:
            per = g.m * g.n
            lo = 0
            while lo < g.count:
                take = max(1, min(g.count - lo, (limit - size) // per))
                if cur and size + take * per > limit:
                    chunks.append(cur)
                    cur, size = [], 0
                    take = max(1, min(g.count - lo, limit // per))
                cur.append(g.slice(lo, lo + take))
                size += take * per
                lo += take
        if cur:
            chunks.append(cur)
        return chunks

    @staticmethod
    def span(chunk: list[_Group]) -> tuple[int, int]:
        return chunk[0].start, chunk[-1].start + chunk[-1].numel

    @staticmethod
    @torch.no_grad()
    def project_chunk_(chunk: list[_Group], flat: torch.Tensor, old: torch.Tensor) -> None:
        """``flat[span] = old + P(flat[span] - old)`` for one chunk of the whole buffer ``flat`` (``old``:
        the chunk's pre-step copy)."""
        base = chunk[0].start
        for g in chunk:
            a, b = g.start - base, g.start - base + g.numel
            new = flat[g.start:g.start + g.numel]
            d = new.sub_(old[a:b]).view(g.count, g.m, g.n)
            project_off_(d, g.out, g.inp)
            new.add_(old[a:b])


def register_lock_hooks(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, nn.Parameter]],
                        bases: Bases, *, mode: str = "update") -> list:
    """Enforce locks around ``optimizer.step()`` with step hooks; returns the hook handles.

    ``mode='update'``: project each step's update (the pre-hook copies the locked tensors).
    ``mode='whole'``: project the tensor itself after the step (LoRA factors, which start in the
    allowed space: ``B = 0``, ``A`` projected once here before training).
    """
    if mode not in ("update", "whole"):
        raise ValueError(f"mode must be 'update' or 'whole', got {mode!r}")
    params = dict(named)
    missing = sorted(set(bases) - set(params))
    if missing:
        raise ValueError(f"locked tensors not handed to the optimizer: {missing[:5]}")
    dev = {n: (None if u is None else u.to(params[n].device, torch.float32),
               None if v is None else v.to(params[n].device, torch.float32)) for n, (u, v) in bases.items()}
    saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _project(n: str, old: torch.Tensor | None) -> None:
        p = params[n]
        x = p.detach().float()
        d = as_matrix(x) if old is None else as_matrix(x - old)
        project_off_(d, *dev[n])
        p.copy_((d if old is None else d + as_matrix(old)).view_as(p))

    if mode == "whole":
        for n in dev:
            _project(n, None)

    def pre(_opt, _args, _kw):
        if mode == "update":
            for n in dev:
                saved[n] = params[n].detach().float().clone()

    def post(_opt, _args, _kw):
        for n in dev:
            _project(n, saved.pop(n, None) if mode == "update" else None)

    return [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
