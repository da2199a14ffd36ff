"""From run results to numbers: paired mitigation per seed, mean ± std, tables, curves, grids."""
from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch
from efficacy import Stat, mitigation, steps_to_reach

from freezeasguard.engine.io import atomic_write_bytes

METRICS = ("rate", "mean_prob", "heldout_loss")


def cond_key(job: dict[str, Any]) -> tuple:
    """What identifies a condition across seeds (everything but the seed and the domain)."""
    return (job["setting"], job["condition"], job["granularity"], job["by"], round(job["budget"], 4),
            job["lr"], job["method"], max(job["eval_at"]))


def at_step(run: dict[str, Any], step: int) -> dict[str, Any] | None:
    for c in run["curve"]:
        if c["step"] == step:
            return c
    return None


class Table:
    """Runs indexed by (setting, role, condition key, seed) for paired comparisons."""

    def __init__(self, runs: list[dict[str, Any]]):
        self.runs = runs
        self.index: dict[tuple, dict] = {}
        for r in runs:
            j = r["job"]
            self.index[(j["setting"], j["domain"], j["condition"], j["granularity"], j["by"],
                        round(j["budget"], 4), j["lr"], j["method"], j["seed"], max(j["eval_at"]))] = r

    def find(self, setting: str, domain: str, condition: str, *, granularity: str = "tensors", by: str = "params",
             budget: float = 0.0, lr: float, method: str = "full", seed: int, horizon: int | None = None) -> dict | None:
        want = (domain, condition, granularity, by, round(budget, 4), lr, method)
        hits = [r for k, r in self.index.items() if k[0] == setting and k[1:8] == want
                and k[8] == seed and (horizon is None or k[9] >= horizon)]
        if not hits and (condition == "full" or condition.startswith("random")):
            # full fine-tuning and random masks do not depend on the setting: run once, in the first
            hits = [r for k, r in self.index.items() if k[1:8] == want and k[8] == seed
                    and (horizon is None or k[9] >= horizon)]
        return min(hits, key=lambda r: max(r["job"]["eval_at"])) if hits else None


def full_ref(t: Table, setting: str, domain: str, lr: float, seed: int, step: int) -> dict | None:
    """The unguarded reference: full fine-tuning at the same lr, seed and step (either setting)."""
    for s in (setting, "same", "diff", "folder"):
        r = t.find(s, domain, "full", lr=lr, seed=seed, horizon=step)
        if r is not None and at_step(r, step) is not None:
            return at_step(r, step)
    return None


def compare(t: Table, setting: str, domains: dict[str, str], condition: str, seeds: Iterable[int], step: int, *,
            lr: float, ref_lr: float | None = None, ref_step: int | None = None, **kw) -> dict[str, Any]:
    """Guarded vs full fine-tuning on the illegal and the legal domain, paired by seed.

    Args:
        domains: {'illegal': domain, 'legal': domain}.
        ref_lr / ref_step: the reference full fine-tuning (default: same lr and step); an adaptive
            user is compared with the *service's* full fine-tuning.
    Returns:
        {'illegal': {metric: Stat}, 'legal': {...}, 'mitigation': Stat, 'legal_impact': Stat,
         'mitigation_prob': Stat, 'legal_impact_prob': Stat}
    """
    out: dict[str, Any] = {}
    ratios: dict[str, list[float]] = defaultdict(list)
    for role, dom in domains.items():
        vals: dict[str, list[float]] = defaultdict(list)
        for s in seeds:
            r = t.find(setting, dom, condition, lr=lr, seed=s, horizon=step, **kw)
            c = at_step(r, step) if r else None
            ref = full_ref(t, setting, dom, ref_lr or lr, s, ref_step or step)
            if c is None:
                continue
            for m in METRICS:
                vals[m].append(c[m])
            if r is not None and "trainable_params" in r["info"]:
                vals["trainable_params"].append(r["info"]["trainable_params"])
            if ref is not None:
                ratios[role].append(mitigation(c["rate"], ref["rate"]))
                ratios[role + "_prob"].append(mitigation(c["mean_prob"], ref["mean_prob"]))
                vals["full_rate"].append(ref["rate"])
        out[role] = {m: Stat.of(v) for m, v in vals.items()}
    out["mitigation"] = Stat.of(ratios["illegal"])
    out["legal_impact"] = Stat.of(ratios["legal"])
    out["mitigation_prob"] = Stat.of(ratios["illegal_prob"])
    out["legal_impact_prob"] = Stat.of(ratios["legal_prob"])
    return out


