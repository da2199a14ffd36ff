"""Simulated users: the service's fine-tuning (``train.trainer.Trainer``) of a base model under a guard.

``user_trainer`` builds the Trainer a user's job gets, on a private copy of the base UNet:

* no guard: full fine-tuning (``freeze.mode=full``);
* a ``FreezeMask`` (whole tensors): the engine's own path, ``freeze.mode=engine`` with a manifest
  built for the base, exactly what a guarded job runs;
* a ``RowMask`` (output rows): *masked parameter updates* (``MaskedAdamW``): every tensor stays
  in the optimizer, the gradients of frozen rows are zeroed before clipping (so the clip norm
  counts trainable entries only, as the engine's does), and after every step the frozen rows are
  written back from the base bit for bit (AdamW's weight decay would otherwise move them);
* a ``LockedGuard`` (a manifest with direction locks, optionally with a tensor mask): the engine's
  own path, ``freeze.mode=engine`` with that manifest (updates of locked tensors projected in the
  step, the lock proven after the job);
* ``method='lora'``: peft adapters on the modules the policy allows, i.e. those none of whose
  own tensors (for a row mask: rows) is frozen; every base tensor stays fixed. Under a lock the
  adapters of locked modules are projected (``B`` off ``U``, ``A`` off ``V``) after every step.

The caller drives ``trainer.fit(steps)`` in stages and evaluates in between.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rowmask import RowMask
from torch import nn

from freezeasguard.engine.config import resolve
from freezeasguard.engine.errors import FreezeAsGuardError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import SubspaceLock
from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.data import ImageDataset
from freezeasguard.engine.optim.groups import param_groups
from freezeasguard.engine.service.lora import LoraWiring, resolve_lora_targets
from freezeasguard.engine.service.spec import DEFAULT_LORA_TARGETS, LoraSpec
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.engine.train.wiring import Wired


@dataclass(frozen=True)
class LockedGuard:
    """A manifest with direction locks: its file (the locks file beside it), mask and lock."""

    manifest: str
    mask: FreezeMask
    lock: SubspaceLock

    @classmethod
    def load(cls, path: str | Path, unet: nn.Module) -> "LockedGuard":
        man = Manifest.load(path)
        return cls(str(path), man.mask(unet), man.load_lock(path))


Guard = FreezeMask | RowMask | LockedGuard | None


class UserError(FreezeAsGuardError, ValueError):
    """A simulated user that cannot be set up as asked."""


@dataclass(frozen=True)
class UserBudget:
    """What a user's job may spend: optimizer steps, learning rate and batch (AdamW, clip 1.0)."""

    steps: int
    lr: float
    batch_size: int
    seed: int = 0


