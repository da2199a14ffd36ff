"""Does a stronger logit optimizer make the learned mask converge? (a guard-benchmark diagnostic)

    python bench/guard_optim.py                 # needs the default suite's base: run `bench/run.py guard` first
    python bench/guard_optim.py --quick         # two variants, 20 steps: a smoke run

For each setting of the default suite, learns the headline mask (30% of parameters) from the
default base with the simulated user starting at the base, under several logit optimizers, and
reports the soft mask's state at the end: mean(m) against the budget, the shares of tensors and
parameters with m > 1/2, the logits' range and ``learn.diagnostics.convergence``. Writes
``mask_optimizers.json`` and ``mask_optimizers.md`` under ``--out`` (default:
``bench/results/guard/``). The two settings run in parallel, one single-threaded process each.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("Adam lr 0.05 (the default)", {}),
    ("Adam lr 0.5", {"mask.lr": 0.5}),
    ("Adam lr 0.5, c = 50", {"mask.lr": 0.5, "mask.penalty": 50.0}),
    ("Adam lr 0.5, 1,000 steps", {"mask.lr": 0.5, "steps": 1000}),
    ("SGD lr 1 (the paper's optimizer)", {"mask.optimizer": "sgd", "mask.lr": 1.0}),
    ("SGD lr 30", {"mask.optimizer": "sgd", "mask.lr": 30.0}),
    ("SGD lr 1000", {"mask.optimizer": "sgd", "mask.lr": 1000.0}),
]
QUICK = [VARIANTS[0], VARIANTS[4]]


def _setting_worker(args: tuple[str, str, list, int, float]) -> list[dict[str, Any]]:
    """Learn every variant's mask in one setting (a worker process)."""
    setting_name, base_dir, variants, steps, budget = args
    import torch

    torch.set_num_threads(1)
    from guard_masks import MaskMaker, MaskSpec
    from guard_plan import DEFAULT
    from guard_setup import build_world

    from freezeasguard.engine.learn.diagnostics import convergence
    from freezeasguard.engine.model.components import load_components

    world = build_world()
    setting = {s.name: s for s in world.settings}[setting_name]
    base = load_components(base_dir)
    maker = MaskMaker(world, setting, base, Path(base_dir).parent / "optim-masks", user_lr=DEFAULT.user_lr,
                      user_batch=DEFAULT.user_batch, steps=steps, bootstrap_steps=0)
    rows = []
    for label, variant in variants:
        spec = MaskSpec("learned", budget, seed=DEFAULT.mask_seed, variant={"bootstrap_steps": 0, **variant})
        t0 = time.perf_counter()
        learner = maker.learner(spec)
        learner.fit()
        x = learner.logits.detach()
        rows.append({"setting": setting_name, "label": label, "variant": spec.variant,
                     "steps": learner.step, "seconds": time.perf_counter() - t0, **learner.mask_stats(),
                     "logits": {"min": float(x.min()), "median": float(x.median()), "max": float(x.max())},
                     "convergence": convergence(learner)})
        print(f"[{setting_name}] {label}: {learner.step} steps in {rows[-1]['seconds']:.0f} s, "
              f"mean(m) {rows[-1]['mean_m']:.3g}", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], budget: float) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["label"], {})[r["setting"]] = r
    settings = sorted({r["setting"] for r in rows}, key=lambda s: (s != "same", s))
    L = ["# Logit optimizers of the mask learner: does the soft mask converge?", "",
         f"Default base, headline budget rho = {budget:.2f} of parameters, simulated user from the base "
         f"(no bootstrap), T = 0.2. Values per setting: {' / '.join(settings)}.", "",
         "| logit optimizer | mean(m) at the end | tensors with m > 1/2 | params with m > 1/2 | decisive | logits min / max |",
         "|---|---|---|---|---|---|"]
    for label, per in by.items():
        cells = [" / ".join(f"{per[s]['mean_m']:.3g}" for s in settings if s in per),
                 " / ".join(f"{100 * per[s]['hard_tensors']:.1f}%" for s in settings if s in per),
                 " / ".join(f"{100 * per[s]['hard_params']:.1f}%" for s in settings if s in per),
                 " / ".join(f"{100 * per[s]['convergence']['decisive']:.0f}%" for s in settings if s in per),
                 " / ".join(f"{per[s]['logits']['min']:.3g} .. {per[s]['logits']['max']:.3g}" for s in settings
                            if s in per)]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/guard/default", help="the default suite's work dir (its base/)")
    p.add_argument("--out", default=str(BENCH / "results" / "guard"))
    p.add_argument("--quick", action="store_true", help="two variants, 20 steps")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    from common import conditions, conditions_markdown, refuse_dirty_results
    refuse_dirty_results(args.out)
    from guard_plan import DEFAULT

    from freezeasguard.engine.io import atomic_write_json, atomic_write_text

    base_dir = Path(args.work) / "base"
    if not (base_dir / "model_index.json").is_file():
        raise SystemExit(f"no base model under {base_dir}: run `python bench/run.py guard` first "
                         "(or pass --work with a suite's work dir)")
    variants, steps = (QUICK, 20) if args.quick else (VARIANTS, DEFAULT.mask_steps)
    jobs = [(name, str(base_dir), variants, steps, DEFAULT.headline) for name in ("same", "diff")]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.workers <= 1:
        for j in jobs:
            rows += _setting_worker(j)
    else:
        with cf.ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(_setting_worker, j) for j in jobs]:
                rows += fut.result()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cond = conditions(torch_threads=1, workers=min(args.workers, len(jobs)), base=str(base_dir))  # 1 per worker
    res = {"budget": DEFAULT.headline, "steps": steps, "user": {"lr": DEFAULT.user_lr, "batch": DEFAULT.user_batch},
           "rows": rows, "wall_seconds": time.perf_counter() - t0, "conditions": cond}
    md = markdown(rows, DEFAULT.headline) + "\n" + conditions_markdown(cond) + "\n"
    atomic_write_json(out / "mask_optimizers.json", res)
    atomic_write_text(out / "mask_optimizers.md", md)
    print(md)
    print(f"written: {out / 'mask_optimizers.json'}, {out / 'mask_optimizers.md'} ({res['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
