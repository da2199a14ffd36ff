"""Attention for diffusers' ``Attention`` modules behind one dispatch point.

``attention(q, k, v, backend=...)`` is the only place that picks a kernel: xformers'
``memory_efficient_attention`` when it can run on these tensors (CUDA, fp16/bf16/fp32, head dim
<= 256), torch's ``scaled_dot_product_attention`` otherwise. Both are O(S) memory fused kernels
of about equal speed on CUDA; on CPU only SDPA exists. ``AttentionProcessor`` does the rest of
what the SD UNet's (and VAE's) attention blocks need: q/k/v projections, group/spatial/cross
norms, masks, output projection, residual and rescale. ``set_attention_backend`` installs it on
every ``Attention`` module and logs one line saying which backend runs and why.

xformers is imported lazily, on the first call that uses it: importing it on a CPU-only
machine prints warnings about missing CUDA extensions.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from freezeasguard.engine.backends import Backend, xformers_backend

__all__ = [
    "AttentionBackendError",
    "AttentionProcessor",
    "attention",
    "resolve_attention_backend",
    "set_attention_backend",
]

logger = logging.getLogger("freezeasguard")

BackendName = Literal["auto", "xformers", "sdpa"]

_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_XFORMERS_MAX_HEAD_DIM = 256  # the largest head dim xformers' flash/cutlass forward ops accept
_fallback_reasons_logged: set[str] = set()


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


def _fix_for(xb: Backend) -> str:
    """What a user can do about an unusable xformers, from its probe result."""
    if xb.version is None:
        return "install it (`pip install xformers`, a wheel built for your torch and CUDA)"
    if "need CUDA" in xb.reason:
        return "run on a CUDA device (xformers has no CPU kernels)"
    return (
        f"install an xformers wheel built for torch {torch.__version__} "
        f"(CUDA {torch.version.cuda})"
    )


def resolve_attention_backend(backend: str = "auto") -> tuple[str, str]:
    """Choose the attention backend for this machine.

    Args:
        backend: 'auto' (xformers when usable, else SDPA), 'xformers' or 'sdpa'.

    Returns:
        ``(chosen, why)``, chosen being 'xformers' or 'sdpa'.

    Raises:
        AttentionBackendError: 'xformers' was asked for and cannot run; the message says why
            and how to fix it.
    """
    if backend not in ("auto", "xformers", "sdpa"):
        raise ValueError(f"attention backend must be 'auto', 'xformers' or 'sdpa', got {backend!r}")
    if backend == "sdpa":
        return "sdpa", "requested"
    xb = xformers_backend()
    if xb.available:
        why = "requested" if backend == "xformers" else "auto"
        return "xformers", f"{why}; xformers {xb.version}: {xb.reason}"
    if backend == "xformers":
        raise AttentionBackendError(
            f"attention backend 'xformers' requested but unusable: {xb.reason}. "
            f"To fix: {_fix_for(xb)}, or pass backend='sdpa' (or 'auto' to fall back to "
            "torch scaled_dot_product_attention)."
        )
    return "sdpa", f"xformers unusable: {xb.reason}"


def _xformers_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why xformers cannot take these tensors, or None when it can."""
    if not xformers_backend().available:
        return f"xformers unusable: {xformers_backend().reason}"
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return f"tensors on {q.device}, xformers needs CUDA"
    if q.dtype not in _XFORMERS_DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} not supported by xformers"
    if max(q.shape[-1], v.shape[-1]) > _XFORMERS_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_XFORMERS_MAX_HEAD_DIM}"
    return None


