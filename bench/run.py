"""freezeasguard benchmarks: scenarios -> rows -> JSON + markdown, with their conditions.

    python bench/run.py              # the main job: ~1 min on a 2-core CPU (the GPU when present)
    python bench/run.py freeze       # full vs naive vs engine at frozen fractions 0/0.3/0.5/0.7
    python bench/run.py optimizer    # one AdamW step by implementation
    python bench/run.py masklearn    # a mask-learning step vs a plain fine-tuning step
    python bench/run.py lock         # the cost of enforcing direction locks in the optimizer step
    python bench/run.py guard        # efficacy: does the learned mask hold back illegal fine-tuning?
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
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from freezeasguard.engine.config import resolve
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words
from freezeasguard.engine.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import conditions, conditions_markdown, markdown_table, percentiles, write_results  # noqa: E402

MiB = 2**20


@dataclass
class Scenario:
    """One training setup measured side by side with the others of its suite."""

    name: str
    mode: str  # full | naive | engine
    frozen: float  # fraction of parameters frozen (seeded random mask), or -1 for 'all convs'
    frozen_conv: bool = True
    lock: float = 0.0  # share of each trainable matrix's side under a (seeded random) direction lock
    lock_side: str = "out"


def _conv_mask(unet) -> FreezeMask:
    names = [f"{m}.{k}" for m, mod in unet.named_modules() if isinstance(mod, torch.nn.Conv2d)
             for k, _ in mod.named_parameters(recurse=False)]
    return FreezeMask.from_names(unet, names)


def build_trainer(sc: Scenario, args, dataset, workdir: Path) -> Trainer:
    comps = build_components(args.preset, resolution=args.resolution, extra_words=caption_words(dataset.captions),
                             seed=args.seed)
    over = [f"train.batch_size={args.batch}", f"train.steps={args.warmup + args.steps}",
            f"train.mixed_precision={args.dtype}", f"train.seed={args.seed}", "train.progress=false",
            f"train.lr={args.lr}", f"freeze.mode={sc.mode}", f"freeze.frozen_conv={str(sc.frozen_conv).lower()}",
            f"out_dir={workdir / sc.name}", f"model.preset={args.preset}"]
    if sc.mode != "full":
        if sc.frozen < 0:
            mask = _conv_mask(comps.unet)
        else:
            mask = FreezeMask.random(comps.unet, sc.frozen, by="params", seed=args.seed)
        lock = random_lock(comps.unet, sc.lock, side=sc.lock_side, seed=args.seed, skip=mask.frozen_set) \
            if sc.lock else None
        path = workdir / f"{sc.name}.manifest.json"
        Manifest.build(comps.unet, mask, provenance={"method": "bench", "seed": args.seed}, lock=lock,
                       lock_file=re.sub(r"[^A-Za-z0-9._-]", "_", sc.name) + ".locks.safetensors").save(path, lock=lock)
        over.append(f"freeze.manifest={path}")
    cfg = resolve(overrides=over)
    return Trainer(cfg, components=comps, dataset=dataset)


def run_suite(scenarios: list[Scenario], args) -> list[dict[str, Any]]:
    from tqdm import tqdm

    dataset = digits_dataset(args.resolution, classes=list(range(args.classes)))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for sc in tqdm(scenarios, desc="building", unit="scenario"):
            trainers[sc.name] = build_trainer(sc, args, dataset, Path(tmp))
        times: dict[str, list[float]] = {sc.name: [] for sc in scenarios}
        losses: dict[str, list[float]] = {sc.name: [] for sc in scenarios}
        ledgers = {}
        total = args.warmup + args.steps
        bar = tqdm(total=total * len(scenarios), desc="interleaved steps", unit="step")
        for k in range(total):
            for sc in scenarios:
                tr = trainers[sc.name]
                tr.measure_memory = k == 0
                t0 = time.perf_counter()
                s = tr.train_step()
                dt = time.perf_counter() - t0
                if k == 0:
                    ledgers[sc.name] = tr.last_ledger
                    tr.measure_memory = False
                if k >= args.warmup:
                    times[sc.name].append(dt)
                losses[sc.name].append(s.loss)
                bar.update(1)
                bar.set_postfix(scenario=sc.name, loss=f"{s.loss:.3f}")
        bar.close()
        nvml = _energy_pass(scenarios, trainers, args)
        rows = []
        for sc in scenarios:
            tr, led = trainers[sc.name], ledgers[sc.name]
            st = tr.guard.mask.stats() if tr.guard is not None and tr.guard.mask is not None else None
            report = tr.verify_frozen()
            p = percentiles(times[sc.name])
            rows.append({
                "scenario": sc.name, "mode": sc.mode,
                "frozen_params": st.param_ratio if st else 0.0,
                "frozen_tensors": st.tensor_ratio if st else 0.0,
                "weights_mib": led.weight_bytes / MiB,
                "frozen_weights_mib": led.frozen_weight_bytes / MiB,
                "grads_mib": led.grad_bytes / MiB,
                "optimizer_mib": led.optimizer_state_bytes / MiB,
                "static_mib": led.static_bytes / MiB,
                "lock_bases_mib": led.lock_bytes / MiB,
                "locked_dof": tr.guard.lock.dof if tr.guard is not None and tr.guard.lock is not None else 0,
                "lock_transient_mib": getattr(tr.optimizer, "lock_transient_bytes", 0) / MiB,
                "activations_mib": (led.activation_bytes or 0) / MiB,
                "step_ms_p20": p["p20"] * 1e3, "step_ms_p50": p["p50"] * 1e3, "step_ms_p80": p["p80"] * 1e3,
                "samples_per_s": args.batch / p["p50"],
                "frozen_convs": tr.guard.frozen_convs if tr.guard is not None else 0,
                "verify": report.summary() if report is not None else "n/a (nothing frozen)",
                "verify_ok": report.ok if report is not None else None,
                "losses": losses[sc.name],  # every step's loss (same seed and data in every mode)
                "cuda_max_allocated_mib": (led.cuda_max_allocated or 0) / MiB or None,
                "nvml": nvml.get(sc.name),
            })
    _add_ratios(rows)
    return rows


def _energy_pass(scenarios: list[Scenario], trainers: dict, args) -> dict[str, Any]:
    """NVML per scenario (CUDA): device memory, utilisation, power, and energy over 20+ steps run
    back to back (energy windows cannot interleave). Elsewhere: why NVML is unavailable."""
    from freezeasguard.engine.train.profiling import MIN_WINDOW_STEPS, NvmlSampler

    out: dict[str, Any] = {}
    for sc in scenarios:
        with NvmlSampler() as sampler:
            if not sampler.available:
                return {sc.name: {"available": False, "reason": sampler.reason} for sc in scenarios}
            n = max(MIN_WINDOW_STEPS, args.steps)
            with sampler.energy_window(steps=n):
                for _ in range(n):
                    trainers[sc.name].train_step()
            out[sc.name] = sampler.summary()
    return out


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


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to the full and naive rows at the same frozen fraction (full: the 0% row)."""
    full = next((r for r in rows if r["mode"] == "full"), None)
    for r in rows:
        naive = next((x for x in rows if x["mode"] == "naive" and x["scenario"].split("@")[1:] ==
                      r["scenario"].split("@")[1:]), None)
        for key, short in (("static_mib", "static"), ("activations_mib", "act"), ("step_ms_p50", "time")):
            if full and full[key]:
                r[f"{short}_vs_full"] = r[key] / full[key]
            if naive and naive[key]:
                r[f"{short}_vs_naive"] = r[key] / naive[key]
        if "+lock" in r["scenario"]:  # the same engine row without the lock
            plain = next((x for x in rows if x["scenario"] == "engine@" + r["scenario"].split("@")[1]), None)
            for key, short in (("static_mib", "static"), ("step_ms_p50", "time")):
                if plain and plain[key]:
                    r[f"{short}_vs_unlocked"] = r[key] / plain[key]


