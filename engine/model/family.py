"""The interface of a model family: what differs between SD 1.x/2.x, SDXL, SD3 and Flux.

A family says which networks a model has (the denoiser's class and folder, the text encoders by
slot), how prompts become the conditioning a step needs (``encode``), how the denoiser is called
on a noisy batch (``predict``), and what it is trained to predict (the process its scheduler config
defines: DDPM's epsilon/v, or flow matching's velocity). Everything else (the freeze, the locks,
the manifest, the proof, the optimizers, the ledger) is keyed by tensor name and does not care.

``Cond`` carries a batch's conditioning with its family, so the losses, the trainer and the mask
learner pass it through without knowing what is inside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

TEXT_KINDS = ("clip", "clip_proj", "t5")


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family: its class (``kind``) and its token budget.

    ``max_length``: tokens per prompt; None takes the tokenizer's ``model_max_length`` (77 for CLIP).
    """

    kind: str
    max_length: int | None = None


@dataclass
class Cond:
    """Conditioning of a batch: named tensors whose first dimension is the batch."""

    family: "Family"
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, rows) -> "Cond":
        return Cond(self.family, {k: v[rows] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "Cond":
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None,
                        non_blocking=non_blocking)
        return Cond(self.family, {k: move(v) for k, v in self.tensors.items()})

    def expand(self, n: int) -> "Cond":
        """A one-row conditioning repeated ``n`` times (the unconditional prompt of a batch)."""
        return Cond(self.family, {k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        fam = conds[0].family
        return Cond(fam, {k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors})


def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: "Cond | torch.Tensor") -> torch.Tensor:
    """The denoiser's output on a noisy batch, in the batch's layout [B, C, H, W].

    A plain tensor ``cond`` is a UNet's ``encoder_hidden_states`` (SD 1.x/2.x conditioning)."""
    if isinstance(cond, torch.Tensor):
        return model(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    return cond.family.predict(model, x_t, t, cond.tensors)


def tokenize(tokenizer: Any, prompts: list[str], max_length: int | None) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True,
                     max_length=max_length or tokenizer.model_max_length, return_tensors="pt").input_ids


class Family:
    """Base of the model families. Subclasses set the class attributes and the two methods."""

    name: str = ""
    pipeline: str = ""  # the diffusers pipeline class a folder's model_index.json names
    denoiser_dir: str = "unet"  # the denoiser's folder in a diffusers checkout
    denoiser_class: type[nn.Module] = nn.Module
    text_slots: tuple[TextSlot, ...] = ()
    objective: str = "ddpm"  # 'ddpm' (epsilon/v/x0 targets) or 'flow' (flow matching)
    spaces: tuple[str, ...] = ("latent",)  # where the denoiser can run: 'latent' and/or 'pixel'
    latent_packing: int = 1  # pixels of the latent per token side folded into channels (Flux: 2)

    @property
    def text_dirs(self) -> list[str]:
        return ["text_encoder" + (f"_{i + 1}" if i else "") for i in range(len(self.text_slots))]

    @property
    def tokenizer_dirs(self) -> list[str]:
        return ["tokenizer" + (f"_{i + 1}" if i else "") for i in range(len(self.text_slots))]

    def build_denoiser(self, config: dict[str, Any], channels: int, size: int) -> nn.Module:
        """A randomly initialised denoiser of ``config`` for ``channels`` x ``size`` x ``size`` inputs."""
        raise NotImplementedError

    def latent_channels(self, denoiser: nn.Module) -> int:
        return int(denoiser.config.in_channels) // self.latent_packing ** 2

    def encode(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: list[str],
               device: torch.device | str, resolution: int) -> dict[str, torch.Tensor]:
        """Conditioning tensors of ``prompts`` (fp32, one row per prompt)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # The denoiser's structure, for the frozen prefix (guard.prefix) and regional compile.
    def forward_stages(self, model: nn.Module) -> list[str]:
        """Qualified names of the denoiser's top-level stages in forward order (blocks one by one)."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[str]:
        """The denoiser's repeated blocks (regions to compile, units to shard)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def stage_list(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` expanded in order: a ModuleList child becomes its entries, absent children drop."""
    kids = dict(model.named_children())
    out: list[str] = []
    for n in names:
        m = kids.get(n)
        if m is None:
            continue
        if isinstance(m, nn.ModuleList):
            out += [f"{n}.{i}" for i in range(len(m))]
        else:
            out.append(n)
    return out
