"""Efficacy of the guard, end to end on real data: does a learned freeze mask make illegal
fine-tuning fail while legal fine-tuning still works?

    python bench/run.py guard              # every guard at the service's caps (3 seeds, ~35 min on 2 CPU cores)
    python bench/run.py guard --quick      # a smoke run of every stage (a few minutes on 2 CPU cores)
    python bench/run.py guard --suite tensors   # the tensor-mask study: budgets, baselines, lr sweep, LoRA
    python bench/run.py guard --suite explore   # the mask-learning levers at the headline budget
    python bench/run.py guard --data DIR --domains ILLEGAL,INNOCENT,LEGAL   # a publisher's image folder

The story: a publisher pretrains a small text-to-image diffusion model on real images without
the target subject (guard_setup.py), learns freeze masks from its own split of the illegal domain
and an innocent domain (guard_masks.py), and simulated users fine-tune the base with the service's
own training path under each condition: no mask, random masks, baseline masks and learned masks,
on their own split of the illegal domain and on a legal domain the publisher never saw
(guard_users.py). A recogniser trained on real images only classifies samples of every
fine-tuned model; mitigation = 1 - rate_guarded / rate_full on the illegal domain, legal impact the
same on the legal domain, paired by seed (guard_report.py, guard_summary.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import refuse_dirty_results

BENCH = Path(__file__).resolve().parent

log = logging.getLogger("freezeasguard")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="default", choices=["default", "quick", "tensors", "explore"])
    p.add_argument("--quick", action="store_true", help="same as --suite quick")
    p.add_argument("--work", default=None, help="cache dir for the base, recogniser, masks and runs "
                                                "(default runs/guard/<suite>)")
    p.add_argument("--out", default=None, help="results dir (default bench/results/guard for the default "
                                               "suite, <work>/results otherwise)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the simulated users")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--base", default=None, help="use this base model folder instead of pretraining one")
    p.add_argument("--data", default=None, help="an image folder with metadata.jsonl domain labels")
    p.add_argument("--domains", default=None, help="ILLEGAL,INNOCENT,LEGAL domain names of --data")
    p.add_argument("--fresh", action="store_true", help="ignore every cache under --work")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from guard_plan import PLANS

    suite = "quick" if args.quick else args.suite
    plan = PLANS[suite]
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(range(args.seeds)))
    if args.data and not args.domains:
        raise SystemExit("--data needs --domains ILLEGAL,INNOCENT,LEGAL")
    work = Path(args.work or f"runs/guard/{suite}")
    if args.fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    committed = {"default": BENCH / "results" / "guard", "tensors": BENCH / "results" / "guard" / "tensors"}
    out = Path(args.out) if args.out else committed.get(suite, work / "results")
    refuse_dirty_results(out)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    progress = not args.no_progress
    t0 = time.perf_counter()
    result = run_suite(plan, args, work, progress)
    result["wall_seconds"] = time.perf_counter() - t0
    if plan.kind == "caps":
        from guard_caps import write_outputs
    else:
        from guard_summary import write_outputs

    paths = write_outputs(result, out)
    smoke = " (a smoke run of every stage: too small to judge the guard by; no targets checked)" \
        if suite == "quick" else ""
    print(f"guard suite '{suite}' finished in {result['wall_seconds']:.0f} s{smoke}; results: "
          + ", ".join(str(p) for p in paths))
    return 0


def run_suite(plan, args, work: Path, progress: bool) -> dict[str, Any]:
    """Every stage of the suite; returns the raw results (runs, masks, world, recogniser)."""
    from efficacy import load_recogniser, save_recogniser, train_recogniser
    from guard_caps import cap_jobs, cap_specs
    from guard_masks import MaskMaker
    from guard_plan import jobs, mask_specs
    from guard_setup import build_world, pretrain_base
    from guard_users import Context, Runner

    from freezeasguard.engine.model.components import load_components

    world_kw: dict[str, Any] = {}
    if args.data:
        world_kw = {"folder": args.data, "folder_domains": tuple(args.domains.split(","))}
    world = build_world(**world_kw)
    stages = _Stages(progress)

    # 1. the recogniser, on real images only
    rec_dir = work / "recogniser"
    classes = world.data.domain_names()
    recipe = json.dumps({"epochs": plan.recogniser_epochs, "classes": classes, "n": len(world.data)})
    if (rec_dir / "recipe").is_file() and (rec_dir / "recipe").read_text() == recipe:
        _, report = load_recogniser(rec_dir)
    else:
        stages.say("training the recogniser on real images")
        model, report = train_recogniser(world.data, classes, epochs=plan.recogniser_epochs, progress=progress)
        save_recogniser(model, report, rec_dir)
        (rec_dir / "recipe").write_text(recipe)

    # 2. the publisher's base model
    if args.base:
        base_dir = Path(args.base)
        base = load_components(base_dir)
    else:
        base_dir = work / "base"
        stages.say("pretraining the publisher's base model")
        torch.set_num_threads(max(2, args.threads))  # nothing else runs yet: both cores for the base
        base = pretrain_base(world, base_dir, steps=plan.base_steps, batch_size=plan.base_batch, lr=plan.base_lr,
                             progress=progress)
        torch.set_num_threads(args.threads)
    base_tag = json.loads((base_dir / "recipe.json").read_text()) if (base_dir / "recipe.json").is_file() \
        else str(base_dir)

    # 3. the masks of every setting
    stages.say("making the publisher's masks")
    makers = {s.name: MaskMaker(world, s, base, work / "masks", user_lr=plan.user_lr, user_batch=plan.user_batch,
                                steps=plan.mask_steps, bootstrap_steps=plan.bootstrap_steps,
                                lock_steps=plan.user_steps, oracle_steps=plan.user_steps) for s in world.settings}
    caps = plan.kind == "caps"
    specs = cap_specs(plan) if caps else mask_specs(plan)
    todo = []
    for s in world.settings:
        for label, spec, per_seed in specs:
            for seed in (plan.seeds if per_seed else (spec.seed,)):
                sp = dataclasses.replace(spec, seed=seed)
                if not (per_seed and s is not world.settings[0]):  # random masks: the first setting's
                    todo.append((s, label, sp))
    _make_masks(todo, makers, plan, world_kw, base_dir, work, args.workers, progress)
    masks: dict[str, dict[str, Any]] = {}
    for s, label, sp in todo:
        mk = makers[s.name]
        path = mk.get(sp)  # made above: read from the cache
        m = mk.load(sp)
        masks.setdefault(s.name, {})[sp.name] = {"label": label, "path": str(path), "spec": dataclasses.asdict(sp),
                                                 "stats": _mask_stats(m, base.unet)}
        info = mk.root / f"{sp.name}.info.json"
        made = json.loads(info.read_text()) if info.is_file() else {}
        for key in ("convergence", "rounds"):  # how a learned mask converged; what each lock round captured
            if key in made:
                masks[s.name][sp.name][key] = made[key]

    def mask_path(setting, spec) -> str:
        owner = world.settings[0] if spec.source == "random" else setting
        return str(makers[owner.name].path(spec))

    # 4. base evaluation and the simulated users
    stages.say("simulated users")
    ctx = Context(base=str(base_dir), recogniser=str(rec_dir), world=world_kw, threads=args.threads)
    runner = Runner(ctx, work / "runs", args.workers, json.dumps(base_tag, sort_keys=True, default=str), progress)
    base_eval = _evaluate_base(world, base, rec_dir, plan)
    job_list = (cap_jobs if caps else jobs)(plan, world.settings, mask_path)
    runs = runner.run(job_list, desc=f"users ({len(job_list)} jobs)")
    sel = _selectivity(plan, world, makers, work, base_tag, stages) if caps else {}
    stages.done()
    return {"stage_seconds": stages.seconds, "suite": plan.name, "plan": plan.to_dict(), "world": world.describe(), "recogniser": report.to_dict(),
            "base": {"dir": str(base_dir), "recipe": base_tag, "eval": base_eval,
                     "params": sum(p.numel() for p in base.unet.parameters()),
                     "tensors": len(list(base.unet.parameters()))},
            "settings": [dataclasses.asdict(s) for s in world.settings], "masks": masks, "runs": runs,
            "selectivity": sel,
            "threads": args.threads, "workers": args.workers}


def _selectivity(plan, world, makers, work: Path, base_tag, stages) -> dict[str, Any]:
    """How much of an unguarded user's illegal and legal update each guard would block."""
    import hashlib

    from guard_caps import guards
    from guard_selectivity import selectivity

    stages.say("selectivity of each guard")
    by_setting, files = {}, {}
    for s in world.settings:
        lst = []
        for label, spec, _ in guards(plan):
            owner = world.settings[0] if spec.source == "random" else s
            sp = dataclasses.replace(spec, seed=plan.seeds[0]) if spec.source == "random" else spec
            lst.append((label, makers[owner.name].load(sp)))
            files[f"{s.name}/{label}"] = hashlib.sha256(makers[owner.name].path(sp).read_bytes()).hexdigest()
        by_setting[s.name] = lst
    recipe = json.dumps({"base": base_tag, "masks": files, "lr": plan.user_lr, "steps": plan.user_steps,
                         "batch": plan.user_batch}, sort_keys=True, default=str)
    return selectivity(makers, by_setting, work / "selectivity.json", recipe)


