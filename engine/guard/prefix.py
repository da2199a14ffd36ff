"""The frozen prefix of the denoiser's forward, run without autograd.

When every tensor of the modules that run first (time embedding, ``conv_in``, the first down
blocks, ...) is frozen and their inputs need no gradient, nothing in that part of the forward needs
a backward: no saved activations, no graph. Autograd already records nothing for ops none of whose
inputs require grad; running the prefix under ``torch.no_grad()`` makes that a property of the
setup rather than of each op (no autograd bookkeeping per op, nothing saved even by custom
functions), and the report names the modules.

Correctness does not rest on the static order: each wrapped module checks at call time that none
of its tensor inputs requires grad, and otherwise runs as usual (so a trainable module placed
before it, e.g. a trainable time embedding feeding every block, is never cut off from its
gradient).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

# Top-level children of a diffusers UNet2DConditionModel in the order its forward runs them.
_EMBEDDINGS = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
               "encoder_hid_proj")


def forward_order(unet: nn.Module) -> list[str]:
    """Qualified names of the UNet's top-level stages in forward order (blocks one by one)."""
    kids = dict(unet.named_children())
    order = [n for n in _EMBEDDINGS if kids.get(n) is not None]
    if "conv_in" in kids:
        order.append("conv_in")
    order += [f"down_blocks.{i}" for i in range(len(kids.get("down_blocks", ())))]
    if kids.get("mid_block") is not None:
        order.append("mid_block")
    order += [f"up_blocks.{i}" for i in range(len(kids.get("up_blocks", ())))]
    order += [n for n in ("conv_norm_out", "conv_act", "conv_out") if kids.get(n) is not None]
    return order


def frozen_prefix(unet: nn.Module, frozen: Iterable[str], order: Sequence[str] | None = None) -> list[str]:
    """The longest run of stages from the start of the forward whose parameters are all frozen.

    ``order``: the model's stages in forward order (``Family.forward_stages``; default a UNet's)."""
    frozen = set(frozen)
    out = []
    for stage in (forward_order(unet) if order is None else order):
        names = [f"{stage}.{n}" for n, _ in unet.get_submodule(stage).named_parameters()]
        if any(n not in frozen for n in names):
            break
        out.append(stage)
    return out


def _needs_grad(values: Iterable[Any]) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
        if isinstance(v, (tuple, list)) and _needs_grad(v):
            return True
        if isinstance(v, dict) and _needs_grad(v.values()):
            return True
    return False


def _enter(mod: nn.Module, args: tuple, kwargs: dict) -> None:
    skip = torch.is_grad_enabled() and not _needs_grad(args) and not _needs_grad(kwargs.values()) \
        and not any(p.requires_grad for p in mod.parameters())
    mod._freezeasguard_grad_stack.append(torch.is_grad_enabled())
    if skip:
        torch.set_grad_enabled(False)


def _leave(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:  # noqa: ARG001
    torch.set_grad_enabled(mod._freezeasguard_grad_stack.pop())


def install_prefix_skip(unet: nn.Module, frozen: Iterable[str], order: Sequence[str] | None = None) -> tuple[str, ...]:
    """Make every stage of the frozen prefix run under no_grad whenever none of its inputs requires
    grad (forward hooks, so copies of the model carry them; the grad mode is restored even when the
    forward raises); returns the stages. ``order`` as for ``frozen_prefix``."""
    stages = frozen_prefix(unet, frozen, order)
    for stage in stages:
        mod = unet.get_submodule(stage)
        if hasattr(mod, "_freezeasguard_grad_stack"):
            continue
        mod._freezeasguard_grad_stack = []
        mod.register_forward_pre_hook(_enter, with_kwargs=True)
        mod.register_forward_hook(_leave, with_kwargs=True, always_call=True)
    return tuple(stages)
