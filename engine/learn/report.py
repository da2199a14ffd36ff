"""Where a mask's frozen tensors sit in a denoiser, and how much two masks agree.

Tensors are grouped by *block* and by *kind*. Blocks: a UNet's ``down_blocks.i``, ``mid_block``,
``up_blocks.i``; a diffusion transformer's ``transformer_blocks.i`` (SD3's MMDiT blocks, Flux's
double-stream ones) and ``single_transformer_blocks.i`` (Flux); every other top-level module
(``conv_in``, ``time_embedding``, ``x_embedder``, ``time_text_embed``, ``norm_out``, ...) is its own
block. Kinds:

    norm         any normalisation layer's own weights (GroupNorm/LayerNorm/RMSNorm)
    attention    UNet: everything else inside a transformer (q/k/v/out, proj_in/out, ff);
                 DiT: the attention's projections (``attn.to_q``, ``attn.add_q_proj``, ...)
    feedforward  DiT: the MLPs (``ff``, ``ff_context``, Flux's ``proj_mlp`` and single-block ``proj_out``)
    modulation   DiT: the adaptive norms' projections (``norm1.linear``, ``norm_out.linear``, ...)
    embedding    DiT: the input embedders (``pos_embed``, ``x_embedder``, ``time_text_embed``,
                 ``context_embedder``)
    resnet       UNet: convolutions and the time projection of resnet blocks
    sampler      UNet: down/up-sampling convolutions
    other        UNet: conv_in, conv_out, time embedding; DiT: proj_out; anything unrecognised

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

KINDS = ("attention", "feedforward", "modulation", "embedding", "resnet", "norm", "sampler", "other")
_BLOCK = re.compile(r"^((?:down_blocks|up_blocks|transformer_blocks|single_transformer_blocks)\.\d+|mid_block)\.")
# Top-level modules of the diffusion transformers (SD3, Flux): their blocks, and their input embedders.
DIT_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
DIT_EMBEDDERS = ("pos_embed", "x_embedder", "time_text_embed", "context_embedder")
_DIT_HEADS = (*DIT_BLOCKS, *DIT_EMBEDDERS, "norm_out", "proj_out")
_DIT_FF = ("ff", "ff_context", "proj_mlp")


def tensor_block(name: str) -> str:
    m = _BLOCK.match(name)
    return m.group(1) if m else name.split(".", 1)[0]


def tensor_kind(name: str) -> str:
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else parts[0]
    if "norm" in module:
        return "norm"
    if parts[0] in _DIT_HEADS:  # no UNet has these top-level modules
        return _dit_kind(parts)
    if ".attentions." in name or ".attn" in name:
        return "attention"
    if ".resnets." in name:
        return "resnet"
    if "samplers." in name:
        return "sampler"
    return "other"


def _dit_kind(parts: list[str]) -> str:
    head = parts[0]
    if head in DIT_EMBEDDERS:
        return "embedding"
    if parts[-2] == "linear" and any(p.startswith("norm") for p in parts[:-2]):
        return "modulation"  # AdaLayerNormZero / AdaLayerNormContinuous: norm1.linear, norm_out.linear
    inner = parts[2] if head in DIT_BLOCKS and len(parts) > 3 else ""
    if inner.startswith("attn"):
        return "attention"
    if inner in _DIT_FF or (head == "single_transformer_blocks" and inner == "proj_out"):
        return "feedforward"
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
    # Data-flow order of the denoiser (diffusers registers a UNet's mid_block after up_blocks).
    head = block.split(".", 1)[0]
    return _RANKS.get(head, 7)


_RANKS = {"conv_in": 0, "pos_embed": 0, "x_embedder": 0, "time_embedding": 1, "add_embedding": 1,
          "class_embedding": 1, "time_text_embed": 1, "context_embedder": 1, "down_blocks": 2,
          "transformer_blocks": 2, "mid_block": 3, "single_transformer_blocks": 3, "up_blocks": 4,
          "conv_norm_out": 5, "norm_out": 5, "conv_out": 6, "proj_out": 6}


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
