"""Turning a freeze mask into savings: the three training modes and the flat trainable buffer.

* ``full``: every UNet tensor trainable, torch AdamW (the baseline).
* ``naive``: ``requires_grad_(False)`` on frozen tensors, torch AdamW handed *all* parameters,
  frozen weights kept in fp32 (what a hand-written freezing script does).
* ``engine``: frozen tensors leave autograd and the optimizer entirely; under bf16 autocast they
  are stored in bf16 (autocast would cast them at every use anyway, so the forward is unchanged;
  norm parameters, which autocast keeps in fp32, stay fp32); frozen convs run through an autograd function that does
  not save their input; trainable tensors are views of ONE contiguous fp32 buffer and their
  gradients views of ONE gradient buffer, so zeroing is one fill, the global norm one reduction
  and AdamW one kernel launch (Triton on CUDA, the eager reference on CPU).

The original fp32 values of frozen tensors are kept on the host so that the exported model carries
them bit for bit, and every job ends with ``verify``: each frozen tensor is compared with the
manifest's SHA-256 before a final model may be written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezeasguard.engine.config import FinetuneConfig
from freezeasguard.engine.manifest import Manifest, VerifyReport, verify_frozen
from freezeasguard.engine.mask import FreezeMask

log = logging.getLogger("freezeasguard")


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over one flat fp32 buffer that the trainable parameters are views of.

    Decay tensors (dim >= 2) come first, so weight decay applies to the range ``[0, decay_end)``.
    ``step()`` is a single call of ``freezeasguard.kernels.adamw.fused_adamw_``; the global
    gradient-clipping coefficient set by ``clip_grad_norm_`` is applied inside it (no extra pass
    over the gradients, no host sync on CUDA).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto"):
        if not named:
            raise ValueError("FlatAdamW needs at least one trainable tensor")
        ordered = [x for x in named if x[1].dim() >= 2] + [x for x in named if x[1].dim() < 2]
        device = ordered[0][1].device
        total = sum(p.numel() for _, p in ordered)
        flat = torch.empty(total, dtype=torch.float32, device=device)
        grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.segments: list[tuple[str, int, int]] = []
        off = 0
        with torch.no_grad():
            for name, p in ordered:
                n = p.numel()
                flat[off:off + n].copy_(p.detach().reshape(-1))
                p.data = flat[off:off + n].view_as(p)
                # autograd accumulates into an existing .grad in place, so these views stay live
                p.grad = grad[off:off + n].view_as(p)
                self.segments.append((name, off, n))
                off += n
        flat.grad = grad
        self.decay_end = sum(p.numel() for _, p in ordered if p.dim() >= 2)
        self.named = ordered
        # CUDA: the one-launch Triton kernel. CPU: torch's fused (vectorised, one pass) AdamW.
        self.backend = backend if backend != "auto" else ("triton" if device.type == "cuda" else "torch_fused")
        self._scale: torch.Tensor | None = None
        super().__init__([flat], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        st = self.state[flat]
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(flat)
        st["exp_avg_sq"] = torch.zeros_like(flat)

    @property
    def flat(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def describe(self) -> str:
        dec = [(n, p) for n, p in self.named if p.dim() >= 2]
        nod = [(n, p) for n, p in self.named if p.dim() < 2]
        return (f"flat optimizer groups: decay: {len(dec)} tensors, {self.decay_end:,} params; "
                f"no_decay: {len(nod)} tensors, {self.flat.numel() - self.decay_end:,} params; "
                f"one {self.flat.numel():,}-element fp32 buffer, AdamW backend {self.backend}")

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - views must survive
        self.flat.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Global L2 norm of the gradients; with ``max_norm``, clip inside the next step."""
        from freezeasguard.kernels.adamw import global_grad_norm

        norm = global_grad_norm(self.flat.grad)
        self._scale = None if max_norm is None else torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        from freezeasguard.kernels.adamw import fused_adamw_

        g = self.param_groups[0]
        st = self.state[self.flat]
        st["step"] += 1
        fused_adamw_(self.flat, self.flat.grad, st["exp_avg"], st["exp_avg_sq"], lr=g["lr"],
                     beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
                     weight_decay=g["weight_decay"], decay_end=self.decay_end, step=st["step"],
                     grad_scale=self._scale, backend=self.backend)
        self._scale = None

    # Optimizer.state_dict stores tensors by param index; the ints round-trip as they are.


