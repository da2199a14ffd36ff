"""The attention processor and dispatch against diffusers' default processor (torch SDPA)."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import freezeasguard.engine.model.attention as attn_mod
from freezeasguard.engine.backends import Backend
from freezeasguard.engine.model.attention import (
    AttentionBackendError,
    AttentionProcessor,
    attention,
    resolve_attention_backend,
    set_attention_backend,
)

# fp32 on CPU, same math through the same SDPA kernel: the only differences come from passing
# the softmax scale explicitly (1-ulp in the scale at most) and are far below these bounds.
RTOL, ATOL = 1e-5, 1e-6

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # second prompt is padded: its last 3 tokens must be ignored
    return sample, torch.tensor([10, 500]), context, mask


def _forward_backward(model, use_mask: bool):
    model.zero_grad(set_to_none=True)
    sample, t, context, mask = _inputs()
    out = model(sample, t, context, encoder_attention_mask=mask if use_mask else None).sample
    (out.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads


def _n_attention(model) -> int:
    return sum(isinstance(m, Attention) for m in model.modules())


@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_unet_forward_and_grads_match_default(unet, backend, use_mask):
    unet.set_attn_processor(AttnProcessor2_0())
    ref_out, ref_grads = _forward_backward(unet, use_mask)

    assert set_attention_backend(unet, backend) == "sdpa"  # no CUDA here
    procs = set(map(type, unet.attn_processors.values()))
    assert procs == {AttentionProcessor}
    out, grads = _forward_backward(unet, use_mask)

    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)


def test_mask_changes_the_output(unet):
    """The mask reaches the kernel (guards the mask tests above against a vacuous pass)."""
    set_attention_backend(unet, "sdpa")
    with torch.no_grad():
        sample, t, context, mask = _inputs()
        a = unet(sample, t, context).sample
        b = unet(sample, t, context, encoder_attention_mask=mask).sample
    assert torch.equal(a[0], b[0])  # unpadded prompt
    assert not torch.allclose(a[1], b[1])


ATTN_VARIANTS = {
    # VAE mid-block style: 4-D input, group norm, residual, rescale
    "vae": dict(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True),
    # MoVQ style: spatial norm conditioned on temb
    "spatial": dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True),
    "cross_norm": dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8,
                       cross_attention_norm="layer_norm"),
    "qk_norm": dict(query_dim=32, heads=4, dim_head=8, qk_norm="layer_norm"),
}


@pytest.mark.parametrize("variant", sorted(ATTN_VARIANTS))
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_attention_module_variants_match_default(variant, mask):
    torch.manual_seed(0)
    kw = ATTN_VARIANTS[variant]
    attn = Attention(**kw)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)  # 16 tokens
    call = {}
    sk = 16
    if "cross_attention_dim" in kw:
        x = torch.randn(2, 16, 32, requires_grad=True)
        call["encoder_hidden_states"] = torch.randn(2, 5, 24)
        sk = 5
    if "spatial_norm_dim" in kw:
        call["temb"] = torch.randn(2, 4, 2, 2)
    if mask == "bool":
        call["attention_mask"] = torch.rand(2, 1, sk) > 0.3
        call["attention_mask"][..., 0] = True  # never mask a whole row
    elif mask == "float":
        call["attention_mask"] = torch.randn(2, 1, sk)

    def run(processor):
        attn.set_processor(processor)
        attn.zero_grad(set_to_none=True)
        x.grad = None
        out = attn(x, **call)
        out.sin().sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in attn.parameters()]

    ref = run(AttnProcessor2_0())
    ours = run(AttentionProcessor("sdpa"))
    torch.testing.assert_close(ours[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], ref[1], rtol=RTOL, atol=ATOL)
    for a, b in zip(ours[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# --- dispatch and backend choice -----------------------------------------------------------


def test_auto_logs_one_line_saying_why(unet, caplog):
    with caplog.at_level(logging.INFO, logger="freezeasguard"):
        assert set_attention_backend(unet, "auto") == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "freezeasguard"]
    assert len(lines) == 1, lines
    n = _n_attention(unet)
    assert lines[0].startswith(f"attention: sdpa on {n} Attention modules (xformers unusable: ")
    assert "CUDA" in lines[0] or "not installed" in lines[0]


def test_explicit_xformers_on_cpu_raises_actionable_error(unet):
    with pytest.raises(AttentionBackendError, match="xformers' requested but unusable") as info:
        set_attention_backend(unet, "xformers")
    msg = str(info.value)
    assert "backend='sdpa'" in msg and "To fix:" in msg
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize(
    "probe,fix",
    [
        (Backend("xformers", False, None, "not installed (pip install xformers)"), "pip install xformers"),
        (Backend("xformers", False, "0.0.35", "installed, but its attention kernels need CUDA"),
         "CUDA device"),
        (Backend("xformers", False, "0.0.35", "kernel test failed: RuntimeError: no kernel"),
         "wheel built for torch"),
    ],
)
def test_xformers_error_says_how_to_fix(monkeypatch, probe, fix):
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: probe)
    with pytest.raises(AttentionBackendError, match=fix):
        resolve_attention_backend("xformers")
    assert resolve_attention_backend("auto") == ("sdpa", f"xformers unusable: {probe.reason}")


def test_bad_backend_names_raise(unet):
    with pytest.raises(ValueError, match="'auto', 'xformers' or 'sdpa'"):
        set_attention_backend(unet, "flash")
    with pytest.raises(ValueError, match="no diffusers Attention"):
        set_attention_backend(torch.nn.Linear(2, 2), "sdpa")


def _fake_xformers(monkeypatch, calls: list):
    """xformers usable, with a pure-torch memory_efficient_attention in its (B, S, H, D) layout."""

    def mea(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.is_contiguous() and k.is_contiguous()  # the BMHK views are the projection layout
        if attn_bias is not None:
            assert attn_bias.dtype == q.dtype and attn_bias.stride(-2) % 8 == 0  # xformers' rule
        calls.append(attn_bias is not None)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * (scale or q.shape[-1] ** -0.5)
        if attn_bias is not None:
            s = s + attn_bias.double()
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).to(q.dtype)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = mea
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: Backend("xformers", True, "fake", "test"))
    monkeypatch.setattr(attn_mod, "_xformers_refusal", lambda q, k, v: None)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_xformers_path_layout_and_mask(monkeypatch, mask):
    """The xformers branch (transposes, scale, mask -> aligned additive bias) equals SDPA."""
    calls: list = []
    _fake_xformers(monkeypatch, calls)
    b, h, sq, sk, d = 2, 3, 10, 7, 8
    # projections come out as (B, S, H*D): the (B, H, S, D) inputs are transposed views
    q = torch.randn(b, sq, h, d).transpose(1, 2)
    k = torch.randn(b, sk, h, d).transpose(1, 2)
    v = torch.randn(b, sk, h, d).transpose(1, 2)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, 1, sk) > 0.4
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(b, h, 1, sk)
    out = attention(q, k, v, backend="xformers", attn_mask=m, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
    assert calls == [mask is not None]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_xformers_falls_back_per_call_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: Backend("xformers", True, "fake", "test"))
    monkeypatch.setattr(attn_mod, "_fallback_reasons_logged", set())
    q = torch.randn(1, 2, 5, 8)
    assert resolve_attention_backend("auto")[0] == "xformers"
    with caplog.at_level(logging.WARNING, logger="freezeasguard"):
        for _ in range(3):  # CPU tensors: SDPA, one warning in all
            out = attention(q, q, q, backend="xformers")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "xformers needs CUDA" in warnings[0]
    assert attn_mod._xformers_refusal(q, q, q.double()) is not None


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa_cuda(dtype):
    if not attn_mod.xformers_backend().available:
        pytest.skip(f"xformers unusable: {attn_mod.xformers_backend().reason}")
    q, k, v = (torch.randn(2, 8, 256, 40, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.randn(2, 1, 1, 256, device="cuda", dtype=dtype)
    for m in (None, mask):
        out = attention(q, k, v, backend="xformers", attn_mask=m)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                               attn_mask=None if m is None else m.float())
        # both are low-precision fused kernels vs an fp32 oracle: a few ulp of the dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
