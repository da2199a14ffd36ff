"""Turning a guard into a training setup: which tensors the optimizer sees, and which optimizer.

* ``full``: every UNet tensor trainable, torch AdamW (the baseline).
* ``naive``: ``requires_grad_(False)`` on frozen tensors, torch AdamW handed *all* parameters,
  frozen weights kept in fp32 (what a hand-written freezing script does).
* ``engine``: the tensor guard enforced in full (``guard.tensor.enforce``: frozen tensors out of
  autograd, held in bf16 under bf16 autocast, frozen convs without saved input), and the trainable
  tensors as views of one flat buffer stepped by ``FlatAdamW`` (``optim.flat``), with fp32, bf16 or
  8-bit moments (``train.optimizer_states``), optionally updated inside backward with no gradient
  buffer (``train.update_in_backward``, ``optim.inbackward``), and the frozen prefix of the forward
  run under no_grad (``freeze.prefix_skip``, ``guard.prefix``).

A manifest with direction locks (``guard.subspace``) adds them to any mode with a manifest: the
flat buffer projects locked tensors' updates inside its step; torch AdamW and 8-bit AdamW get step
hooks that do the same (``optim.project``).

Under ``train.parallel=fsdp`` (``train.fsdp``) the UNet is sharded between the freeze and the
optimizer, which then steps this process's shards.

The base values of frozen tensors held in bf16 are kept on disk, not in RAM (``guard.originals``),
so that the exported model carries them bit for bit, and every job ends with ``verify``: each frozen tensor is compared with the
manifest's SHA-256, and each locked tensor's residual along its locked directions with its fp32
tolerance, before a final model may be written.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from freezeasguard.engine.config import FinetuneConfig
from freezeasguard.engine.errors import ConfigError, TrainingError
from freezeasguard.engine.guard.prefix import install_prefix_skip
from freezeasguard.engine.guard.tensor import TensorGuard, build_mask, enforce, frozen_storage_dtype
from freezeasguard.engine.model.families import family_of
from freezeasguard.engine.optim.factory import make_optimizer
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.optim.groups import describe_groups, param_groups
from freezeasguard.engine.optim.inbackward import InBackwardAdamW
from freezeasguard.engine.optim.project import register_lock_hooks
from freezeasguard.engine.train.fsdp import Parallel

log = logging.getLogger("freezeasguard")


class Wired(NamedTuple):
    """What a wiring hands the trainer, in one value so that none of it can be left behind.

    ``guard``: the freeze in force, which the trainer proves before it writes a final model and
    whose originals it exports (None: the wiring froze nothing it can prove); ``named``: the
    trainable tensors by name; ``optimizer``: the optimizer over them.
    """

    guard: TensorGuard | None
    named: list[tuple[str, nn.Parameter]]
    optimizer: Any


def as_wired(result: Any) -> Wired:
    """A wiring's result as ``Wired``; a bare ``(named, optimizer)`` pair is a wiring without a guard."""
    if isinstance(result, Wired):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        return Wired(None, *result)
    raise TrainingError(f"a wiring returns Wired(guard, named, optimizer) (engine.train.wiring), got "
                        f"{type(result).__name__}")


def log_wiring(wired: Wired, mode: str) -> None:
    """What the default wiring set up: the freeze, the locks, the optimizer's groups."""
    guard, opt = wired.guard, wired.optimizer
    if guard is not None and guard.mask is not None:
        log.info("freeze (%s): %s; %d frozen convs without saved input; frozen prefix run without autograd: %s",
                 mode, guard.mask.summary(), guard.frozen_convs, ", ".join(guard.prefix) or "none")
    if guard is not None and guard.lock is not None:
        log.info("direction locks: %d tensors, %s locked degrees of freedom", len(guard.lock), f"{guard.lock.dof:,}")
    log.info(opt.describe() if hasattr(opt, "describe") else describe_groups(opt.param_groups))


def apply_freeze(cfg: FinetuneConfig, unet: nn.Module, device: torch.device,
                 parallel: Parallel | None = None) -> Wired:
    """Freeze per ``cfg.freeze`` and build the optimizer: the guard, the named trainable tensors
    and the optimizer.

    ``parallel`` (``train.fsdp``): shards the UNet once the freeze is enforced, and gives the flat
    AdamW over the shards; the named trainable tensors are then the sharded parameters."""
    fc, tc = cfg.freeze, cfg.train
    mask, manifest = build_mask(fc, unet, seed=tc.seed)
    lock = manifest.load_lock(fc.manifest) if manifest is not None and fc.manifest else None
    if lock is not None and parallel is not None and parallel.sharded:
        raise ConfigError("the manifest's direction locks do not run under train.parallel=fsdp (a lock projects "
                          "the update of a whole matrix; a process holds rows of it): use train.parallel=ddp")
    guard = TensorGuard(fc.mode, mask, manifest, lock=lock)
    guard.take_anchors(unet)
    frozen = set(guard.frozen_names)
    bases = lock.bases() if lock is not None else {}
    if fc.mode in ("full", "naive"):
        enforce(guard, unet)
        if parallel is not None:
            parallel.shard(unet)
        named = [(n, p) for n, p in unet.named_parameters() if n not in frozen]
        # naive: the optimizer is handed every parameter, as a script calling
        # AdamW(unet.parameters()) does; frozen ones simply never get a gradient.
        groups = param_groups(list(unet.named_parameters()) if fc.mode == "naive" else named, tc.weight_decay)
        opt = make_optimizer(groups, tc, device)
        if bases:
            register_lock_hooks(opt, named, bases)
        return Wired(guard, named, opt)

    enforce(guard, unet, frozen_dtype=frozen_storage_dtype(fc, tc.mixed_precision), frozen_conv=fc.frozen_conv)
    if parallel is not None:
        parallel.shard(unet)
    named = [(n, p) for n, p in unet.named_parameters() if n not in frozen]
    if not named:
        raise ConfigError("the mask freezes every UNet tensor: nothing is left to train")
    if tc.optimizer == "adamw8bit":
        opt = make_optimizer(param_groups(named, tc.weight_decay), tc, device)
        if bases:
            register_lock_hooks(opt, named, bases)
    else:
        kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=tc.weight_decay, locks=bases,
                  states=tc.optimizer_states, seed=tc.seed)
        opt = InBackwardAdamW(named, max_grad_norm=tc.max_grad_norm, **kw) if tc.update_in_backward \
            else parallel.flat_adamw(unet, named, **kw) if parallel is not None else FlatAdamW(named, **kw)
    if fc.prefix_skip:
        guard.prefix = install_prefix_skip(unet, frozen, family_of(unet).forward_stages(unet))
    return Wired(guard, named, opt)
