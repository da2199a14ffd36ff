"""Optimizer parameter groups: weight decay on matrices and kernels, never on biases and norms."""
from __future__ import annotations

from torch import nn


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices/kernels (dim >= 2); never biases and norm weights."""
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def describe_groups(groups: list[dict]) -> str:
    """One line: tensors and parameters of each group (what the optimizer really holds)."""
    rows = [f"{g.get('name', i)}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} params"
            for i, g in enumerate(groups)]
    return "optimizer groups: " + "; ".join(rows)
