"""Attention backends for diffusers' UNet and VAE: diffusers' own processors, chosen in one place.

``set_attention_backend`` installs diffusers' ``XFormersAttnProcessor`` where xformers can run
(a model on CUDA, a wheel whose kernels load beside this torch) and ``AttnProcessor2_0`` (torch
``scaled_dot_product_attention``) elsewhere, through the model's ``set_attn_processor``, and logs
one line saying which runs and why. Both are O(S)-memory fused kernels of about equal speed on
CUDA; on CPU only SDPA exists. ``model.attention=xformers`` where it cannot run is an error that
says how to fix it, never a silent fallback.
"""
from __future__ import annotations

import logging

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor2_0,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
    XFormersJointAttnProcessor,
)

from freezeasguard.engine.backends import Backend, xformers_backend
from freezeasguard.engine.errors import BackendError

logger = logging.getLogger("freezeasguard")

BACKENDS = ("auto", "xformers", "sdpa")


def _fix_for(xb: Backend) -> str:
    """What a user can do about an unusable xformers, from its probe result."""
    if xb.version is None:
        return "install it (`pip install xformers`, a wheel built for your torch and CUDA)"
    if "need CUDA" in xb.reason:
        return "run on a CUDA device (xformers has no CPU kernels)"
    return f"install an xformers wheel built for torch {torch.__version__} (CUDA {torch.version.cuda})"


def resolve_attention_backend(backend: str = "auto", device: torch.device | str = "cuda") -> tuple[str, str]:
    """Choose the attention backend for a model on ``device``.

    Args:
        backend: 'auto' (xformers when it can run there, else SDPA), 'xformers' or 'sdpa'.
        device: where the model runs; xformers has CUDA kernels only.
    Returns:
        ``(chosen, why)``, chosen being 'xformers' or 'sdpa'.
    Raises:
        BackendError: 'xformers' was asked for and cannot run; the message says why and how to fix it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be 'auto', 'xformers' or 'sdpa', got {backend!r}")
    if backend == "sdpa":
        return "sdpa", "requested"
    device = torch.device(device)
    if device.type != "cuda":
        if backend == "xformers":
            raise BackendError(f"attention backend 'xformers' requested but the model is on {device}: xformers has "
                               "CUDA kernels only. To fix: run on a CUDA device, or set model.attention=sdpa (or auto)")
        return "sdpa", f"the model is on {device}; xformers needs CUDA"
    xb = xformers_backend()
    if xb.available:
        why = "requested" if backend == "xformers" else "auto"
        return "xformers", f"{why}; xformers {xb.version}: {xb.reason}"
    if backend == "xformers":
        raise BackendError(
            f"attention backend 'xformers' requested but unusable: {xb.reason}. To fix: {_fix_for(xb)}, or set "
            "model.attention=sdpa (or auto, which falls back to torch scaled_dot_product_attention)")
    return "sdpa", f"xformers unusable: {xb.reason}"


def set_attention_backend(model: torch.nn.Module, backend: str = "auto") -> str:
    """Install diffusers' processor for the chosen backend on every ``Attention`` module of ``model``.

    Modules with added key/value projections get the matching ``AttnAddedKV`` processor; SD3's
    joint (text + image) attention the joint processor of the backend; Flux's attention modules,
    which diffusers runs through its attention dispatcher, that dispatcher's backend ('native' is
    torch SDPA).

    Returns:
        The backend that runs: 'xformers' or 'sdpa'.
    Raises:
        BackendError: 'xformers' requested but unusable.
        ValueError: an unknown backend, or a model without ``Attention`` modules.
    """
    param = next(model.parameters(), None)
    chosen, why = resolve_attention_backend(backend, param.device if param is not None else "cpu")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    dispatched = [m for m in model.modules() if isinstance(m, AttentionModuleMixin) and not isinstance(m, Attention)]
    if dispatched and not modules:
        # the dispatcher's default (no backend set on a processor) is torch SDPA
        if chosen == "xformers" or any(getattr(getattr(m, "processor", None), "_attention_backend", None)
                                       is not None for m in dispatched):
            model.set_attention_backend("xformers" if chosen == "xformers" else "native")
        logger.info("attention: %s on %d attention modules (%s)", chosen, len(dispatched), why)
        return chosen
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention module to set a backend on")
    joint = {n for n, m in modules.items() if isinstance(m.processor, (JointAttnProcessor2_0, XFormersJointAttnProcessor))}
    if joint:
        proc = XFormersJointAttnProcessor if chosen == "xformers" else JointAttnProcessor2_0
        model.set_attn_processor({f"{n}.processor": proc() for n in modules})
        logger.info("attention: %s on %d joint Attention modules (%s)", chosen, len(modules), why)
        return chosen
    plain, added = (XFormersAttnProcessor, XFormersAttnAddedKVProcessor) if chosen == "xformers" else \
        (AttnProcessor2_0, AttnAddedKVProcessor2_0)
    # set_attn_processor keys its mapping by "<module>.processor".
    model.set_attn_processor({f"{name}.processor": added() if getattr(m, "add_k_proj", None) is not None else plain()
                              for name, m in modules.items()})
    logger.info("attention: %s on %d Attention modules (%s)", chosen, len(modules), why)
    return chosen
