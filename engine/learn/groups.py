"""The units a learned mask decides on: one logit each, one soft mask value each.

By default a unit is a whole parameter tensor (what a manifest freezes). A learner may decide on
finer units (e.g. output rows) as long as each one is a contiguous run of rows of the flat
buffers' ``[rows, chunk]`` view inside one tensor: its keep factor then broadcasts from a per-row
table and its mask gradient is a segment sum over its rows, exactly as for a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from freezeasguard.engine.learn.flat import FlatLayout


@dataclass(frozen=True)
class MaskGroups:
    """Decision units in flat order.

    ``rows``: rows of the ``[rows, chunk]`` view in each unit (int64, summing to the view's rows:
    the segment lengths of the per-unit dot products). ``numels``: parameters in each unit (float64,
    what a budget by parameters counts). ``owner``: the flat-order index of each unit's tensor.
    """

    rows: torch.Tensor
    numels: torch.Tensor
    owner: tuple[int, ...]

    @classmethod
    def per_tensor(cls, layout: FlatLayout, device: torch.device | str = "cpu") -> "MaskGroups":
        """One unit per tensor (the learner's default)."""
        return cls(layout.rows_per_tensor(device), torch.tensor(layout.numels, dtype=torch.float64, device=device),
                   tuple(range(len(layout))))

    def __len__(self) -> int:
        return len(self.owner)

    def row_group(self) -> torch.Tensor:
        """The unit of every row of the flat view, [rows] int64."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.rows.device), self.rows)

    def budget_weights(self, by: str) -> torch.Tensor:
        """Each unit's share of the budget (fp32, summing to 1): by its parameters for ``'params'``,
        else every unit alike."""
        w = self.numels if by == "params" else torch.ones(len(self), dtype=torch.float64, device=self.numels.device)
        return (w / w.sum()).float()
