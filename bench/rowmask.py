"""Finer freeze masks: one decision per output row (channel) of every weight, and a learner for them.

A whole-tensor mask shares every decision among all domains: a conv kernel serves every class.
A *row mask* decides per output channel: row ``r`` of a weight of shape ``[out, ...]`` (a conv's
output channel, a linear layer's output feature) is one group; a 1-D tensor (bias, norm) is one
group as a whole. The budget is exact, counted by parameters (or by groups), with the same
greedy top-k fill as ``FreezeMask``.

A row mask cannot be enforced by leaving tensors out of the optimizer; it needs *masked
parameter updates* (``bench/simusers.py``: gradients of frozen rows zeroed before clipping, the
rows restored bit-exactly after every step), and a LoRA adapter is allowed only on a module none
of whose rows is frozen.

``RowMaskLearner`` is ``MaskLearner`` with one logit per group instead of per tensor: the same
bilevel loop (simulated AdamW user, first-order mask gradient ``<theta_d_g, dL/dtheta_g>``), over
a flat layout without padding (``chunk=1``), groups being contiguous element ranges of it.
"""
from __future__ import annotations

import json
import math
import os
import random as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from freezeasguard.engine.errors import MaskError, MaskLearnError
from freezeasguard.engine.guard.mask import FreezeMask, param_budget
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.learn.flat import FlatLayout
from freezeasguard.engine.learn.groups import MaskGroups
from freezeasguard.engine.learn.learner import MaskLearner

Shapes = Mapping[str, Sequence[int]]


