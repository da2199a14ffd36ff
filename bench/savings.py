"""``bench/run.py savings`` and ``bench/run.py curves``: the engine's memory and speed options side by side.

* ``savings``: at 50% of parameters frozen (seeded random mask), full fine-tuning, naive freezing,
  the engine, and the engine with each option (updates in backward with no gradient buffer, bf16
  and 8-bit moments, all of them, regional ``torch.compile``), plus the frozen-prefix skip on a
  mask that freezes the down path. One interleaved run: every ratio is measured side by side.
* ``curves``: static memory, saved activations, the step's measured peak and step time against the frozen
  fraction (0-90%), one interleaved run per fraction (full re-measured in each, so every time
  ratio is side by side), and static memory against model size from the shape-only plan
  (``engine/train/memplan.py``, the meta device for the large presets). PNG plots and tables.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import conditions, conditions_markdown, markdown_table, write_results
from suite import DOWN_PATH, Scenario, run_suite

from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.train.memplan import memory_plan

MiB = 2**20
IB = "train.update_in_backward=true"
OPTIONS: dict[str, tuple[str, ...]] = {  # engine variants: name suffix -> config overrides
    "": (),
    "+inbackward": (IB,),
    "+bf16states": ("train.optimizer_states=bf16",),
    "+8bit": ("train.optimizer_states=8bit",),
    "+inbackward+8bit": (IB, "train.optimizer_states=8bit"),
}
COMPILE = ("+compile", ("train.compile=blocks",))

COLUMNS = [("scenario", "scenario"), ("frozen_params", "frozen params"), ("weights_mib", "weights MiB"),
           ("grads_mib", "grads MiB"), ("optimizer_mib", "optim MiB"), ("static_mib", "static MiB"),
           ("static_vs_full", "static/full"), ("activations_mib", "saved act MiB"), ("act_vs_full", "act/full"),
           ("peak_mib", "ledger peak MiB"), ("peak_vs_full", "ledger peak/full"),
           ("measured_peak_mib", "measured peak MiB"), ("measured_peak_vs_full", "measured peak/full"),
           ("measured_peak_vs_naive", "measured peak/naive"), ("step_ms_p50", "step ms (p50)"),
           ("time_vs_full", "time/full"), ("time_vs_naive", "time/naive")]

LEGEND = (
    "Columns: the exact ledger (`engine/train/ledger.py`) after backward and the update. *grads* = the "
    "step's gradients (full and naive: set_to_none, the engine: its step-scoped flat buffer), or with updates in "
    "backward the largest gradient alive at once; *static* = weights + grads + optimizer state; *saved act* = "
    "bytes autograd keeps for backward; *ledger peak* = the ledger's model of the step's peak (what outlives a "
    "step, the flat buffer's padding and 8-bit code tables included, plus the larger of saved activations and the "
    "gradients the step allocates); *measured peak* = the allocator's (`engine/train/peak.py`, second step): "
    "the storages the denoiser, optimizer and guard hold when the step starts + the most the step allocated above "
    "its start (CPU: torch.profiler memory events; CUDA: `max_memory_allocated` after `reset_peak_memory_stats`). "
    "*step ms* = median over the timed steps, every scenario interleaved "
    "step by step (read the ratios). `+inbackward`: each tensor stepped as soon as its gradient is complete "
    "(no gradient buffer; clipping by the previous step's norm); `+bf16states` / `+8bit`: AdamW moments in bf16 "
    "(stochastic rounding) / 8-bit blockwise; `+compile`: regional `torch.compile` of the UNet blocks; `@down`: "
    "the time embedding, conv_in and the whole down path frozen (the frozen prefix runs under no_grad; "
    "`-noprefix` turns that off).")


def savings_scenarios(compile_ok: bool = True) -> list[Scenario]:
    out = [Scenario("full", "full", 0.0), Scenario("naive@50%", "naive", 0.5)]
    out += [Scenario(f"engine{k}@50%", "engine", 0.5, options=v) for k, v in OPTIONS.items()]
    if compile_ok:
        out.append(Scenario(f"engine{COMPILE[0]}@50%", "engine", 0.5, options=COMPILE[1]))
    out += [Scenario("naive@down", "naive", DOWN_PATH), Scenario("engine@down", "engine", DOWN_PATH),
            Scenario("engine-noprefix@down", "engine", DOWN_PATH, options=("freeze.prefix_skip=false",))]
    return out


def savings_main(args) -> int:
    t0 = time.time()
    with_compile = torch.cuda.is_available() if args.compile is None else args.compile
    rows = run_suite(savings_scenarios(with_compile), args)
    cond = _conditions(args, t0, mask="seeded random, exact budget by parameters (50%); @down: the down path")
    md = "# bench/run.py savings\n\n" + markdown_table(rows, COLUMNS) + "\n\n" + LEGEND + "\n\n" + \
        conditions_markdown(cond)
    j, m = write_results(Path(args.out), "savings", {"suite": "savings", "conditions": cond, "rows": rows}, md)
    print(md)
    print(f"\nwritten: {j} and {m}")
    return _verified(rows)


CURVE_FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
CURVE_OPTIONS = ("", "+inbackward", "+8bit", "+inbackward+8bit")
SIZE_PRESETS = ("tiny", "small", "sd15", "sd21")


def size_rows(frozen: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
    """Static memory by model size at ``frozen`` (shape-only plan, meta device)."""
    rows = []
    for preset in SIZE_PRESETS:
        unet = build_unet(preset, device="meta")
        mask = FreezeMask.random(unet, frozen, by="params", seed=seed)
        full = memory_plan(unet, (), mode="full")
        setups = [("full", full), ("naive", memory_plan(unet, mask.frozen, mode="naive"))]
        for name in CURVE_OPTIONS:
            states = "8bit" if "8bit" in name else "fp32"
            setups.append((f"engine{name}", memory_plan(unet, mask.frozen, mode="engine", states=states,
                                                        in_backward="inbackward" in name)))
        for setup, plan in setups:
            rows.append({"preset": preset, "params": plan.params, "setup": setup,
                         "static_mib": plan.static_bytes / MiB,
                         "static_vs_full": plan.static_bytes / full.static_bytes})
    return rows


def curves_main(args) -> int:
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for f in CURVE_FRACTIONS:
        tag = f"@{int(round(f * 100))}%"
        sc = [Scenario("full", "full", 0.0)] + ([Scenario("naive" + tag, "naive", f)] if f else [])
        sc += [Scenario(f"engine{k}{tag}", "engine", f, options=OPTIONS[k]) for k in CURVE_OPTIONS]
        for r in run_suite(sc, args):
            if r["mode"] != "full" or f == 0.0:
                r["fraction"] = f
                rows.append(r)
    sizes = size_rows(seed=args.seed)
    cond = _conditions(args, t0, mask="seeded random, exact budget by parameters; one interleaved run per fraction")
    cols = [("scenario", "scenario")] + COLUMNS[1:]
    size_cols = [("preset", "preset"), ("params", "params"), ("setup", "setup"), ("static_mib", "static MiB"),
                 ("static_vs_full", "static/full")]
    pngs = plot_curves(rows, sizes, Path(args.out))
    md = ("# bench/run.py curves\n\n## Against the frozen fraction\n\n" + markdown_table(rows, cols) + "\n\n" + LEGEND
          + "\n\n## Static memory against model size (50% frozen, shape-only plan)\n\n"
          + markdown_table(sizes, size_cols)
          + "\n\nPlots: " + ", ".join(f"`{p.name}`" for p in pngs) + "\n\n" + conditions_markdown(cond))
    j, m = write_results(Path(args.out), "curves", {"suite": "curves", "conditions": cond, "rows": rows,
                                                    "sizes": sizes}, md)
    print(md)
    print(f"\nwritten: {j}, {m}, " + ", ".join(map(str, pngs)))
    return _verified(rows)


def plot_curves(rows: list[dict[str, Any]], sizes: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    setups = ["naive"] + [f"engine{k}" for k in CURVE_OPTIONS]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, key, label in zip(axes, ("static_vs_full", "act_vs_full", "measured_peak_vs_full", "time_vs_full"),
                              ("static memory / full", "saved activations / full", "measured peak / full",
                               "step time / full")):
        for s in setups:
            pts = sorted((r["fraction"], r[key]) for r in rows if r["scenario"].split("@")[0] == s and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("frozen fraction of parameters")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p1 = out / "curves_fraction.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in ["full", "naive"] + [f"engine{k}" for k in CURVE_OPTIONS]:
        pts = sorted((r["params"], r["static_mib"] / 1024) for r in sizes if r["setup"] == s)
        ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("UNet parameters (tiny, small, sd15, sd21)")
    ax.set_ylabel("static memory, GiB (50% frozen)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "curves_size.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def _conditions(args, t0: float, *, mask: str) -> dict[str, Any]:
    return conditions(preset=args.preset, resolution=args.resolution, batch=args.batch, autocast=args.dtype,
                      master_weights="fp32", mask=mask, timed_steps=args.steps, warmup_steps=args.warmup,
                      threads=args.threads, data=f"digits classes 0-{args.classes - 1}",
                      wall_s=round(time.time() - t0, 1))


def _verified(rows: list[dict[str, Any]]) -> int:
    bad = [r["scenario"] for r in rows if r["verify_ok"] is False]
    if bad:
        print(f"FROZEN TENSORS CHANGED in {bad}", file=sys.stderr)
        return 1
    return 0
