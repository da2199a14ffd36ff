"""What a mask-learning step costs next to a plain fine-tuning step (``bench/run.py masklearn``)."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from freezeasguard.engine.learn.learner import MaskLearner
from freezeasguard.engine.optim.groups import param_groups


def mask_step_cost(learner: MaskLearner, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median time of a simulated-user step, a mask step and a plain fine-tuning step.

    The plain step is what the service runs: the same model, batch and loss, every tensor
    trainable, torch AdamW (fused on CUDA) with clipping. It runs on a deep copy of the model;
    the learner's state advances (use a throwaway learner). Steps are interleaved so that host
    noise hits all three alike.

    Returns:
        seconds per step (``plain_s``, ``user_s``, ``mask_s``, ``cycle_s`` = the average step of
        a ``mask.every`` cycle), their ratios to ``plain_s``, the update-only parts
        (``plain_update_s``: clip + AdamW; ``user_update_s``: clip + flat bilevel update), and
        the conditions.
    """
    cfg, u, dev = learner.cfg, learner.cfg.user, learner.device
    plain = copy.deepcopy(learner.model)
    for p in plain.parameters():
        p.grad = None
    named = list(plain.named_parameters())
    opt = torch.optim.AdamW(param_groups(named, u.weight_decay), lr=u.lr, betas=(u.beta1, u.beta2),
                            eps=u.eps, fused=dev.type == "cuda")

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def plain_step(s: int) -> tuple[float, float]:
        t0 = sync()
        idx, draws, coefs = learner.step_inputs(s)
        opt.zero_grad(set_to_none=True)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        with amp:
            losses = learner.task.losses(plain, idx, draws).float()
        (losses * coefs[0]).sum().backward()
        t1 = sync()
        if u.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), u.max_grad_norm)
        opt.step()
        return sync() - t0, sync() - t1

    def user_step(s: int) -> tuple[float, float]:
        t0 = sync()
        learner.backward(s, publisher=False)
        t1 = sync()
        learner.user_update()
        return sync() - t0, sync() - t1

    def mask_step(s: int) -> tuple[float, float]:
        t0 = sync()
        learner.backward(s, publisher=True)
        t1 = sync()
        learner.mask_update(learner.reduced_dots())
        return sync() - t0, sync() - t1

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "user": [], "mask": []}
    for r in range(warmup + repeats):
        for name, fn in (("plain", plain_step), ("user", user_step), ("mask", mask_step)):
            t = fn(r)
            if r >= warmup:
                times[name].append(t)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    upd = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    every = cfg.mask.every
    cycle = ((every - 1) * med["user"] + med["mask"]) / every
    n_params = sum(learner.layout.numels)
    return {
        "plain_s": med["plain"], "user_s": med["user"], "mask_s": med["mask"], "cycle_s": cycle,
        "ratio_user": med["user"] / med["plain"], "ratio_mask": med["mask"] / med["plain"],
        "ratio_cycle": cycle / med["plain"],
        "plain_update_s": upd["plain"], "user_update_s": upd["user"], "mask_update_s": upd["mask"],
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": u.batch_size,
        "tensors": len(learner.layout), "params": n_params, "mixed_precision": cfg.mixed_precision,
        "repeats": repeats,
    }