def _make_masks(todo, makers, plan, world_kw, base_dir: Path, work: Path, workers: int, progress: bool) -> None:
    """Make every missing mask, one setting per worker process (each learner is single-threaded)."""
    missing: dict[str, list] = {}
    for s, _, sp in todo:
        mk = makers[s.name]
        if not (mk.path(sp).is_file() and mk.stamp(sp).is_file() and mk.stamp(sp).read_text() == mk._recipe(sp)):
            missing.setdefault(s.name, []).append(sp)
    if not missing:
        return
    jobs = [(name, specs, plan, world_kw, str(base_dir), str(work)) for name, specs in missing.items()]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(v) for v in missing.values()), desc="masks", unit="mask", dynamic_ncols=True)
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            _mask_worker(j)
            if bar:
                bar.update(len(j[1]))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            for fut in cf.as_completed([pool.submit(_mask_worker, j) for j in jobs]):
                n = fut.result()
                if bar:
                    bar.update(n)
    if bar:
        bar.close()


def _mask_worker(job) -> int:
    name, specs, plan, world_kw, base_dir, work = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from guard_masks import MaskMaker
    from guard_setup import build_world

    from freezeasguard.engine.model.components import load_components

    world = build_world(**world_kw)
    setting = next(s for s in world.settings if s.name == name)
    mk = MaskMaker(world, setting, load_components(base_dir), Path(work) / "masks", user_lr=plan.user_lr,
                   user_batch=plan.user_batch, steps=plan.mask_steps, bootstrap_steps=plan.bootstrap_steps,
                   lock_steps=plan.user_steps)
    for sp in specs:
        mk.get(sp)
    return len(specs)


