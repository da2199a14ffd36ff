"""``bench/run.py plan``: the memory plan of fine-tuning a 12B transformer with half of it frozen.

The shape-only plan (``engine/train/memplan.py``, checked byte for byte against the live ledger of
real setups in tests/test_memplan.py) of the FLUX.1 [dev] transformer (preset ``flux``: 11,901,408,320
parameters in 1,160 tensors), built on the ``meta`` device, with a seeded random 50% of its
parameters frozen (``FreezeMask.random(by="params")``: whole tensors, exact budget by parameter
count): full fine-tuning (torch AdamW, fp32), naive freezing, the engine (bf16 frozen storage, fp32
master weights and moments), the engine with bf16 / 8-bit moments and with updates in backward; one
device, and the busiest process under FSDP2 (``MemoryPlan.per_device``: its shards, plus what FSDP2
holds gathered for a moment). SDXL, SD3-medium and SD1.5 at the same fraction for context.

    python bench/run.py plan                                  # -> bench/results/plan/plan.{md,json,png}
    python bench/run.py plan --presets flux --devices 1,2,4,8 --frozen 0.3 --seed 1 --out /tmp/plan
    python bench/run.py plan --help

Activations, the CUDA context and allocator fragmentation are not counted (see the conditions).
Nothing is allocated: a run takes seconds on any machine.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import conditions, conditions_markdown, markdown_table, refuse_dirty_results, write_results

from freezeasguard.engine.config import resolve
from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.presets import build_unet, get_preset, param_summary
from freezeasguard.engine.train.memplan import MemoryPlan, memory_plan

GiB = 2**30
GB = 10**9
# FLUX.1 [dev]'s published transformer: the preset must build exactly this
FLUX_TENSORS, FLUX_PARAMS = 1_160, 11_901_408_320
# device memory as marketed (decimal GB), lower than what the cards report (H200: 143,771 MiB)
CAPACITIES = {"h200": ("141 GB H200", 141 * GB), "80gb": ("80 GB", 80 * GB)}
ENGINE = ("freeze.mode=engine", "freeze.ratio=0.5")
SETUPS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [  # name, memory_plan options, config overrides
    ("full", {"mode": "full"}, ("freeze.mode=full",)),
    ("naive", {"mode": "naive"}, ("freeze.mode=naive", "freeze.ratio=0.5")),
    ("engine", {"mode": "engine"}, ENGINE),
    ("engine+bf16", {"mode": "engine", "states": "bf16"}, (*ENGINE, "train.optimizer_states=bf16")),
    ("engine+8bit", {"mode": "engine", "states": "8bit"}, (*ENGINE, "train.optimizer_states=8bit")),
    ("engine+in-backward", {"mode": "engine", "in_backward": True}, (*ENGINE, "train.update_in_backward=true")),
    ("engine+8bit+in-backward", {"mode": "engine", "states": "8bit", "in_backward": True},
     (*ENGINE, "train.optimizer_states=8bit", "train.update_in_backward=true")),
]
DEFAULT_PRESETS = ("flux", "sdxl", "sd3", "sd15")


def fsdp_refusal(overrides: tuple[str, ...]) -> str:
    """'' where the trainer's config accepts the setup with ``train.parallel=fsdp``, else why not."""
    try:
        resolve(overrides=[*overrides, "train.parallel=fsdp", "train.mixed_precision=bf16"])
    except ConfigError as exc:
        lines = [x.strip() for x in str(exc).splitlines()[1:] if x.strip()]
        return "; ".join(lines) or str(exc)
    return ""


def _fits(nbytes: int) -> dict[str, bool]:
    return {f"fits_{k}": nbytes <= cap for k, (_, cap) in CAPACITIES.items()}


