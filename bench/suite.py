"""The side-by-side training suites of ``bench/run.py``: scenarios, trainers built for them, their
interleaved steps, and the rows (exact ledger, step times, ratios) they produce."""
from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import percentiles

from freezeasguard.engine.config import resolve
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words
from freezeasguard.engine.train.peak import measure_step_peak
from freezeasguard.engine.train.trainer import Trainer

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
    options: tuple[str, ...] = ()  # config overrides of this scenario (engine options)


DOWN_PATH = -2.0  # Scenario.frozen: the time embedding, conv_in and every down block frozen


def down_path_mask(unet) -> FreezeMask:
    """The frozen prefix of the forward: the time embedding, conv_in and the whole down path."""
    return FreezeMask.from_names(unet, [n for n, _ in unet.named_parameters()
                                        if n.startswith(("time_embedding.", "conv_in.", "down_blocks."))])


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
    over += list(sc.options)
    if sc.mode != "full":
        if sc.frozen == DOWN_PATH:
            mask = down_path_mask(comps.unet)
        elif sc.frozen < 0:
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
        peaks = {}  # the allocator's measured peak of one step per scenario (train.peak)
        total = args.warmup + args.steps
        # measured on the second step (the first allocates torch AdamW's state), untimed when warm-up allows
        peak_step = min(1, total - 1)
        bar = tqdm(total=total * len(scenarios), desc="interleaved steps", unit="step")
        for k in range(total):
            for sc in scenarios:
                tr = trainers[sc.name]
                tr.measure_memory = k == 0
                t0 = time.perf_counter()
                if k == peak_step and k != 0:  # the ledger's step counts activations: not this one
                    s, peaks[sc.name] = measure_step_peak(tr.train_step, step_roots(tr), tr.device)
                else:
                    s = tr.train_step()
                dt = time.perf_counter() - t0
                if k == 0:
                    ledgers[sc.name] = tr.last_ledger
                    tr.measure_memory = False
                if k >= args.warmup and not (k == peak_step and args.steps > 1):
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
                "grads_mib": (led.grad_bytes + led.grad_transient_bytes) / MiB,
                "grads_in_backward_mib": led.grad_transient_bytes / MiB,
                "optimizer_mib": led.optimizer_state_bytes / MiB,
                "static_mib": led.static_bytes / MiB,
                "lock_bases_mib": led.lock_bytes / MiB,
                "locked_dof": tr.guard.lock.dof if tr.guard is not None and tr.guard.lock is not None else 0,
                "lock_transient_mib": getattr(tr.optimizer, "lock_transient_bytes", 0) / MiB,
                "activations_mib": (led.activation_bytes or 0) / MiB,
                "peak_mib": led.peak_bytes / MiB,  # the ledger's model of the step's peak
                "held_mib": led.held_bytes / MiB,  # the ledger's model of what outlives a step
                "measured_peak_mib": peaks[sc.name].peak_bytes / MiB if sc.name in peaks else None,
                "measured_held_mib": peaks[sc.name].held_at_start / MiB if sc.name in peaks else None,
                "measured_above_mib": peaks[sc.name].above_start / MiB if sc.name in peaks else None,
                "peak_method": peaks[sc.name].method if sc.name in peaks else None,
                "padding_mib": (led.weight_padding_bytes + led.code_table_bytes) / MiB,
                "options": list(sc.options), "prefix": list(tr.guard.prefix) if tr.guard is not None else [],
                "step_ms_p20": p["p20"] * 1e3, "step_ms_p50": p["p50"] * 1e3, "step_ms_p80": p["p80"] * 1e3,
                "samples_per_s": args.batch / p["p50"],
                "frozen_convs": tr.guard.frozen_convs if tr.guard is not None else 0,
                "verify": report.summary() if report is not None else "n/a (nothing frozen)",
                "verify_ok": report.ok if report is not None else None,
                "losses": losses[sc.name],  # every step's loss (same seed and data in every mode)
                "nvml": nvml.get(sc.name),
            })
    _add_ratios(rows)
    return rows


def step_roots(tr: Trainer) -> list:
    """What a scenario's step starts from: its denoiser, optimizer and guard (the frozen encoders
    and the cached data are the same in every scenario and outside the ledger)."""
    return [tr.c.unet, tr.optimizer, tr.guard]


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


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to the full and naive rows at the same frozen fraction (full: the 0% row)."""
    full = next((r for r in rows if r["mode"] == "full"), None)
    for r in rows:
        naive = next((x for x in rows if x["mode"] == "naive" and x["scenario"].split("@")[1:] ==
                      r["scenario"].split("@")[1:]), None)
        for key, short in (("static_mib", "static"), ("activations_mib", "act"), ("peak_mib", "peak"),
                           ("measured_peak_mib", "measured_peak"), ("step_ms_p50", "time")):
            if full and full.get(key) and r.get(key) is not None:
                r[f"{short}_vs_full"] = r[key] / full[key]
            if naive and naive.get(key) and r.get(key) is not None:
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
           ("measured_peak_mib", "measured peak MiB"), ("measured_peak_vs_full", "measured peak/full"),
           ("measured_peak_vs_naive", "measured peak/naive"),
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
    "Measured: *measured peak* = the allocator's peak of one step (`engine/train/peak.py`, the second step: "
    "the storages the denoiser, optimizer and guard hold at its start + the most it allocated above that); "
    "*step ms* = wall-clock median over the timed steps, the modes interleaved step by step so host "
    "noise hits all alike (noisy on a shared CPU; read the ratios). */full* and */naive* are ratios to the full "
    "fine-tuning row and to naive freezing at the same frozen fraction.")


LOCK_LEGEND = (
    "Direction locks (seeded random orthonormal bases over each trainable matrix's output (`out`) or input (`in`) "
    "side) enforced inside the flat AdamW step: each locked chunk is copied, stepped, and its update projected off "
    "the locked directions (one batched GEMM pair per shape group). *locked dof* = degrees of freedom removed; "
    "*lock bases* = the stacked bases held on the device (counted in *static*); *lock chunk copy* = the transient "
    "pre-step copy of the largest chunk. */unlocked* = ratio to the same engine row without the lock; step times "
    "interleaved as in the other suites (read the ratios).")