def _mask_stats(mask, unet) -> dict[str, Any]:
    from guard_summary import where_frozen, where_locked
    from simusers import LockedGuard

    from freezeasguard.engine.guard.mask import FreezeMask

    if isinstance(mask, LockedGuard):
        st = mask.mask.stats()
        c = mask.lock.counts(unet)
        return {"tensors": st.tensor_ratio, "params": st.param_ratio, "frozen_params": st.frozen_params,
                "locked_tensors": c["tensors"], "locked_dof": c["dof"], "locked_matrix_share": c["matrix_ratio"],
                "locked_share": c["ratio"], "where": where_frozen(mask.mask, unet),
                "where_locked": where_locked(mask.lock, unet)}
    if isinstance(mask, FreezeMask):
        st = mask.stats()
        stats = {"tensors": st.tensor_ratio, "params": st.param_ratio, "frozen_tensors": st.frozen_tensors,
                 "frozen_params": st.frozen_params}
    else:
        st = mask.stats()
        stats = {"tensors": st["tensors"]["whole"] / st["tensors"]["total"], "params": st["params"]["ratio"],
                 "frozen_params": st["params"]["frozen"], "rows": st["groups"]}
    stats["where"] = where_frozen(mask, unet)
    return stats


def _evaluate_base(world, base, rec_dir: Path, plan) -> dict[str, Any]:
    """The base model's recognition rate for each domain's prompt (before any user)."""
    from efficacy import load_recogniser, recognise

    from freezeasguard.engine.model.sampling import generate

    rec, report = load_recogniser(rec_dir)
    out = {}
    doms = sorted({d for s in world.settings for d in (s.illegal, s.innocent, s.legal)})
    for d in doms:
        imgs = generate(base, [world.prompts[d]] * plan.samples, steps=plan.sample_steps, seed=10_000, batch_size=100)
        r = recognise(rec, report.classes, imgs, d)
        out[d] = {"rate": r["rate"], "mean_prob": r["mean_prob"], "predicted": r["predicted"],
                  "images": imgs[:plan.grid_images]}
    return out


class _Stages:
    """Prints each stage as it starts and records how long each one took (``seconds``)."""

    def __init__(self, progress: bool):
        self.progress, self.t0 = progress, time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._cur: tuple[str, float] | None = None

    def say(self, what: str) -> None:
        now = time.perf_counter()
        self.done(now)
        self._cur = (what, now)
        if self.progress:
            print(f"[{now - self.t0:6.0f} s] {what}", flush=True)

    def done(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self._cur is not None:
            self.seconds[self._cur[0]] = now - self._cur[1]
            self._cur = None