def suite_scenarios(name: str, fractions: list[float]) -> list[Scenario]:
    out = [Scenario("full", "full", 0.0)]
    for f in fractions:
        if f == 0:
            continue
        tag = f"@{int(round(f * 100))}%"
        out += [Scenario("naive" + tag, "naive", f), Scenario("engine" + tag, "engine", f)]
    if name == "lock":
        out = [Scenario("full", "full", 0.0), Scenario("engine@0%", "engine", 0.0),
               Scenario("engine+lock30%out@0%", "engine", 0.0, lock=0.3),
               Scenario("engine+lock30%in@0%", "engine", 0.0, lock=0.3, lock_side="in"),
               Scenario("engine+lock50%out@0%", "engine", 0.0, lock=0.5),
               Scenario("engine@30%", "engine", 0.3), Scenario("engine+lock30%out@30%", "engine", 0.3, lock=0.3)]
    if name == "freeze":
        out += [Scenario("naive@convs", "naive", -1), Scenario("engine@convs", "engine", -1),
                Scenario("engine-noconvfn@convs", "engine", -1, frozen_conv=False)]
    return out


COLUMNS = [("scenario", "scenario"), ("frozen_params", "frozen params"), ("frozen_tensors", "frozen tensors"),
           ("weights_mib", "weights MiB"), ("grads_mib", "grads MiB"), ("optimizer_mib", "optim MiB"),
           ("static_mib", "static MiB"), ("static_vs_full", "static/full"), ("static_vs_naive", "static/naive"),
           ("activations_mib", "saved act MiB"), ("act_vs_naive", "act/naive"),
           ("step_ms_p50", "step ms (p50)"), ("time_vs_full", "time/full"), ("time_vs_naive", "time/naive")]


