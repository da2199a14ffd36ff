"""The tensor guard: a freeze mask over whole UNet tensors, enforced and proven for one job.

What it locks: the tensors a name-keyed ``FreezeMask`` marks frozen (from the job's signed
manifest, or a seeded random mask for benchmarks). How it is enforced (``enforce``): frozen
tensors leave autograd (``requires_grad=False``), so no gradient and no optimizer state exists for
them; under bf16 autocast they are held in bf16 (autocast casts them at every use anyway; norm
parameters, which autocast runs in fp32, stay fp32) with the original fp32 bytes on disk, read
only at export and verify (``guard.originals``: no copy of them is held in memory);
frozen convolutions run through an autograd function that does not save their input. How it is
proven (``verify``): every frozen tensor, as exported and as held live, against the manifest's
SHA-256.

The second guard type, a lock on directions inside trainable tensors (``guard.subspace``), rides
along: ``lock`` holds its bases (enforced in the optimizer step, ``optim.project``) and ``anchors``
the base's coordinates along them, so ``verify`` proves it after the job without a base copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.normalization import LayerNorm as DiffusersLayerNorm
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from torch import nn
from torch.distributed.tensor import DTensor

from freezeasguard.engine.config import FreezeConfig
from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.guard.frozen_ops import install_frozen_convs
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.originals import FrozenOriginals
from freezeasguard.engine.guard.subspace import LockAnchors, LockResidual, SubspaceLock
from freezeasguard.engine.guard.verify import VerifyReport, verify_frozen


@dataclass
class TensorGuard:
    """The tensor freeze in force for one training job (``mode``: full, naive or engine)."""

    mode: str
    mask: FreezeMask | None
    manifest: Manifest | None
    frozen_dtype: torch.dtype | None = None
    # base values of the tensors held in ``frozen_dtype`` (those it rounds), on disk, read when needed
    originals: FrozenOriginals = field(default_factory=FrozenOriginals)
    low_precision: dict[str, torch.dtype] = field(default_factory=dict)  # held in frozen_dtype: base dtype
    frozen_convs: int = 0
    prefix: tuple[str, ...] = ()  # stages of the forward run without autograd (guard.prefix)
    lock: SubspaceLock | None = None
    anchors: LockAnchors | None = None
    # Where the locked tensors are not the ones trained (LoRA), the wiring proves the lock itself:
    # (unet, steps) -> [LockResidual]
    lock_check: Callable[[nn.Module, int], list[LockResidual]] | None = None

    def take_anchors(self, unet: nn.Module) -> None:
        """Record the base's locked coordinates (call before training)."""
        if self.lock is not None:
            self.anchors = LockAnchors.of(self.lock, unet)

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return self.mask.frozen if self.mask is not None else ()

    def export_state(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        """UNet tensors for the final model: frozen ones in their original dtype and bytes. A UNet
        sharded by FSDP2 is gathered (a collective: every process calls it). A frozen tensor held in
        a lower precision is its base value: read from ``originals`` where the cast rounded it,
        else its live copy cast back (exact there)."""
        base = dict(self.originals.items())
        low = self.low_precision
        return {k: base[k] if k in base else _full(v.detach()).to(low[k]) if k in low else _full(v.detach())
                for k, v in unet.state_dict().items()}

    def verify(self, unet: nn.Module, steps: int = 0) -> VerifyReport | None:
        """Frozen tensors still equal the base (live copies in their storage dtype, and export), and
        locked tensors moved only outside their locked directions over ``steps`` steps."""
        if self.manifest is None:
            return None
        state = self.export_state(unet)
        report = verify_frozen(self.manifest, state)
        if self.lock_check is not None:
            report.add_lock_residuals(self.lock_check(unet, steps))
        elif self.lock is not None:
            if self.anchors is None:
                report.lock_violation.append("<locks>")
                report.details["<locks>"] = "the locks were not anchored before training: cannot prove them"
            else:
                report.add_lock_residuals(self.anchors.residuals(self.lock, state, steps))
        if self.originals:  # the live low-precision copies must still be the rounded originals
            live = dict(unet.named_parameters())
            for n, orig in self.originals.items():  # one base value in memory at a time
                if not torch.equal(_full(live[n].detach()).cpu(), orig.to(live[n].dtype)):
                    report.hash_mismatch.append(n)
                    report.details[n] = f"{n!r}: live {live[n].dtype} copy changed during training"
        return report


def _full(t: torch.Tensor) -> torch.Tensor:
    """A shard of a tensor sharded by FSDP2 (a DTensor) gathered to the whole tensor, on the host;
    any other tensor as it is."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def build_mask(fc: FreezeConfig, unet: nn.Module, seed: int = 0) -> tuple[FreezeMask | None, Manifest | None]:
    """The mask of a job: from its manifest (checked against the base UNet) or a seeded ratio."""
    if fc.mode == "full":
        return None, None
    if fc.manifest:
        manifest = Manifest.load(fc.manifest)
        manifest.check_model(unet)  # names, shapes, dtypes and the base fingerprint
        return manifest.mask(unet), manifest
    if fc.ratio is None:
        raise ConfigError(f"freeze.mode={fc.mode!r} needs freeze.manifest (or freeze.ratio for a random mask)")
    mask = FreezeMask.random(unet, fc.ratio, by=fc.budget_by, seed=seed)
    manifest = Manifest.build(unet, mask, provenance={"method": "random", "seed": seed,
                                                     "config": {"ratio": fc.ratio, "by": fc.budget_by}})
    return mask, manifest


def frozen_storage_dtype(fc: FreezeConfig, mixed_precision: str) -> torch.dtype | None:
    """The dtype frozen tensors are held in under the engine (None: keep fp32)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16,
             "auto": torch.bfloat16 if mixed_precision == "bf16" else None}[fc.frozen_dtype]
    if dtype is not None and mixed_precision != "bf16":
        raise ConfigError("freeze.frozen_dtype=bf16 needs train.mixed_precision=bf16 "
                          "(fp32 ops cannot consume bf16 weights)")
    return dtype


