"""LoRA for guarded jobs, in one place: which modules may take an adapter, and the wiring that adds
the adapters and trains only them.

An adapter on a module changes that module's output exactly as changing its weights would (the
merged weight is ``W + (alpha / r) B A``), so a module may take one only if *every* one of its own
tensors is trainable under the guard. ``resolve_lora_targets`` turns a job's target patterns into
full module names and reports the modules that would undo the freeze; ``LoraWiring`` injects peft
adapters on exactly the approved modules (one anchored regex, so peft's own name matching cannot
widen the set) and hands the trainer the adapter tensors only, with the guard that proves the
base untouched.

A module under a direction lock may take an adapter: the wiring projects ``B`` off the locked
output directions and ``A`` off the locked input directions after every step (``U^T B = 0`` and
``A V = 0``, so every merged ``B A`` respects the lock), and proves it after the job from the
adapters themselves (``lock_residuals``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from freezeasguard.engine.config import TrainConfig
from freezeasguard.engine.errors import JobError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import LockResidual, SubspaceLock, residual_tolerance
from freezeasguard.engine.guard.tensor import TensorGuard, enforce
from freezeasguard.engine.optim.factory import make_optimizer
from freezeasguard.engine.optim.groups import param_groups
from freezeasguard.engine.optim.project import register_lock_hooks
from freezeasguard.engine.service.delta import lora_delta
from freezeasguard.engine.service.spec import LoraSpec
from freezeasguard.engine.train.wiring import Wired

# Module types an adapter can be attached to (peft LoRA layers for these wrap the base layer).
LORA_MODULE_TYPES = (nn.Linear, nn.Conv2d)
ADAPTER = "default"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _matches(pattern: str, name: str) -> bool:
    if _is_glob(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _leaf_names(adaptable: list[tuple[str, nn.Module]], limit: int = 16) -> str:
    """The distinct last parts of the adaptable modules' names ('to_q, to_k, to_out.0, ...'), for a refusal."""
    def leaf(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    leaves = list(dict.fromkeys(leaf(n) for n, _ in adaptable))
    more = f", ... ({len(leaves)} names)" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more


@dataclass
class LoraTargets:
    """What a job's LoRA target patterns resolve to under a mask.

    ``modules``: full names of the modules that may take an adapter, in model order. ``frozen``:
    one message per matched module that holds a frozen tensor (an adapter there would undo the
    freeze). ``unmatched``: one message per pattern that matches no adaptable module.
    """

    modules: list[str]
    frozen: list[str]
    unmatched: list[str]

    def problems(self, skip_frozen: bool = False) -> list[str]:
        """What refuses the job: unmatched patterns, frozen modules unless skipped, or no module left."""
        out = list(self.unmatched) + ([] if skip_frozen else list(self.frozen))
        if skip_frozen and not self.modules and not self.unmatched:
            out.append("every module the lora targets match holds a frozen tensor: nothing is left to adapt")
        return out


def resolve_lora_targets(unet: nn.Module, mask: FreezeMask, patterns: list[str]) -> LoraTargets:
    """Resolve LoRA target patterns to full module names of the denoiser ``unet`` (a UNet or a
    diffusion transformer: every ``nn.Linear`` and ``nn.Conv2d`` is adaptable, e.g. ``to_q``,
    ``add_q_proj``, ``ff.net.2``, ``proj_mlp``) and check them against ``mask``.

    A bare pattern matches modules named so or ending in ``.pattern``; a glob (with ``* ? [``) is
    matched against full module names. An adapter on a module changes that module's output exactly
    as changing its weights would, so a module may take one only if *every* one of its own tensors
    is trainable.
    """
    adaptable = [(n, m) for n, m in unet.named_modules() if isinstance(m, LORA_MODULE_TYPES)]
    chosen: dict[str, None] = {}
    frozen_msgs: list[str] = []
    unmatched: list[str] = []
    for pat in patterns:
        hits = [(n, m) for n, m in adaptable if _matches(pat, n)]
        if not hits:
            unmatched.append(f"lora target {pat!r} matches no Linear or Conv2d module of the "
                             f"{type(unet).__name__} (adapters go on the denoiser only; its adaptable modules are "
                             f"named {_leaf_names(adaptable)})")
            continue
        for n, m in hits:
            frozen = [f"{n}.{pn}" for pn, _ in m.named_parameters(recurse=False)
                      if f"{n}.{pn}" in mask.frozen_set]
            if frozen:
                frozen_msgs.append(f"lora target {n!r} (pattern {pat!r}) is a frozen module: "
                                   f"{', '.join(frozen)} frozen by the manifest; an adapter there "
                                   "would undo the freeze")
            else:
                chosen.setdefault(n, None)
    order = {n: i for i, (n, _) in enumerate(adaptable)}
    modules = sorted(chosen, key=order.__getitem__)
    return LoraTargets(modules, frozen_msgs, unmatched)


class LoraWiring:
    """Trainer wiring for LoRA: every base tensor fixed, adapters (seeded init) on ``modules`` only.

    Args:
        modules: full module names, already approved by ``resolve_lora_targets``.
        lora: rank, alpha, dropout.
        train: the job's train settings (optimizer, weight decay, seed).
        manifest: the freeze in force; with it the wiring returns a guard that the trainer proves
            after the job (frozen tensors bit for bit, the lock from the adapters), and
            ``frozen_conv`` runs frozen convolutions without saving their input.
        lock: direction locks; adapters on locked modules are projected after every step.
    """

    def __init__(self, modules: Sequence[str], lora: LoraSpec, train: TrainConfig, *,
                 manifest: Manifest | None = None, frozen_conv: bool = False, lock: SubspaceLock | None = None):
        if not modules:
            raise JobError("LoRA wiring: no module is open to an adapter under this guard")
        self.modules, self.lora, self.train = list(modules), lora, train
        self.manifest, self.frozen_conv = manifest, frozen_conv
        self.lock = lock
        self.locked_modules: list[str] = []

    def __call__(self, unet: nn.Module) -> Wired:
        guard = None
        if self.manifest is not None or self.lock is not None:
            mask = self.manifest.mask(unet) if self.manifest is not None else FreezeMask.from_names(unet, [])
            guard = TensorGuard("engine", mask, self.manifest, lock=self.lock)
            enforce(guard, unet, frozen_conv=self.frozen_conv)
            if self.lock is not None:
                guard.lock_check = self.lock_residuals
        unet.requires_grad_(False)  # LoRA trains adapters only, whatever the mask allows
        pattern = "^(?:" + "|".join(re.escape(m) for m in self.modules) + ")$"
        torch.manual_seed(self.train.seed)  # adapter init (kaiming A, zero B) is seeded
        lo = self.lora
        inject_adapter_in_model(LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                           target_modules=pattern), unet, adapter_name=ADAPTER)
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        stray = [n for n, _ in named if ".lora_" not in n]
        if stray or not named:
            raise JobError(f"LoRA wiring left non-adapter tensors trainable: {stray[:5]}" if stray
                           else "LoRA wiring found no adapter tensors")
        device = next(unet.parameters()).device
        opt = make_optimizer(param_groups(named, self.train.weight_decay), self.train, device)
        if self.lock is not None:
            bases = {}
            for m in self.modules:
                lk = self.lock.locks.get(f"{m}.weight")
                if lk is None:
                    continue
                self.locked_modules.append(m)
                if lk.out is not None:
                    bases[f"{m}.lora_B.{ADAPTER}.weight"] = (lk.out, None)
                if lk.inp is not None:
                    bases[f"{m}.lora_A.{ADAPTER}.weight"] = (None, lk.inp)
            if bases:  # B starts at zero; A is projected once now, both after every step
                register_lock_hooks(opt, named, bases, mode="whole")
        return Wired(guard, named, opt)

    @torch.no_grad()
    def lock_residuals(self, unet: nn.Module, steps: int) -> list[LockResidual]:
        """The lock's residual on every adapted locked module, from ``scaling * B A``."""
        params = dict(unet.named_parameters())
        scaling = self.lora.alpha / self.lora.rank
        out = []
        for m in self.locked_modules:
            lk = self.lock.locks[f"{m}.weight"]
            d = lora_delta(params[f"{m}.lora_A.{ADAPTER}.weight"], params[f"{m}.lora_B.{ADAPTER}.weight"], scaling)
            w0 = float(params[f"{m}.base_layer.weight"].detach().double().norm())
            dn = float(d.double().norm())
            out.append(LockResidual(f"{m}.weight", lk.energy(d) ** 0.5, residual_tolerance(steps, w0, dn), dn))
        return out

    @staticmethod
    def delta_name(name: str) -> str:
        """peft's 'm.lora_A.default.weight' -> 'm.lora_A.weight' (the delta file's naming)."""
        return name.replace(f".{ADAPTER}.", ".")