LOCK_COLUMNS = [("scenario", "scenario"), ("frozen_params", "frozen params"), ("locked_dof", "locked dof"),
                ("lock_bases_mib", "lock bases MiB"), ("lock_transient_mib", "lock chunk copy MiB"),
                ("static_mib", "static MiB"), ("static_vs_unlocked", "static/unlocked"),
                ("step_ms_p50", "step ms (p50)"), ("time_vs_full", "time/full"), ("time_vs_unlocked", "time/unlocked")]

COLUMNS_LEGEND = (
    "Columns. From the exact memory ledger (`engine/train/ledger.py`, device-independent and deterministic), at "
    "the step's peak (after backward and the optimizer step, before gradients are zeroed): *weights*, *grads* "
    "and *optim* (optimizer state) in MiB, each storage counted once; *static* = weights + grads + optim; *saved "
    "act* = the bytes autograd keeps for backward (saved_tensors_hooks; each storage once, weights excluded). "
    "Measured: *step ms* = wall-clock median over the timed steps, the modes interleaved step by step so host "
    "noise hits all alike (noisy on a shared CPU; read the ratios). */full* and */naive* are ratios to the full "
    "fine-tuning row and to naive freezing at the same frozen fraction.")


LOCK_LEGEND = (
    "Direction locks (seeded random orthonormal bases over each trainable matrix's output (`out`) or input (`in`) "
    "side) enforced inside the flat AdamW step: each locked chunk is copied, stepped, and its update projected off "
    "the locked directions (one batched GEMM pair per shape group). *locked dof* = degrees of freedom removed; "
    "*lock bases* = the stacked bases held on the device (counted in *static*); *lock chunk copy* = the transient "
    "pre-step copy of the largest chunk. */unlocked* = ratio to the same engine row without the lock; step times "
    "interleaved as in the other suites (read the ratios).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "guard":  # the efficacy benchmark has its own options
        from guard import main as guard_main

        return guard_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="default", choices=["default", "freeze", "optimizer", "masklearn", "lock"],
                   help="default: the ~1 min main job (full/naive/engine at 50%% frozen); "
                        "freeze: fractions 0/0.3/0.5/0.7 plus all-convs-frozen; "
                        "optimizer: one AdamW step by implementation at trainable 0.3/0.5/1.0; "
                        "masklearn: a mask-learning step vs a plain fine-tuning step")
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("sd15" if cuda else "small")
    args.resolution = args.resolution or (512 if args.preset == "sd15" else 64)
    args.steps = args.steps or (20 if args.suite == "freeze" else 12)
    if not cuda:
        torch.set_num_threads(args.threads)
    if args.suite == "optimizer":
        return optimizer_main(args)
    if args.suite == "masklearn":
        return masklearn_main(args)
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