def groups_of(shape: Sequence[int]) -> int:
    """Number of groups of a tensor: its rows when it has >= 2 dims, else 1."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _shapes(model: nn.Module | Shapes) -> dict[str, tuple[int, ...]]:
    if isinstance(model, nn.Module):
        return {n: tuple(p.shape) for n, p in model.named_parameters()}
    return {n: tuple(int(d) for d in s) for n, s in model.items()}


@dataclass(frozen=True, eq=False)
class RowMask:
    """Frozen groups of every tensor of one model, keyed by tensor name.

    ``rows[name]`` is a bool tensor with one entry per group of that tensor (True = frozen).
    """

    shapes: dict[str, tuple[int, ...]]
    rows: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if set(self.shapes) != set(self.rows):
            raise MaskError("row mask: names of shapes and rows differ")
        for n, s in self.shapes.items():
            r = self.rows[n]
            if r.dtype != torch.bool or tuple(r.shape) != (groups_of(s),):
                raise MaskError(f"row mask: {n!r} needs a bool tensor of {groups_of(s)} entries, "
                                f"got {r.dtype} {tuple(r.shape)}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_scores(cls, model: nn.Module | Shapes, scores: Mapping[str, torch.Tensor], ratio: float,
                    by: str = "params") -> "RowMask":
        """Exact top-k over group scores (higher = frozen first; ties by name, then row).

        ``by='params'`` fills greedily up to ``floor(ratio * total params)`` (a group that does not
        fit is skipped, smaller ones fill the rest); ``by='groups'`` takes ``round(ratio * groups)``.
        """
        shapes = _shapes(model)
        if not 0.0 <= ratio <= 1.0:
            raise MaskError(f"freeze ratio must be in [0, 1], got {ratio}")
        if by not in ("params", "groups"):
            raise MaskError(f"row budgets count 'params' or 'groups', got {by!r}")
        entries = []
        for n, s in shapes.items():
            sc = torch.as_tensor(scores[n]).detach().double().flatten().cpu()
            if sc.numel() != groups_of(s):
                raise MaskError(f"{n!r}: {sc.numel()} scores for {groups_of(s)} groups")
            if not bool(torch.isfinite(sc).all()):
                raise MaskError(f"{n!r}: non-finite group score")
            size = math.prod(s) // groups_of(s)
            entries += [(-float(v), n, r, size) for r, v in enumerate(sc.tolist())]
        entries.sort()
        rows = {n: torch.zeros(groups_of(s), dtype=torch.bool) for n, s in shapes.items()}
        if by == "groups":
            for _, n, r, _ in entries[:round(ratio * len(entries))]:
                rows[n][r] = True
        else:
            room = param_budget(ratio, sum(math.prod(s) for s in shapes.values()))
            for _, n, r, size in entries:
                if size <= room:
                    rows[n][r] = True
                    room -= size
        return cls(shapes, rows)

    @classmethod
    def random(cls, model: nn.Module | Shapes, ratio: float, by: str = "params", seed: int = 0) -> "RowMask":
        """Seeded random groups (a permutation over sorted (name, row)), exact budget."""
        shapes = _shapes(model)
        keys = sorted((n, r) for n, s in shapes.items() for r in range(groups_of(s)))
        _random.Random(seed).shuffle(keys)
        prio = {k: float(len(keys) - i) for i, k in enumerate(keys)}
        scores = {n: torch.tensor([prio[(n, r)] for r in range(groups_of(s))]) for n, s in shapes.items()}
        return cls.from_scores(shapes, scores, ratio, by)

    @classmethod
    def from_tensor_mask(cls, mask: FreezeMask, model: nn.Module | Shapes) -> "RowMask":
        """Every group of each frozen tensor frozen: a tensor mask as a row mask."""
        shapes = _shapes(model)
        return cls(shapes, {n: torch.full((groups_of(s),), n in mask.frozen_set) for n, s in shapes.items()})

    # ------------------------------------------------------------------ queries
    def element_mask(self, name: str) -> torch.Tensor:
        """Bool tensor shaped like the parameter: True where frozen."""
        s, r = self.shapes[name], self.rows[name]
        if len(s) >= 2:
            return r.view(-1, *([1] * (len(s) - 1))).expand(s)
        return r.expand(s)

    def tensor_mask(self) -> FreezeMask:
        """The tensors frozen as a whole (what a per-tensor service could enforce of this mask)."""
        names = [n for n, r in self.rows.items() if bool(r.all())]
        return FreezeMask.from_names(dict(self.shapes), names)

    def touched(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` with at least one frozen group."""
        return [n for n in names if bool(self.rows[n].any())]

    def stats(self) -> dict[str, Any]:
        total = sum(math.prod(s) for s in self.shapes.values())
        frozen = sum(int(self.rows[n].sum()) * (math.prod(s) // groups_of(s)) for n, s in self.shapes.items())
        n_groups = sum(groups_of(s) for s in self.shapes.values())
        return {"params": {"frozen": frozen, "total": total, "ratio": frozen / total},
                "groups": {"frozen": int(sum(int(r.sum()) for r in self.rows.values())), "total": n_groups},
                "tensors": {"whole": sum(bool(r.all()) for r in self.rows.values()),
                            "partial": sum(bool(r.any()) and not bool(r.all()) for r in self.rows.values()),
                            "total": len(self.rows)}}

    def summary(self) -> str:
        s = self.stats()
        return (f"frozen {s['params']['frozen']:,}/{s['params']['total']:,} params ({s['params']['ratio']:.1%}) "
                f"in {s['groups']['frozen']}/{s['groups']['total']} rows; {s['tensors']['whole']} whole and "
                f"{s['tensors']['partial']} partial tensors of {s['tensors']['total']}")

    def __repr__(self) -> str:
        return f"RowMask({self.summary()})"

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"granularity": "rows", "counts": self.stats(),
                "frozen_rows": {n: torch.nonzero(r).flatten().tolist() for n, r in self.rows.items() if bool(r.any())},
                "shapes": {n: list(s) for n, s in self.shapes.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RowMask":
        obj = json.loads(Path(path).read_text())
        shapes = {n: tuple(s) for n, s in obj["shapes"].items()}
        rows = {n: torch.zeros(groups_of(s), dtype=torch.bool) for n, s in shapes.items()}
        for n, idx in obj["frozen_rows"].items():
            rows[n][torch.tensor(idx, dtype=torch.long)] = True
        return cls(shapes, rows)


# ---------------------------------------------------------------------------------- the learner
def row_groups(layout: FlatLayout, device: torch.device | str = "cpu") -> MaskGroups:
    """One decision unit per group (row) of every tensor, over a layout without padding: a row of
    a row-major tensor is a contiguous element range, i.e. a run of rows of the chunk-1 view."""
    if layout.chunk != 1:
        raise MaskLearnError("row groups need chunk=1 (groups are element ranges of the flat buffers)")
    sizes, owner = [], []
    for i, (shape, k) in enumerate(zip(layout.shapes, layout.numels)):
        g = groups_of(shape)
        sizes += [k // g] * g
        owner += [i] * g
    rows = torch.tensor(sizes, dtype=torch.long, device=device)
    return MaskGroups(rows, rows.double(), tuple(owner))


class RowMaskLearner(MaskLearner):
    """The bilevel mask learner with one logit per group (row) instead of per tensor.

    Needs ``cfg.chunk == 1`` (no padding: a group is a contiguous element range of the flat
    buffers, rows being contiguous in row-major storage). The flat update is the parent's over
    ``row_groups``, with a per-element keep factor; the mask gradient is one dot product per group.
    """

    def __init__(self, model: nn.Module, task, domains, cfg, **kw):
        if cfg.chunk != 1:
            raise MaskLearnError("RowMaskLearner needs chunk=1 (groups are element ranges of the flat buffers)")
        super().__init__(model, task, domains, cfg, groups=row_groups, **kw)

    def reduced_dots(self) -> torch.Tensor:
        """Per-group ``<theta_d_g, grad_g>`` in fp64 (elementwise product, then segment sums)."""
        prod = (self.theta_d.double() * self.grad.double())
        return self.all_reduce(torch.segment_reduce(prod, "sum", lengths=self.groups.rows))

    def group_scores(self) -> dict[str, torch.Tensor]:
        """Logits per tensor (one per group), in model order."""
        x = self.logits.detach().cpu()
        out: dict[str, list[float]] = {n: [] for n in self.layout.names}
        for g, i in enumerate(self.groups.owner):
            out[self.layout.names[i]].append(float(x[g]))
        return {n: torch.tensor(out[n]) for n in self.layout.model_names}

    def export_rows(self, budget: float | None = None, by: str | None = None) -> RowMask:
        """The hard row mask with an exact budget (top-k over the group logits)."""
        mo = self.cfg.mask
        by = by or mo.budget_by
        shapes = {n: tuple(s.shape) for n, s in self.base_state().items()}
        return RowMask.from_scores(shapes, self.group_scores(), mo.budget if budget is None else budget,
                                   "groups" if by == "tensors" else by)

    def export_mask(self, budget: float | None = None, by: str | None = None) -> FreezeMask:
        raise MaskLearnError("a row-mask learner exports row masks: use export_rows()")
