"""Where a mask's frozen tensors sit in a UNet, and how much two masks agree.

Tensors are grouped by *block* (``down_blocks.i``, ``mid_block``, ``up_blocks.i``, and the
top-level modules ``conv_in``, ``time_embedding``, ``conv_norm_out``, ``conv_out``) and by *kind*:

    norm       any normalisation layer (GroupNorm/LayerNorm weights and biases)
    attention  everything else inside a transformer (q/k/v/out projections, proj_in/out, ff)
    resnet     convolutions and the time projection of resnet blocks
    sampler    down/up-sampling convolutions
    other      conv_in, conv_out, time embedding, anything unrecognised

Counts are given by tensors and by parameters (a budget by one can be far from the other).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from freezeasguard.engine.errors import MaskError
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.io import atomic_write_bytes

KINDS = ("attention", "resnet", "norm", "sampler", "other")
_BLOCK = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.")


def tensor_block(name: str) -> str:
    m = _BLOCK.match(name)
    return m.group(1) if m else name.split(".", 1)[0]


def tensor_kind(name: str) -> str:
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else parts[0]
    if "norm" in module:
        return "norm"
    if ".attentions." in name or ".attn" in name:
        return "attention"
    if ".resnets." in name:
        return "resnet"
    if "samplers." in name:
        return "sampler"
    return "other"


@dataclass(frozen=True)
class GroupCount:
    group: str
    frozen_tensors: int
    tensors: int
    frozen_params: int
    params: int

    @property
    def param_ratio(self) -> float:
        return self.frozen_params / self.params if self.params else 0.0

    @property
    def tensor_ratio(self) -> float:
        return self.frozen_tensors / self.tensors if self.tensors else 0.0


def block_rank(block: str) -> int:
    # Data-flow order of the UNet (diffusers registers mid_block after up_blocks).
    head = block.split(".", 1)[0]
    ranks = {"conv_in": 0, "time_embedding": 1, "add_embedding": 1, "down_blocks": 2, "mid_block": 3,
             "up_blocks": 4, "conv_norm_out": 5, "conv_out": 6}
    return ranks.get(head, 7)


def group_counts(mask: FreezeMask, by: str = "block") -> list[GroupCount]:
    """Frozen/total tensors and parameters per block (input-to-output order) or per kind."""
    if by not in ("block", "kind"):
        raise ValueError(f"group by 'block' or 'kind', got {by!r}")
    key = tensor_block if by == "block" else tensor_kind
    order: dict[str, list[int]] = {k: [0, 0, 0, 0] for k in ([] if by == "block" else KINDS)}
    for n, k in zip(mask.names, mask.numels):
        row = order.setdefault(key(n), [0, 0, 0, 0])
        f = n in mask.frozen_set
        row[0] += f
        row[1] += 1
        row[2] += k if f else 0
        row[3] += k
    rows = [GroupCount(g, *r) for g, r in order.items() if r[1]]
    return sorted(rows, key=lambda r: block_rank(r.group)) if by == "block" else rows


def jaccard(a: FreezeMask, b: FreezeMask) -> dict[str, float]:
    """Overlap of two masks' frozen sets: by tensors, and weighted by parameters."""
    if dict(zip(a.names, a.numels)) != dict(zip(b.names, b.numels)):
        raise MaskError("the two masks are over different tensors (not the same model)")
    size = dict(zip(a.names, a.numels))
    inter, union = a.frozen_set & b.frozen_set, a.frozen_set | b.frozen_set
    p_union = sum(size[n] for n in union)
    return {"tensors": len(inter) / len(union) if union else 1.0,
            "params": sum(size[n] for n in inter) / p_union if p_union else 1.0}


def format_report(mask: FreezeMask, title: str = "mask") -> str:
    """A plain-text table per block and per kind, with both ratios."""
    lines = [f"{title}: {mask.summary()}"]
    for by in ("block", "kind"):
        rows = group_counts(mask, by)
        w = max(len(r.group) for r in rows)
        lines.append(f"  {by:<{w}}  tensors frozen      params frozen")
        for r in rows:
            lines.append(f"  {r.group:<{w}}  {r.frozen_tensors:>4}/{r.tensors:<4} {r.tensor_ratio:6.1%}  "
                         f"{r.frozen_params:>11,}/{r.params:<11,} {r.param_ratio:6.1%}")
    return "\n".join(lines)


def plot_masks(masks: dict[str, FreezeMask], path: str | Path) -> Path:
    """PNG: frozen share of parameters per block and per kind, and a strip of every tensor
    (model order, frozen = dark) per mask. Written atomically."""
    labels = list(masks)
    # The object-oriented API (no pyplot): a library must not switch the caller's backend.
    fig = Figure(figsize=(11, 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, gridspec_kw={"height_ratios": [3, 2, 1.2]})
    for ax, by in zip(axes[:2], ("block", "kind")):
        groups = [r.group for r in group_counts(next(iter(masks.values())), by)]
        x = np.arange(len(groups))
        width = 0.8 / len(labels)
        for i, lab in enumerate(labels):
            ratio = {r.group: r.param_ratio for r in group_counts(masks[lab], by)}
            ax.bar(x + i * width - 0.4 + width / 2, [ratio.get(g, 0.0) for g in groups], width, label=lab)
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("params frozen")
        ax.set_title(f"frozen share of parameters per {by}")
    axes[0].legend(fontsize=8)
    names = next(iter(masks.values())).names
    strip = np.array([[n in m.frozen_set for n in names] for m in masks.values()], dtype=float)
    axes[2].imshow(strip, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[2].set_xlabel("tensor index (model order); dark = frozen")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())