# Norm layers whose own parameters stay fp32 under bf16 frozen storage. A frozen tensor may be held in
# bf16 only where every use of it rounds it to bf16 anyway (a Linear or conv weight under autocast), so
# the stored copy computes exactly what the fp32 original would. Norm weights are not such tensors:
# * nn.GroupNorm, nn.LayerNorm (diffusers' LayerNorm and FP32LayerNorm are this class or subclass it):
#   autocast runs them in fp32 on CUDA (its fp32 op list), and the CPU kernels refuse a bf16 weight
#   with an fp32 input; FP32LayerNorm upcasts its weight itself, so a rounded copy would show.
# * nn.RMSNorm (Flux's q/k norms): CUDA autocast runs rms_norm in fp32 like layer_norm (torch's
#   AT_FORALL_FP32 list); CPU autocast leaves it alone and the kernel applies the weight in its own
#   dtype (a bf16 input with an fp32 weight is normalised in fp32 and cast back, as when the weight
#   is trainable). Either way a bf16 copy would apply a rounded weight the base never had.
# * diffusers' RMSNorm (SD3.5's and older Flux's qk norms, AdaLayerNormContinuous(norm_type="rms_norm")):
#   its forward casts the activations to the weight's dtype when that is bf16/fp16, so a bf16 weight
#   turns an fp32 multiply into a bf16 one (and changes the output dtype): it must stay fp32.
# Not listed: AdaLayerNorm*, AdaGroupNorm (their parameters are a Linear's, a bf16 op under autocast;
# their own norms hold no weights, or are a class above, found on their own); text encoders' norms
# (T5's), which are not in the denoiser this rule is applied to.
FP32_NORMS: tuple[type[nn.Module], ...] = tuple(dict.fromkeys(
    (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, DiffusersLayerNorm, DiffusersRMSNorm)))


def fp32_param_names(unet: nn.Module) -> set[str]:
    """Parameters that stay fp32 under bf16 frozen storage: the own parameters of norm layers
    (``FP32_NORMS``: group/layer norms, torch's and diffusers' RMS norms), whose kernels consume the
    weight at its stored precision (or refuse a bf16 one), unlike the bf16 ops of autocast."""
    return {f"{m}.{k}" if m else k for m, mod in unet.named_modules()
            if isinstance(mod, FP32_NORMS) for k, _ in mod.named_parameters(recurse=False)}


def enforce(guard: TensorGuard, unet: nn.Module, *, frozen_dtype: torch.dtype | None = None,
            frozen_conv: bool = False) -> None:
    """Take the frozen tensors out of autograd; optionally hold them in ``frozen_dtype`` and run
    frozen convolutions without saving their input (the engine mode)."""
    frozen = set(guard.frozen_names)
    params = dict(unet.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    if frozen_dtype is not None:
        guard.frozen_dtype = frozen_dtype
        # Norm layers run in fp32 under autocast (and CPU kernels refuse bf16 norm weights with fp32
        # inputs): their few parameters stay fp32. Every other frozen tensor feeds a bf16 op.
        fp32_ops = fp32_param_names(unet)
        low = sorted(frozen - fp32_ops)
        # the base values the cast rounds go to disk first (nothing of them stays in memory)
        guard.originals = FrozenOriginals.spill({n: params[n] for n in low}, frozen_dtype)
        guard.low_precision = {n: params[n].dtype for n in low}
        with torch.no_grad():
            for n in low:
                p = params[n]
                p.data = p.data.to(frozen_dtype)
    if frozen_conv:
        guard.frozen_convs = install_frozen_convs(unet, frozen)