def _as_additive_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An SDPA-style mask as xformers' dense additive bias of shape (B, H, Sq, Sk).

    SDPA treats a bool mask as "True = attend" and a float mask as an additive bias. xformers
    wants a bias in q's dtype whose rows are 8-element aligned, so it is materialised into a
    padded buffer and sliced back (the padding is never read).
    """
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    b, h, sq, _ = q.shape
    sk = k.shape[-2]
    padded = torch.empty(b, h, sq, (sk + 7) // 8 * 8, dtype=q.dtype, device=q.device)
    bias = padded[..., :sk]
    bias.copy_(mask.to(q.dtype).expand(b, h, sq, sk))
    return bias


def _xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    import xformers.ops as xops  # lazy: see the module docstring

    bias = None if attn_mask is None else _as_additive_bias(attn_mask, q, k)
    # xformers works in (B, S, H, D); the projections are produced in that layout, so these
    # transposes are free views and the result transposes back into SDPA's (B, H, S, D).
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=0.0, scale=scale
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: BackendName,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, by the fastest kernel that can run on these tensors.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D).
        backend: 'sdpa' always uses torch SDPA; 'xformers' and 'auto' use xformers when it can
            take these tensors (CUDA, fp16/bf16/fp32, head dim <= 256) and SDPA otherwise.
        attn_mask: broadcastable to (B, H, Sq, Sk); bool (True = attend) or additive float.
        scale: softmax scale; None means 1/sqrt(D).

    Returns:
        (B, H, Sq, D).
    """
    if backend != "sdpa":
        refusal = _xformers_refusal(q, k, v)
        if refusal is None:
            return _xformers_attention(q, k, v, attn_mask, scale)
        if backend == "xformers" and refusal not in _fallback_reasons_logged:
            _fallback_reasons_logged.add(refusal)
            logger.warning("attention: xformers chosen but falling back to sdpa for a call (%s)", refusal)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale
    )


class AttentionProcessor:
    """Processor for diffusers' ``Attention``: self/cross attention through ``attention()``.

    Covers what SD's UNet and VAE use: 3-D or 4-D hidden states, ``attention_mask``,
    ``group_norm``, ``spatial_norm`` (with ``temb``), ``norm_cross``, ``norm_q``/``norm_k``,
    ``residual_connection`` and ``rescale_output_factor``. Added key/value projections
    (``add_k_proj``) need a different processor and are refused by ``set_attention_backend``.
    """

    def __init__(self, backend: BackendName = "sdpa") -> None:
        if backend not in ("auto", "xformers", "sdpa"):
            raise ValueError(f"attention backend must be 'auto', 'xformers' or 'sdpa', got {backend!r}")
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    def __call__(
        self,
        attn,  # diffusers.models.attention_processor.Attention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        spatial_shape = None
        if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            b, c, h, w = hidden_states.shape
            spatial_shape = (b, c, h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)

        batch = hidden_states.shape[0]
        if attention_mask is not None:
            # (B, Sk) or (B, 1, Sk) masks become (B*heads, ., Sk), then (B, heads, ., Sk).
            sk = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, sk, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states  # self-attention sees the normalised states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        # (B, S, heads*D) -> (B, heads, S, D) as views of the projection output.
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = attention(query, key, value, backend=self.backend, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)  # linear
        out = attn.to_out[1](out)  # dropout

        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_attention_backend(model: torch.nn.Module, backend: BackendName = "auto") -> str:
    """Install ``AttentionProcessor`` on every diffusers ``Attention`` module of ``model``.

    Args:
        model: e.g. a ``UNet2DConditionModel`` or ``AutoencoderKL``.
        backend: 'auto', 'xformers' or 'sdpa' (see ``resolve_attention_backend``).

    Returns:
        The backend that runs: 'xformers' or 'sdpa'.

    Raises:
        AttentionBackendError: 'xformers' requested but unusable.
        ValueError: the model has no ``Attention`` module, or one this processor cannot serve.
    """
    chosen, why = resolve_attention_backend(backend)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention module to set a backend on")
    for name, m in modules:
        if getattr(m, "add_k_proj", None) is not None:
            raise ValueError(
                f"Attention module {name!r} has added key/value projections, which "
                f"{AttentionProcessor.__name__} does not implement"
            )
    processor = AttentionProcessor(chosen)
    for _, m in modules:
        m.set_processor(processor)
    logger.info("attention: %s on %d Attention modules (%s)", chosen, len(modules), why)
    return chosen