@dataclass
class Guard:
    """The freeze in force for one training job."""

    mode: str
    mask: FreezeMask | None
    manifest: Manifest | None
    frozen_dtype: torch.dtype | None = None
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # host fp32 copies
    frozen_convs: int = 0

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return self.mask.frozen if self.mask is not None else ()

    def export_state(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        """UNet tensors for the final model: frozen ones in their original dtype and bytes."""
        state = {k: v.detach() for k, v in unet.state_dict().items()}
        state.update(self.originals)
        return state

    def verify(self, unet: nn.Module) -> VerifyReport | None:
        """Frozen tensors still equal the base: live copies (in their storage dtype) and export."""
        if self.manifest is None:
            return None
        state = self.export_state(unet)
        report = verify_frozen(self.manifest, state)
        if self.originals:  # the live low-precision copies must still be the rounded originals
            live = dict(unet.named_parameters())
            for n, orig in self.originals.items():
                if not torch.equal(live[n].detach().cpu(), orig.to(live[n].dtype)):
                    report.hash_mismatch.append(n)
                    report.details[n] = f"{n!r}: live {live[n].dtype} copy changed during training"
        return report


def build_mask(cfg: FinetuneConfig, unet: nn.Module) -> tuple[FreezeMask | None, Manifest | None]:
    """The mask of a job: from its manifest (checked against the base UNet) or a seeded ratio."""
    fc = cfg.freeze
    if fc.mode == "full":
        return None, None
    if fc.manifest:
        manifest = Manifest.load(fc.manifest)
        manifest.check_model(unet)  # names, shapes, dtypes and the base fingerprint
        return manifest.mask(unet), manifest
    if fc.ratio is None:
        from freezeasguard.engine.config import ConfigError

        raise ConfigError(f"freeze.mode={fc.mode!r} needs freeze.manifest (or freeze.ratio for a random mask)")
    mask = FreezeMask.random(unet, fc.ratio, by=fc.budget_by, seed=cfg.train.seed)
    manifest = Manifest.build(unet, mask, provenance={"method": "random", "seed": cfg.train.seed,
                                                     "config": {"ratio": fc.ratio, "by": fc.budget_by}})
    return mask, manifest


def apply_freeze(cfg: FinetuneConfig, unet: nn.Module, device: torch.device) -> tuple[Guard, list, Any]:
    """Freeze per ``cfg.freeze`` and build the optimizer: returns (guard, named trainable, optimizer)."""
    from freezeasguard.engine.train import make_optimizer, param_groups

    fc, tc = cfg.freeze, cfg.train
    mask, manifest = build_mask(cfg, unet)
    guard = Guard(fc.mode, mask, manifest)
    frozen = set(guard.frozen_names)
    params = dict(unet.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    named = [(n, p) for n, p in unet.named_parameters() if n not in frozen]
    if fc.mode in ("full", "naive"):
        # naive: the optimizer is handed every parameter, as a script calling
        # AdamW(unet.parameters()) does; frozen ones simply never get a gradient.
        groups = param_groups(list(unet.named_parameters()) if fc.mode == "naive" else named, tc.weight_decay)
        return guard, named, make_optimizer(groups, cfg, device)

    dtype = {"fp32": None, "bf16": torch.bfloat16,
             "auto": torch.bfloat16 if tc.mixed_precision == "bf16" else None}[fc.frozen_dtype]
    if dtype is not None and tc.mixed_precision != "bf16":
        from freezeasguard.engine.config import ConfigError

        raise ConfigError("freeze.frozen_dtype=bf16 needs train.mixed_precision=bf16 "
                          "(fp32 ops cannot consume bf16 weights)")
    if dtype is not None:
        guard.frozen_dtype = dtype
        # Norm layers run in fp32 under autocast (and CPU kernels refuse bf16 norm weights with fp32
        # inputs): their few parameters stay fp32. Every other frozen tensor feeds a bf16 op.
        fp32_ops = {f"{m}.{k}" if m else k for m, mod in unet.named_modules()
                    if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) for k, _ in mod.named_parameters(recurse=False)}
        with torch.no_grad():
            for n in sorted(frozen - fp32_ops):
                p = params[n]
                guard.originals[n] = p.detach().to("cpu", copy=True)
                p.data = p.data.to(dtype)
    if fc.frozen_conv:
        from freezeasguard.engine.frozen_ops import install_frozen_convs

        guard.frozen_convs = install_frozen_convs(unet, frozen)
    if not named:
        from freezeasguard.engine.config import ConfigError

        raise ConfigError("the mask freezes every UNet tensor: nothing is left to train")
    if tc.optimizer == "adamw8bit":
        opt = make_optimizer(param_groups(named, tc.weight_decay), cfg, device)
    else:
        opt = FlatAdamW(named, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=tc.weight_decay)
    return guard, named, opt