def plan_preset(preset: str, frozen: float = 0.5, seed: int = 0, devices: tuple[int, ...] = (1, 2, 8),
                refusals: dict[str, str] | None = None) -> dict[str, Any]:
    """Every setup's plan of ``preset`` (meta device) at ``frozen`` of its parameters frozen.

    Returns the preset's size and mask, one row per setup (one device) and one per setup and
    device count (the busiest FSDP2 process), with the FSDP2 units the transients come from.
    ``refusals``: setup -> why ``train.parallel=fsdp`` refuses it ('' = accepted), from
    ``fsdp_refusal`` when not given.
    """
    unet = build_unet(preset, device="meta")
    tensors, params = param_summary(unet)
    if preset == "flux" and (tensors, params) != (FLUX_TENSORS, FLUX_PARAMS):
        raise AssertionError(f"preset flux builds {params:,} parameters in {tensors:,} tensors, not FLUX.1 [dev]'s "
                             f"{FLUX_PARAMS:,} in {FLUX_TENSORS:,}")
    mask = FreezeMask.random(unet, frozen, by="params", seed=seed)
    refusals = refusals if refusals is not None else {name: fsdp_refusal(o) for name, _, o in SETUPS}
    plans: dict[str, MemoryPlan] = {name: memory_plan(unet, mask.frozen, **kw) for name, kw, _ in SETUPS}
    full = plans["full"]
    rows, dev_rows = [], []
    for name, plan in plans.items():
        rows.append({"preset": preset, "setup": name, "static_bytes": plan.static_bytes,
                     "static_gib": plan.static_bytes / GiB, "vs_full": plan.static_bytes / full.static_bytes,
                     "frozen_weights_gib": plan.frozen_weight_bytes / GiB,
                     "trainable_weights_gib": plan.trainable_weight_bytes / GiB,
                     "grads_gib": (plan.grad_bytes + plan.grad_transient_bytes) / GiB,
                     "optimizer_gib": plan.optimizer_state_bytes / GiB, **_fits(plan.static_bytes)})
        for n in devices:
            d, f = plan.per_device(n), full.per_device(n)
            dev_rows.append({"preset": preset, "setup": name, "devices": n, "total_bytes": d.static_bytes,
                             "sharded_gib": d.sharded_bytes / GiB, "gather_gib": d.gather_transient_bytes / GiB,
                             "reduce_gib": d.reduce_transient_bytes / GiB, "total_gib": d.static_bytes / GiB,
                             "vs_full": d.static_bytes / f.static_bytes, **_fits(d.static_bytes),
                             "runs": "plain path" if n == 1 else ("fsdp" if not refusals[name] else "refused"),
                             "refused": "" if n == 1 else refusals[name]})
    eng = plans["engine"]
    big = eng.largest_block
    return {"preset": preset, "denoiser": type(unet).__name__, "params": params, "tensors": tensors,
            "frozen_params": mask.stats().frozen_params, "frozen_tensors": len(mask.frozen),
            "frozen_fraction": mask.stats().frozen_params / params, "mask_seed": seed,
            "fsdp_units": len(eng.units), "largest_block": big.name if big else None,
            "largest_block_bytes": {s: (p.largest_block.param_bytes if p.largest_block else 0)
                                    for s, p in plans.items()},
            "root_bytes": {s: p.units[-1].param_bytes for s, p in plans.items()},
            "rows": rows, "per_device": dev_rows}


def run_plan(presets: tuple[str, ...] = DEFAULT_PRESETS, frozen: float = 0.5, seed: int = 0,
             devices: tuple[int, ...] = (1, 2, 8)) -> list[dict[str, Any]]:
    refusals = {name: fsdp_refusal(o) for name, _, o in SETUPS}
    return [plan_preset(p, frozen, seed, devices, refusals) for p in presets]


