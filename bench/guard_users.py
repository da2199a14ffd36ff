"""Simulated users as jobs: one job = one fine-tune of the base under one guard, evaluated at
several step counts. Jobs run in a pool of single-threaded worker processes (tiny models run
much faster one thread each than two threads on one job) and their results are cached by a hash
of everything that determines them, so a rerun only runs what changed.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Job:
    """One simulated user.

    Attributes:
        setting: whose masks (``same``/``diff``); full fine-tuning is the same in both.
        domain: the domain the user fine-tunes on and is evaluated on.
        role: 'illegal' or 'legal'.
        condition: label of the guard ('full', 'random', 'learned', ...).
        mask: mask file ('' for none); granularity says how to read it.
        eval_at: step counts at which the model is evaluated (the last one is the horizon).
    """

    setting: str
    domain: str
    role: str
    condition: str
    budget: float
    by: str
    granularity: str
    mask: str
    lr: float
    batch_size: int
    eval_at: tuple[int, ...]
    seed: int
    method: str = "full"
    lora_rank: int = 4  # LoRA users: rank (alpha = rank, i.e. scaling 1)
    samples: int = 200
    sample_steps: int = 10
    heldout_draws: int = 4
    keep_images: int = 0  # how many of the last evaluation's images to return (sample grids)
    tags: tuple[str, ...] = field(default=(), compare=False)

    def key(self, base_tag: str, mask_tag: str) -> str:
        d = dataclasses.asdict(self)
        d.pop("tags")
        d["mask"] = mask_tag
        return hashlib.sha256(json.dumps([d, base_tag], sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Context:
    """What every worker needs to run a job (paths, so it pickles cheaply)."""

    base: str
    recogniser: str
    world: dict[str, Any]  # build_world kwargs
    threads: int = 1


_STATE: dict[str, Any] = {}


def _init(ctx: Context) -> None:
    """Worker initialiser: one thread, the world, base model and recogniser loaded once."""
    torch.set_num_threads(ctx.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("freezeasguard").setLevel(logging.WARNING)
    from efficacy import load_recogniser
    from guard_setup import build_world

    from freezeasguard.engine.model.components import load_components

    _STATE["world"] = build_world(**ctx.world)
    _STATE["base"] = load_components(ctx.base)
    _STATE["rec"] = load_recogniser(ctx.recogniser)


def run_job(job: Job) -> dict[str, Any]:
    """Fine-tune, evaluating at each of ``job.eval_at``; returns the curve (and images)."""
    from efficacy import heldout_loss, recognise
    from rowmask import RowMask
    from simusers import LockedGuard, UserBudget, user_trainer

    from freezeasguard.engine.guard.mask import FreezeMask
    from freezeasguard.engine.model.encode import encode_dataset
    from freezeasguard.engine.model.sampling import generate

    world, base = _STATE["world"], _STATE["base"]
    rec, report = _STATE["rec"]
    guard = None
    if job.mask and "directions" in job.granularity:
        guard = LockedGuard.load(job.mask, base.unet)
    elif job.mask:
        guard = RowMask.load(job.mask) if job.granularity == "rows" else FreezeMask.from_file(job.mask, base.unet)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        budget = UserBudget(max(job.eval_at), job.lr, job.batch_size, job.seed)
        trainer, info = user_trainer(base, world.user_train[job.domain], guard, budget, tmp, method=job.method,
                                     lora_rank=job.lora_rank, lora_alpha=float(job.lora_rank))
        held = encode_dataset(trainer.c, world.user_heldout[job.domain])
        prompt = world.prompts[job.domain]
        curve, images = [], None
        train_s = 0.0
        for s in sorted(job.eval_at):
            t1 = time.perf_counter()
            trainer.fit(s)
            train_s += time.perf_counter() - t1
            imgs = generate(trainer.c, [prompt] * job.samples, steps=job.sample_steps, seed=10_000 + job.seed,
                            batch_size=100)
            r = recognise(rec, report.classes, imgs, job.domain)
            r["heldout_loss"] = heldout_loss(trainer.c.unet, trainer.c.schedule, held, draws=job.heldout_draws,
                                             seed=job.seed)
            r["step"] = s
            r["train_loss"] = sum(h.loss for h in trainer.history[-20:]) / max(1, len(trainer.history[-20:]))
            curve.append(r)
            trainer.c.unet.train()
            if s == max(job.eval_at) and job.keep_images:
                images = imgs[:job.keep_images].clone()
        verify = trainer.verify_frozen()
        if isinstance(guard, RowMask):  # masked updates: every frozen row must equal the base
            live = dict(trainer.c.unet.named_parameters())
            ok = all(torch.equal(live[n].detach()[guard.element_mask(n)], p.detach()[guard.element_mask(n)])
                     for n, p in base.unet.named_parameters())
            info["rows_verified"] = ok
    info.update(seconds=time.perf_counter() - t0, train_seconds=train_s,
                verified=None if verify is None else verify.ok,
                verify=None if verify is None else verify.summary())
    return {"job": dataclasses.asdict(job), "curve": curve, "info": info, "images": images}


class Runner:
    """Runs jobs in worker processes with a result cache under ``cache``."""

    def __init__(self, ctx: Context, cache: Path, workers: int, base_tag: str, progress: bool = True):
        self.ctx, self.cache, self.workers, self.base_tag = ctx, Path(cache), workers, base_tag
        self.progress = progress
        self.cache.mkdir(parents=True, exist_ok=True)

    def _mask_tag(self, job: Job) -> str:
        if not job.mask:
            return ""
        return hashlib.sha256(Path(job.mask).read_bytes()).hexdigest()[:16]

    def run(self, jobs: list[Job], desc: str = "users", on_done: Callable[[dict], None] | None = None) -> list[dict]:
        """Results in the order of ``jobs`` (cached ones are not rerun)."""
        results: dict[int, dict] = {}
        todo = []
        for i, j in enumerate(jobs):
            key = j.key(self.base_tag, self._mask_tag(j))
            f = self.cache / f"{key}.pt"
            if f.is_file():
                results[i] = torch.load(f, weights_only=False)
                results[i]["cached"] = True
            else:
                todo.append((i, j, f))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), initial=len(results), desc=desc, unit="job", dynamic_ncols=True)
        if todo:
            if self.workers <= 1:
                _init(self.ctx)
                for i, j, f in todo:
                    results[i] = self._store(run_job(j), f, bar)
            else:
                ctx = mp.get_context("spawn")
                with cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init,
                                            initargs=(self.ctx,)) as pool:
                    futs = {pool.submit(run_job, j): (i, f) for i, j, f in todo}
                    for fut in cf.as_completed(futs):
                        i, f = futs[fut]
                        results[i] = self._store(fut.result(), f, bar)
        if bar:
            bar.close()
        out = [results[i] for i in range(len(jobs))]
        for r, j in zip(out, jobs):
            r["tags"] = list(j.tags)
        return out

    def _store(self, res: dict, f: Path, bar) -> dict:
        tmp = f.with_suffix(".tmp")
        torch.save(res, tmp)
        os.replace(tmp, f)
        if bar:
            c = res["curve"][-1]
            bar.update(1)
            j = res["job"]
            bar.set_postfix_str(f"{j['condition']}/{j['domain']}: rate {c['rate']:.2f}")
        return res


def clear_cache(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)
