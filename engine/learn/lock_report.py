"""Where a direction lock sits in a denoiser (locked share of each block's and each kind's matrix
parameters) and what each learning round captured, as text, JSON and a PNG."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from freezeasguard.engine.guard.subspace import SubspaceLock
from freezeasguard.engine.io import atomic_write_bytes
from freezeasguard.engine.learn.report import KINDS, block_rank, tensor_block, tensor_kind


def lock_groups(lock: SubspaceLock, unet: nn.Module, by: str = "block") -> list[dict[str, Any]]:
    """Per block (or kind): matrix parameters, locked dof and their ratio, in model order."""
    key = tensor_block if by == "block" else tensor_kind
    rows: dict[str, dict[str, Any]] = {}
    for n, p in unet.named_parameters():
        if p.dim() < 2:
            continue
        g = rows.setdefault(key(n), {"group": key(n), "matrix_params": 0, "locked_dof": 0, "tensors": 0,
                                     "locked_tensors": 0})
        g["matrix_params"] += p.numel()
        g["tensors"] += 1
        if n in lock:
            g["locked_dof"] += lock.locks[n].dof
            g["locked_tensors"] += 1
    out = list(rows.values())
    if by == "block":
        out.sort(key=lambda r: block_rank(r["group"]))
    else:
        out.sort(key=lambda r: KINDS.index(r["group"]) if r["group"] in KINDS else len(KINDS))
    for r in out:
        r["ratio"] = r["locked_dof"] / r["matrix_params"] if r["matrix_params"] else 0.0
    return out


def lock_report(lock: SubspaceLock, unet: nn.Module, rounds: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"counts": lock.counts(unet), "by_block": lock_groups(lock, unet, "block"),
            "by_kind": lock_groups(lock, unet, "kind"), "rounds": list(rounds)}


def format_lock_report(rep: dict[str, Any]) -> str:
    c = rep["counts"]
    lines = [f"lock: {c['tensors']} tensors, {c['dof']:,} locked degrees of freedom = "
             f"{100 * c['matrix_ratio']:.1f}% of the matrix parameters ({100 * c['ratio']:.1f}% of all)"]
    for by in ("by_block", "by_kind"):
        lines.append(f"  {by.replace('_', ' ')}: " + ", ".join(
            f"{r['group']} {100 * r['ratio']:.0f}%" for r in rep[by]))
    for r in rep["rounds"]:
        inn = r.get("innocent_energy_captured")
        lines.append(f"  round {r['round']}: captured {100 * r['illegal_energy_captured']:.0f}% of the illegal "
                     f"update energy" + ("" if inn is None else f", {100 * inn:.0f}% of the innocent")
                     + f"; {100 * r['locked_matrix_share']:.0f}% of matrix parameters locked")
    return "\n".join(lines)


def lock_figure(rep: dict[str, Any]) -> Figure:
    """Locked share by block and by kind, and energy captured per round."""
    # Groups are listed down the y axis, one row each, and the figure grows with their number:
    # names under a bar chart's x axis collide as soon as blocks are many or their names long.
    n = max([len(rep[by]) for by in ("by_block", "by_kind")] + [1])
    fig = Figure(figsize=(14, max(4.0, 1.5 + 0.28 * n)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, by in zip(axes[:2], ("by_block", "by_kind")):
        rows = rep[by]
        ax.barh(range(len(rows)), [100 * r["ratio"] for r in rows], color="#4a6fa5")
        ax.set_yticks(range(len(rows)), [r["group"] for r in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # model order, top to bottom
        ax.set_xlabel("locked share of matrix params (%)")
        ax.set_title(f"where the lock sits ({by.split('_')[1]})")
    ax = axes[2]
    rounds = rep["rounds"]
    if rounds:
        x = [r["round"] for r in rounds]
        ax.plot(x, [100 * r["illegal_energy_captured"] for r in rounds], "o-", label="illegal update")
        inn = [r.get("innocent_energy_captured") for r in rounds]
        if any(v is not None for v in inn):
            ax.plot([a for a, v in zip(x, inn) if v is not None], [100 * v for v in inn if v is not None], "s--",
                    label="innocent update")
        ax.set_xticks(x)
        ax.legend(fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("energy in the round's new directions (%)")
    ax.set_title("energy captured per round")
    fig.tight_layout()
    return fig


def plot_lock(rep: dict[str, Any], path: str | Path) -> Path:
    """``lock_figure`` as a PNG, written atomically."""
    fig = lock_figure(rep)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())
