"""freezeasguard benchmarks: scenarios -> rows -> JSON + markdown, with their conditions.

    python bench/run.py              # the main job: ~1 min on a 2-core CPU (the GPU when present)
    python bench/run.py freeze       # full vs naive vs engine at frozen fractions 0/0.3/0.5/0.7
    python bench/run.py optimizer    # one AdamW step by implementation
    python bench/run.py masklearn    # a mask-learning step vs a plain fine-tuning step
    python bench/run.py lock         # the cost of enforcing direction locks in the optimizer step
    python bench/run.py savings      # the engine's memory/speed options side by side at 50% frozen
    python bench/run.py curves       # memory and time against the frozen fraction and model size (+ plots)
    python bench/run.py guard        # efficacy: does the learned mask hold back illegal fine-tuning?
    python bench/run.py plan         # the memory plan of a 12B Flux transformer at 50% frozen, 1-8 devices
                                     # (meta device, seconds; its flags: python bench/run.py plan --help)
    python bench/run.py --help

Every suite trains the same model on the same data, mask, batch and seed in each mode and
interleaves their steps (one step of each mode in turn), so host noise hits all modes alike;
times are medians over the timed steps after warm-up, reported as ratios to full fine-tuning.
Memory is the exact ledger (engine/train/ledger.py) at the step's peak point: weights by dtype,
gradients, optimizer state and activations saved for backward.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import conditions, conditions_markdown, markdown_table, refuse_dirty_results, write_results
from plan import main as plan_main
from savings import curves_main, savings_main
from suite import COLUMNS, COLUMNS_LEGEND, LOCK_COLUMNS, LOCK_LEGEND, run_suite, suite_scenarios

from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words


def run_optimizer_suite(args) -> list[dict[str, Any]]:
    """One AdamW step by provider at trainable fractions 0.3/0.5/1.0 of an SD1.5-shaped buffer
    (total size ``args.optim_numel``), providers interleaved round by round."""
    import statistics

    from adamw_cases import FRACTIONS, PROVIDERS, layout, make_step, skip_reason, sync

    rows = []
    for frac in FRACTIONS:
        tensors = layout(args.optim_numel, frac)
        n = sum(s for s, _ in tensors)
        cases = {}
        for prov in PROVIDERS:
            why = skip_reason(prov)
            if why is None:
                cases[prov] = make_step(prov, tensors)
            else:
                rows.append({"provider": prov, "trainable": frac, "skipped": why})
        times: dict[str, list[float]] = {p: [] for p in cases}
        for r in range(args.warmup + args.steps):
            for prov, (step, _, _) in cases.items():
                t0 = time.perf_counter()
                step()
                sync()
                if r >= args.warmup:
                    times[prov].append(time.perf_counter() - t0)
        for prov, (_, bpe, launches) in cases.items():
            med = statistics.median(times[prov])
            rows.append({"provider": prov, "trainable": frac, "elements": n, "tensors": len(tensors),
                         "step_ms": med * 1e3, "gb_per_s": n * bpe / med / 1e9, "bytes_per_elem": bpe,
                         "launches": launches})
    for r in rows:
        base = next((x for x in rows if x["provider"] == "torch_fused" and x["trainable"] == r["trainable"]
                     and "step_ms" in x), None)
        if base and "step_ms" in r:
            r["time_vs_torch_fused"] = r["step_ms"] / base["step_ms"]
    full = {r["provider"]: r for r in rows if r["trainable"] == 1.0 and "step_ms" in r}
    for r in rows:
        if "step_ms" in r and r["provider"] in full:
            r["time_vs_all_trainable"] = r["step_ms"] / full[r["provider"]]["step_ms"]
    return rows


OPT_COLUMNS = [("provider", "provider"), ("trainable", "trainable"), ("elements", "elements"),
               ("tensors", "tensors"), ("step_ms", "step ms (p50)"), ("gb_per_s", "GB/s"),
               ("launches", "launches"), ("time_vs_torch_fused", "time/torch fused"),
               ("time_vs_all_trainable", "time/all trainable"), ("skipped", "skipped")]


def masklearn_main(args) -> int:
    """One mask-learning step (simulated-user step, mask step, and their 1:(every-1) cycle) vs one
    plain fine-tuning step of the same model and batch (issue goal: <= ~1.3x)."""
    from step_cost import mask_step_cost

    from freezeasguard.engine.config import resolve as resolve_cfg
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import build_learner

    dataset = digits_dataset(args.resolution, classes=list(range(max(args.classes, 3))))
    words = dataset.domain_names()
    comps = build_components(args.preset, resolution=args.resolution, extra_words=caption_words(dataset.captions),
                             seed=args.seed)
    cfg = resolve_cfg(MaskLearnConfig, presets={}, overrides=[
        f"illegal=[{words[0]}]", f"innocent=[{words[1]},{words[2]}]", "bootstrap_steps=0", "progress=false",
        f"user.batch_size={args.batch}", f"mixed_precision={args.dtype}", "work_dir=null",
        f"num_threads={args.threads if not torch.cuda.is_available() else 0}", f"seed={args.seed}"])
    learner = build_learner(cfg, components=comps, dataset=dataset)
    t0 = time.time()
    cost = mask_step_cost(learner, repeats=args.steps, warmup=args.warmup)
    rows = [{"step": "plain fine-tuning (torch AdamW)", "ms": cost["plain_s"] * 1e3, "ratio": 1.0,
             "update_ms": cost["plain_update_s"] * 1e3},
            {"step": "simulated-user step", "ms": cost["user_s"] * 1e3, "ratio": cost["ratio_user"],
             "update_ms": cost["user_update_s"] * 1e3},
            {"step": "mask step", "ms": cost["mask_s"] * 1e3, "ratio": cost["ratio_mask"],
             "update_ms": cost["mask_update_s"] * 1e3},
            {"step": f"average of a {cfg.mask.every}-step cycle", "ms": cost["cycle_s"] * 1e3,
             "ratio": cost["ratio_cycle"]}]
    cond = conditions(preset=args.preset, resolution=args.resolution, batch=args.batch, autocast=args.dtype,
                      tensors=cost["tensors"], params=cost["params"], repeats=cost["repeats"],
                      mask_every=cfg.mask.every, wall_s=round(time.time() - t0, 1))
    cols = [("step", "step"), ("ms", "ms (p50)"), ("ratio", "x plain step"), ("update_ms", "of which update ms")]
    md = "# bench/run.py masklearn\n\n" + markdown_table(rows, cols) + "\n\n" + conditions_markdown(cond)
    j, m = write_results(Path(args.out), "masklearn", {"suite": "masklearn", "conditions": cond, "rows": rows,
                                                       "raw": cost}, md)
    print(md)
    print(f"\nwritten: {j} and {m}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "guard":  # the efficacy benchmark has its own options
        from guard import main as guard_main

        return guard_main(argv[1:])
    if argv and argv[0] == "plan":  # the shape-only memory plan has its own options
        return plan_main(argv[1:])
    if argv and argv[0] == "plan-step":  # a real guarded step next to the plan
        from plan_step import main as plan_step_main

        return plan_step_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="default",
                   choices=["default", "freeze", "optimizer", "masklearn", "lock", "savings", "curves"],
                   help="default: the ~1 min main job (full/naive/engine at 50%% frozen); "
                        "freeze: fractions 0/0.3/0.5/0.7 plus all-convs-frozen; "
                        "optimizer: one AdamW step by implementation at trainable 0.3/0.5/1.0; "
                        "masklearn: a mask-learning step vs a plain fine-tuning step; "
                        "savings: each engine option side by side at 50%% frozen; "
                        "curves: memory and time against the frozen fraction and model size")
    p.add_argument("--preset", default=None, help="model preset (default: small on CPU, sd15 on CUDA)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype")
    p.add_argument("--steps", type=int, default=None, help="timed steps per scenario")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--classes", type=int, default=2, help="digit classes in the training data")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives stable ratios)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim-numel", type=int, default=None,
                   help="optimizer suite: total elements (default: SD1.5's 859,520,964 on CUDA, 4M on CPU)")
    p.add_argument("--out", default="runs/bench", help="folder for <suite>.json and <suite>.md")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="savings: include the regional torch.compile scenario (default: on CUDA only; on CPU "
                        "its first step compiles for minutes and later steps run as fast as eager)")
    args = p.parse_args(argv)
    refuse_dirty_results(args.out)
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("sd15" if cuda else "small")
    args.resolution = args.resolution or (512 if args.preset == "sd15" else 64)
    args.steps = args.steps or {"freeze": 20, "savings": 16, "curves": 6}.get(args.suite, 12)
    if not cuda:
        torch.set_num_threads(args.threads)
    if args.suite == "optimizer":
        return optimizer_main(args)
    if args.suite == "masklearn":
        return masklearn_main(args)
    if args.suite == "savings":
        return savings_main(args)
    if args.suite == "curves":
        return curves_main(args)
    fractions = [0.5] if args.suite == "default" else [0.3, 0.5, 0.7]
    scenarios = suite_scenarios(args.suite, fractions)
    t0 = time.time()
    rows = run_suite(scenarios, args)
    cond = conditions(preset=args.preset, resolution=args.resolution, batch=args.batch,
                      autocast=args.dtype, master_weights="fp32", optimizer="AdamW",
                      mask="seeded random, exact budget by parameters",
                      timed_steps=args.steps, warmup_steps=args.warmup, data=f"digits classes 0-{args.classes - 1}",
                      wall_s=round(time.time() - t0, 1))
    cols, legend = (LOCK_COLUMNS, LOCK_LEGEND) if args.suite == "lock" else (COLUMNS, COLUMNS_LEGEND)
    md = (f"# bench/run.py {args.suite}\n\n" + markdown_table(rows, cols) + "\n\n" + legend + "\n\n"
          + conditions_markdown(cond))
    nv = rows[0].get("nvml") or {}
    md += "\n- nvml: " + ("per-scenario energy/memory in the JSON rows" if nv.get("available")
                          else f"unavailable ({nv.get('reason')})")
    j, m = write_results(Path(args.out), args.suite, {"suite": args.suite, "conditions": cond, "rows": rows}, md)
    print(md)
    print(f"\nwritten: {j} and {m}")
    bad = [r["scenario"] for r in rows if r["verify_ok"] is False]
    if bad:
        print(f"FROZEN TENSORS CHANGED in {bad}", file=sys.stderr)
        return 1
    return 0


def optimizer_main(args) -> int:
    args.optim_numel = args.optim_numel or (859_520_964 if torch.cuda.is_available() else 4_000_000)
    t0 = time.time()
    rows = run_optimizer_suite(args)
    cond = conditions(total_elements=args.optim_numel, layout="SD1.5's 686 tensor sizes scaled to the total, "
                      "seeded random trainable subset, decay tensors first", dtype="fp32 params/grads/states",
                      timed_steps=args.steps, warmup_steps=args.warmup, wall_s=round(time.time() - t0, 1))
    md = "# bench/run.py optimizer\n\n" + markdown_table(rows, OPT_COLUMNS) + "\n\n" + conditions_markdown(cond)
    j, m = write_results(Path(args.out), "optimizer", {"suite": "optimizer", "conditions": cond, "rows": rows}, md)
    print(md)
    print(f"\nwritten: {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
