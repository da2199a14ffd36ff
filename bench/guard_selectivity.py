"""Why a guard holds or does not: how much of an *unguarded* user's update it would have blocked.

For each setting, one full fine-tune per domain at the service's caps (seed 0, no guard) on the
user's own illegal data and on the legal domain the publisher never saw. For each guard, the share
of each update's energy (squared norm) that falls where the guard forbids movement: in the frozen
tensors of a tensor mask, and along the locked directions of a lock (``sum ||U^T D||^2 + ||D V||^2``
over locked tensors, divided by the whole update's energy). A selective guard holds much of the
illegal update and little of the legal one; a random subspace of locked share ``s`` holds about
``s`` of each. Per kind of tensor too (``guard_summary.category``): where the illegal directions sit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def held_energy(guard, delta: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Share of ``delta``'s energy the guard blocks, overall and per kind of tensor."""
    from guard_summary import category
    from simusers import LockedGuard

    from freezeasguard.engine.guard.mask import FreezeMask

    mask = guard.mask if isinstance(guard, LockedGuard) else guard
    lock = guard.lock if isinstance(guard, LockedGuard) else None
    frozen = mask.frozen_set if isinstance(mask, FreezeMask) else frozenset()
    total, held = 0.0, 0.0
    kinds: dict[str, list[float]] = {}
    for n, d in delta.items():
        e = float(d.double().square().sum())
        h = e if n in frozen else (lock.locks[n].energy(d) if lock is not None and n in lock else 0.0)
        total += e
        held += h
        k = kinds.setdefault(category(n), [0.0, 0.0])
        k[0] += e
        k[1] += h
    return {"held": held / total if total else 0.0,
            "by_kind": {c: {"update_share": v[0] / total if total else 0.0, "held": v[1] / v[0] if v[0] else 0.0}
                        for c, v in sorted(kinds.items())}}


def selectivity(makers: dict, guards_by_setting: dict[str, list[tuple[str, Any]]], cache: Path,
                recipe: str) -> dict[str, Any]:
    """Per setting and guard: blocked share of the illegal and the legal unguarded update (cached)."""
    cache = Path(cache)
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got.get("recipe") == recipe:
            return got["result"]
    out: dict[str, Any] = {}
    for name, guards in guards_by_setting.items():
        deltas = makers[name].user_deltas(seed=0)
        rows = {}
        for label, guard in guards:
            ill, leg = held_energy(guard, deltas["illegal"]), held_energy(guard, deltas["legal"])
            rows[label] = {"illegal": ill, "legal": leg,
                           "ratio": leg["held"] / ill["held"] if ill["held"] else float("nan")}
        out[name] = rows
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"recipe": recipe, "result": out}))
    return out


def markdown(sel: dict[str, Any]) -> list[str]:
    if not sel:
        return []
    kinds = sorted({k for rows in sel.values() for r in rows.values() for k in r["illegal"]["by_kind"]})
    L = ["## Selectivity: how much of an unguarded user's update each guard would block", "",
         "One full fine-tune per domain at the caps (seed 0, no guard); the share of its update energy in frozen "
         "tensors or along locked directions. A selective guard blocks much of the illegal update and little of "
         "the legal one (legal / illegal well below 1); a random subspace blocks about its locked share of each.", ""]
    for name, rows in sel.items():
        L += [f"### Setting '{name}'", "", "| guard | illegal update blocked | legal update blocked | legal / illegal |",
              "|---|---|---|---|"]
        for label, r in rows.items():
            L.append(f"| {label} | {100 * r['illegal']['held']:.0f}% | {100 * r['legal']['held']:.0f}% | "
                     f"{r['ratio']:.2f} |")
        L.append("")
        lock = next((r for lb, r in rows.items() if lb.startswith("lock") and "one-shot" not in lb), None)
        if lock is not None:
            L += [f"Where the illegal update sits and what the headline lock blocks of it, by kind of tensor "
                  f"(setting '{name}'):", "", "| kind | share of the illegal update | blocked of it | share of the "
                  "legal update | blocked of it |", "|---|---|---|---|---|"]
            for k in kinds:
                a, b = lock["illegal"]["by_kind"].get(k), lock["legal"]["by_kind"].get(k)
                if a is None or b is None:
                    continue
                L.append(f"| {k} | {100 * a['update_share']:.0f}% | {100 * a['held']:.0f}% | "
                         f"{100 * b['update_share']:.0f}% | {100 * b['held']:.0f}% |")
            L.append("")
    return L
