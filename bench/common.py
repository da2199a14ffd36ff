"""Shared pieces of the benchmarks: conditions, timing statistics, result writing."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from freezeasguard.engine.io import atomic_write_json, atomic_write_text


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        # results already written into bench/results/ by an earlier suite of the same run are not
        # code: they do not make the tree dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)bench/results"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RESULTS = Path(__file__).resolve().parent / "results"
ALLOW_DIRTY = "FREEZEASGUARD_BENCH_ALLOW_DIRTY"


def refuse_dirty_results(out_dir: str | os.PathLike) -> None:
    """Refuse to write into ``bench/results/`` from a tree with uncommitted changes.

    Committed results name the commit that made them (``conditions()['commit']``); from a dirty tree
    that commit is not the code that ran. Called before a suite starts (so no run is wasted) and
    again by the writers. ``FREEZEASGUARD_BENCH_ALLOW_DIRTY=1`` overrides it (the results then say
    ``+dirty``); results written anywhere else are never refused."""
    out = Path(out_dir).resolve()
    if out != RESULTS and RESULTS not in out.parents:
        return
    if os.environ.get(ALLOW_DIRTY) == "1" or not git_commit().endswith("+dirty"):
        return
    raise SystemExit(f"refusing to write results into {out}: the working tree has uncommitted changes, so the "
                     f"results could not name the code that made them; commit first, write elsewhere (--out), "
                     f"or set {ALLOW_DIRTY}=1")


def conditions(**extra: Any) -> dict[str, Any]:
    """Where and with what a number was measured."""
    import diffusers

    from freezeasguard.engine.backends import all_backends
    from freezeasguard.engine.version import __version__

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    out = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "freezeasguard": __version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backends": {b.name: (b.version if b.available else f"unusable: {b.reason}") for b in all_backends()},
    }
    out.update(extra)
    return out


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    """p20/p50/p80 of a sample (the median is what the tables show)."""
    s = sorted(xs)
    if not s:
        return {"p20": float("nan"), "p50": float("nan"), "p80": float("nan")}
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"p20": q[1], "p50": statistics.median(s), "p80": q[7]}


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header). Floats are printed with 3 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(out_dir: Path, suite: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    refuse_dirty_results(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = atomic_write_json(out_dir / f"{suite}.json", payload)
    m = atomic_write_text(out_dir / f"{suite}.md", markdown + "\n")
    return j, m


def conditions_markdown(cond: dict[str, Any]) -> str:
    lines = [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in cond.items()]
    return "Conditions:\n" + "\n".join(lines)