def curve_stats(t: Table, setting: str, domain: str, condition: str, seeds: Iterable[int], *, lr: float,
                **kw) -> list[dict[str, Any]]:
    """Per evaluated step: mean ± std of each metric over seeds."""
    per_step: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in seeds:
        r = t.find(setting, domain, condition, lr=lr, seed=s, **kw)
        if r is None:
            continue
        for c in r["curve"]:
            for m in METRICS:
                per_step[c["step"]][m].append(c[m])
    return [{"step": st, **{m: Stat.of(v) for m, v in ms.items()}} for st, ms in sorted(per_step.items())]


def steps_to_half(t: Table, setting: str, domain: str, condition: str, seeds: Iterable[int], *, lr: float,
                  level: float = 0.5, **kw) -> Stat:
    """Steps to reach ``level`` recognition, per seed (curve interpolated; runs that never reach
    it within their horizon are left out and counted in ``n``)."""
    vals = []
    for s in seeds:
        r = t.find(setting, domain, condition, lr=lr, seed=s, **kw)
        if r is None:
            continue
        v = steps_to_reach([(c["step"], c["rate"]) for c in r["curve"]], level)
        vals.append(v if v is not None else math.inf)
    finite = [v for v in vals if math.isfinite(v)]
    st = Stat.of(finite)
    st.values = vals  # inf = not reached within the horizon
    return st


# ------------------------------------------------------------------------------------ pictures
def plot_curves(panels: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per (setting, domain): recognition rate vs user steps, a line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for label, curve in p["lines"].items():
            if not curve:
                continue
            xs = [c["step"] for c in curve]
            ys = [c["rate"].mean for c in curve]
            es = [c["rate"].std for c in curve]
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=label)
        ax.axhline(0.5, color="gray", lw=0.6, ls=":")
        ax.set_xscale("log")
        ticks = sorted({c["step"] for curve in p["lines"].values() for c in curve})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(0, 1)
        ax.set_xlabel("user steps")
        ax.set_ylabel("recognition rate")
        ax.set_title(p["title"], fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def sample_grid(cells: list[list[tuple[str, torch.Tensor | None]]], row_labels: list[str], col_labels: list[str],
                path: Path, scale: int = 3) -> None:
    """A labelled grid: rows = conditions, columns = domains; each cell a tile of images."""
    from PIL import Image, ImageDraw

    tiles = [[_tile(img, scale) if img is not None else None for _, img in row] for row in cells]
    tw = max((t.width for row in tiles for t in row if t is not None), default=64)
    th = max((t.height for row in tiles for t in row if t is not None), default=64)
    left, top, pad = 150, 22, 6
    W = left + len(col_labels) * (tw + pad)
    H = top + len(row_labels) * (th + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(col_labels):
        d.text((left + j * (tw + pad), 4), c, fill=(0, 0, 0))
    for i, r in enumerate(row_labels):
        d.text((4, top + i * (th + pad) + th // 2 - 6), r, fill=(0, 0, 0))
        for j, t in enumerate(tiles[i]):
            if t is not None:
                canvas.paste(t, (left + j * (tw + pad), top + i * (th + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _tile(images: torch.Tensor, scale: int, cols: int = 8):
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = torch.zeros(3, rows * h, cols * w, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def jsonable(obj: Any) -> Any:
    """Stats and tensors to plain JSON values (inf/NaN become strings)."""
    if isinstance(obj, Stat):
        return {"mean": _num(obj.mean), "std": _num(obj.std), "n": obj.n, "values": [_num(v) for v in obj.values]}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, float):
        return _num(obj)
    return obj


def _num(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def write_results(res: dict[str, Any], summ: dict[str, Any], targets: dict[str, Any], md: str,
                  out: Path) -> list[Path]:
    """guard.json (every number, its conditions, every run without its images) and guard.md."""
    from common import conditions

    from freezeasguard.engine.io import atomic_write_json, atomic_write_text

    runs = [{k: v for k, v in r.items() if k != "images"} for r in res["runs"]]
    base = {**res["base"], "eval": {d: {k: v for k, v in e.items() if k != "images"}
                                    for d, e in res["base"]["eval"].items()}}
    payload = {**{k: v for k, v in res.items() if k not in ("runs", "base")}, "base": base,
               "conditions": conditions(suite=res["suite"], workers=res.get("workers"), threads=res.get("threads")),
               "summary": summ, "targets": targets, "runs": runs}
    return [atomic_write_json(out / "guard.json", jsonable(payload)), atomic_write_text(out / "guard.md", md)]