class MaskedAdamW(torch.optim.AdamW):
    """torch AdamW whose steps leave the frozen entries of each tensor bit-identical to the base.

    Args:
        named: (name, parameter) pairs, all of them in the optimizer.
        frozen: name -> bool tensor shaped like the parameter (True = frozen); tensors without
            an entry are fully trainable.
        **kw: torch.optim.AdamW arguments (``params`` is built from ``named``).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], frozen: dict[str, torch.Tensor],
                 groups: list[dict], **kw):
        super().__init__(groups, **kw)
        params = dict(named)
        self.frozen = {n: m.to(params[n].device) for n, m in frozen.items() if bool(m.any())}
        self.base = {n: params[n].detach().clone() for n in self.frozen}
        self.params = {n: params[n] for n in self.frozen}
        self.hooks = [params[n].register_hook(_zero_where(m)) for n, m in self.frozen.items()]

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for n, p in self.params.items():
            p.copy_(torch.where(self.frozen[n], self.base[n], p))
        return out


def _zero_where(mask: torch.Tensor):
    keep = (~mask)

    def hook(g: torch.Tensor) -> torch.Tensor:
        return g * keep.to(g.dtype)

    return hook


class MaskedUpdateWiring:
    """Trainer wiring for a row mask: every tensor trainable, MaskedAdamW enforcing the rows."""

    def __init__(self, mask: RowMask, weight_decay: float, betas: tuple[float, float], eps: float, lr: float):
        self.mask, self.kw = mask, dict(lr=lr, betas=betas, eps=eps)
        self.weight_decay = weight_decay
        self.optimizer: MaskedAdamW | None = None

    def __call__(self, unet: nn.Module) -> Wired:
        named = list(unet.named_parameters())
        frozen = {n: self.mask.element_mask(n) for n, _ in named}
        self.optimizer = MaskedAdamW(named, frozen, param_groups(named, self.weight_decay), **self.kw)
        return Wired(None, named, self.optimizer)  # rows, not tensors: no TensorGuard can prove them


def lora_modules(unet: nn.Module, guard: Guard, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> list[str]:
    """Modules matching ``targets`` that the policy lets a LoRA job adapt under ``guard``."""
    if guard is None:
        mask = FreezeMask.from_names(unet, [])
    elif isinstance(guard, LockedGuard):
        mask = guard.mask  # locked modules may take an adapter (projected); frozen ones may not
    elif isinstance(guard, RowMask):
        names = [n for n, _ in unet.named_parameters()]
        mask = FreezeMask.from_names(unet, guard.touched(names))  # any frozen row refuses the module
    else:
        mask = guard
    return resolve_lora_targets(unet, mask, list(targets)).modules


def user_trainer(base: Components, dataset: ImageDataset, guard: Guard, budget: UserBudget, work: str | Path, *,
                 method: str = "full", lora_rank: int = 4, lora_alpha: float = 4.0,
                 lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS, num_threads: int | None = None):
    """The service's Trainer for one simulated user, on a copy of ``base``'s UNet.

    Args:
        guard: None (full fine-tuning), a FreezeMask (engine path with a manifest) or a RowMask
            (masked updates).
        budget: steps (the Trainer's horizon; drive it with ``fit(k)``), lr, batch, seed.
        work: a scratch folder for the job's config, log and manifest.
        method: 'full' or 'lora'.
    Returns:
        (trainer, info) where info says what the user could train.
    """
    if method not in ("full", "lora"):
        raise UserError(f"method must be 'full' or 'lora', got {method!r}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    comps = dataclasses.replace(base, unet=copy.deepcopy(base.unet))
    over = [f"train.steps={budget.steps}", f"train.lr={budget.lr}", f"train.batch_size={budget.batch_size}",
            f"train.seed={budget.seed}", "train.progress=false", "train.log_every=1000000",
            "train.checkpoint_every=null", f"out_dir={work}"]
    if num_threads:
        over.append(f"train.num_threads={num_threads}")
    info: dict = {"method": method, "guard": type(guard).__name__ if guard is not None else "none"}
    wiring = None
    if method == "lora":
        cfg = resolve(overrides=over)
        mods = lora_modules(comps.unet, guard, lora_targets)
        info["lora_modules"] = len(mods)
        if not mods:
            raise UserError("no module is open to LoRA under this guard")
        if isinstance(guard, LockedGuard):
            wiring = LoraWiring(mods, LoraSpec(rank=lora_rank, alpha=lora_alpha), cfg.train,
                                manifest=Manifest.load(guard.manifest), lock=guard.lock)
        else:
            wiring = LoraWiring(mods, LoraSpec(rank=lora_rank, alpha=lora_alpha), cfg.train)
    elif isinstance(guard, LockedGuard):
        over += ["freeze.mode=engine", f"freeze.manifest={guard.manifest}"]
        cfg = resolve(overrides=over)
    elif isinstance(guard, FreezeMask):
        path = work / "manifest.json"
        Manifest.build(comps.unet, guard, provenance={"method": "bench"}).save(path)
        over += ["freeze.mode=engine", f"freeze.manifest={path}"]
        cfg = resolve(overrides=over)
    elif isinstance(guard, RowMask):
        cfg = resolve(overrides=over)
        tc = cfg.train
        wiring = MaskedUpdateWiring(guard, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, tc.lr)
    else:
        cfg = resolve(overrides=over)
    trainer = Trainer(cfg, components=comps, dataset=dataset, wiring=wiring)
    info["trainable_params"] = sum(p.numel() for _, p in trainer.named_trainable)
    return trainer, info