def _flag(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its fits_* booleans as yes/no."""
    return {**row, **{k: ("yes" if v else "no") for k, v in row.items() if k.startswith("fits_")}}


def render(results: list[dict[str, Any]], cond: dict[str, Any], pngs: list[Path]) -> str:
    main, rest = results[0], results[1:]
    caps = " / ".join(label for label, _ in CAPACITIES.values())
    one_cols = [("setup", "setup"), ("frozen_weights_gib", "frozen W GiB"), ("trainable_weights_gib", "trainable W GiB"),
                ("grads_gib", "grads GiB"), ("optimizer_gib", "optim GiB"), ("static_gib", "total GiB"),
                ("vs_full", "x full"), ("fits_h200", "fits 141 GB"), ("fits_80gb", "fits 80 GB")]
    dev_cols = [("setup", "setup"), ("devices", "devices"), ("sharded_gib", "shards GiB"),
                ("gather_gib", "+ gathered GiB"), ("reduce_gib", "+ reduce GiB"), ("total_gib", "total GiB"),
                ("vs_full", "x full (same devices)"), ("fits_h200", "fits 141 GB"), ("fits_80gb", "fits 80 GB"),
                ("runs", "runs as")]
    ctx_cols = [("preset", "preset"), ("setup", "setup"), ("static_gib", "1 device GiB"), ("vs_full", "x full"),
                ("fits_h200", "fits 141 GB"), ("fits_80gb", "fits 80 GB")]
    big = main["largest_block_bytes"]
    md = [f"# bench/run.py plan\n\n## {get_preset(main['preset']).notes}\n",
          (f"{main['denoiser']}, {main['params']:,} parameters in {main['tensors']:,} tensors; "
           f"{main['frozen_params']:,} parameters ({main['frozen_fraction']:.2%}) in {main['frozen_tensors']:,} "
           f"tensors frozen (seeded random mask, seed {main['mask_seed']}). Static memory before activations, "
           f"one device (the plain path). *fits* compares with {caps} of device memory, **activations excluded**.\n"),
          markdown_table([_flag(r) for r in main["rows"]], one_cols),
          "\n## Per device under FSDP2 (the busiest process)\n",
          (f"*shards*: its dim-0 shard of every weight, gradient and moment (`ceil(rows / devices)` rows, as "
           f"FSDP2 pads them). *gathered*: what FSDP2's default schedule holds all-gathered at the peak: the "
           f"root's tensors (everything outside the {main['fsdp_units'] - 1} blocks, kept gathered from forward "
           f"to backward; {main['root_bytes']['engine'] / GiB:.2f} GiB under the engine) plus two blocks at once "
           f"(the one computing and the one prefetched), each tensor in its storage dtype: the largest block is "
           f"{big['engine'] / GiB:.2f} GiB under the engine (`{main['largest_block']}`, bf16 frozen and fp32 "
           f"trainable tensors), {big['full'] / GiB:.2f} GiB in fp32 (full). *reduce*: twice the largest unit's "
           f"fp32 gradients (autograd's unsharded gradients and the reduce-scatter input they are copied into). "
           f"*runs as*: 1 device is the plain path; `refused`: `train.parallel=fsdp` does not accept the setup "
           f"today (the plan is what it would hold).\n"),
          markdown_table([_flag(r) for r in main["per_device"]], dev_cols)]
    if rest:
        hi = max(r["devices"] for r in main["per_device"])
        ctx = []
        for res in rest:
            at = {r["setup"]: r for r in res["per_device"] if r["devices"] == hi}
            ctx += [{**_flag(r), f"d{hi}": at[r["setup"]]["total_gib"]} for r in res["rows"]]
        md += ["\n## Context: other denoisers at the same fraction\n",
               ", ".join(f"{r['preset']}: {r['denoiser']}, {r['params']:,} parameters in {r['tensors']:,} tensors"
                         for r in rest) + ".\n",
               markdown_table(ctx, ctx_cols + [(f"d{hi}", f"{hi} devices GiB (FSDP2)")])]
    refused = {r["setup"]: r["refused"] for r in main["per_device"] if r["refused"]}
    if refused:
        md.append("\nRefused under `train.parallel=fsdp` (from the config's own check): "
                  + "; ".join(f"`{k}`: {v}" for k, v in refused.items()))
    md += ["\nPlots: " + ", ".join(f"`{p.name}`" for p in pngs), "", conditions_markdown(cond)]
    return "\n".join(md)


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    setups = [r["setup"] for r in result["rows"]]
    devs = sorted({r["devices"] for r in result["per_device"]})
    by = {(r["setup"], r["devices"]): r for r in result["per_device"]}
    width = 0.8 / len(devs)
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, n in enumerate(devs):
        xs = [j + (i - (len(devs) - 1) / 2) * width for j in range(len(setups))]
        shards = [by[s, n]["sharded_gib"] for s in setups]
        trans = [by[s, n]["gather_gib"] + by[s, n]["reduce_gib"] for s in setups]
        bars = ax.bar(xs, shards, width, color=f"C{i}",
                      label=f"{n} devices (FSDP2): shards" if n > 1 else "1 device (plain path)")
        ax.bar(xs, trans, width, bottom=shards, color=f"C{i}", alpha=0.45, hatch="//",
               label=f"{n} devices: FSDP2 transients" if n > 1 else None)
        for b, s, t in zip(bars, shards, trans):
            ax.text(b.get_x() + b.get_width() / 2, s + t, f"{s + t:.0f}", ha="center", va="bottom", fontsize=7)
    for (label, cap), ls in zip(CAPACITIES.values(), ("--", ":")):
        ax.axhline(cap / GiB, color="black", lw=0.9, ls=ls)
        ax.text(len(setups) - 0.5, cap / GiB, f"{label} ({cap / GiB:.0f} GiB)", ha="right", va="bottom", fontsize=8)
    refused = {r["setup"] for r in result["per_device"] if r["refused"]}
    ax.set_xticks(range(len(setups)), [s + (" *" if s in refused else "") for s in setups], rotation=20, ha="right")
    if refused:
        ax.set_xlabel("* train.parallel=fsdp refuses this setup today: its FSDP2 bars are the plan of what it would hold")
    ax.set_ylim(0, 1.12 * max(r["total_gib"] for r in result["per_device"]))
    ax.set_ylabel("GiB per device (activations excluded)")
    ax.set_title(f"{result['preset']}: {result['params'] / 1e9:.1f}B parameters, "
                 f"{result['frozen_fraction']:.0%} frozen - busiest process per device count")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = out / "plan.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NOT_COUNTED = ("activations (tensors saved for backward and the forward's working memory; they grow with batch "
               "and resolution, and with gradient checkpointing they shrink), the CUDA context and NCCL buffers "
               "(about 0.5-1 GiB per process), allocator fragmentation and reserved-but-unused memory, the "
               "text encoders and VAE (not trained: their outputs are cached, data.cache=true, or they run "
               "elsewhere), and the guard's fp32 host copies of bf16-held frozen tensors (host RAM)")


def _ints(text: str) -> tuple[int, ...]:
    out = tuple(int(x) for x in text.split(",") if x.strip())
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,8, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.py plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="model presets, comma-separated; the first gets the full tables and the plot, the others "
                        "a context table (default: %(default)s)")
    p.add_argument("--frozen", type=float, default=0.5,
                   help="fraction of parameters frozen (a seeded random whole-tensor mask, exact budget by "
                        "parameter count; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default: %(default)s)")
    p.add_argument("--devices", type=_ints, default=(1, 2, 8),
                   help="FSDP2 process counts for the per-device plan, comma-separated (default: 1,2,8)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan"),
                   help="folder for plan.md, plan.json and plan.png (default: bench/results/plan)")
    args = p.parse_args(argv)
    refuse_dirty_results(args.out)
    presets = tuple(x.strip() for x in args.presets.split(",") if x.strip())
    if not 0.0 <= args.frozen <= 1.0:
        p.error(f"--frozen must be in [0, 1], got {args.frozen}")
    t0 = time.time()
    results = run_plan(presets, args.frozen, args.seed, args.devices)
    out = Path(args.out)
    pngs = [plot(results[0], out)]
    cond = conditions(
        computed_on="the meta device: shapes only, nothing allocated (engine/train/memplan.py)",
        presets=list(presets), frozen=args.frozen, budget_by="params", mask_seed=args.seed,
        mask="FreezeMask.random(by='params'): whole tensors in a seeded random order, exact budget",
        devices=list(args.devices), autocast="bf16 (engine: frozen tensors held in bf16, norm weights fp32)",
        optimizer="AdamW: torch's for full/naive (fp32 moments + a step count per tensor), the engine's flat "
                  "buffers otherwise (fp32 master weights; fp32, bf16 or 8-bit moments)",
        counted="weights by storage dtype, gradients (or the in-backward peak), optimizer state; under FSDP2 "
                "the busiest process's dim-0 shards plus the default schedule's gathered units and "
                "reduce-scatter buffers",
        not_counted=NOT_COUNTED,
        capacities={label: cap for label, cap in CAPACITIES.values()},
        units="GiB = 2^30 bytes; capacities in decimal GB (10^9 bytes) as marketed",
        wall_s=round(time.time() - t0, 1))
    md = render(results, cond, pngs)
    j, m = write_results(out, "plan", {"suite": "plan", "conditions": cond, "results": results}, md)
    print(md)
    print(f"\nwritten: {j}, {m}, " + ", ".join(map(str, pngs)))
    return 0
