"""Attention backends: diffusers' own processors, one dispatch point, clear errors."""
from __future__ import annotations

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

import freezeasguard.engine.model.attention as attn_mod
from freezeasguard.engine.backends import Backend
from freezeasguard.engine.errors import BackendError, FreezeAsGuardError
from freezeasguard.engine.model.attention import resolve_attention_backend, set_attention_backend


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)


def _processors(model):
    return {type(m.processor) for m in model.modules() if isinstance(m, Attention)}


def test_sdpa_installs_diffusers_processor_and_matches_its_default(unet):
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond).sample
    unet.set_attn_processor(XFormersAttnProcessor())  # something else first, so the call must change it
    assert set_attention_backend(unet, "sdpa") == "sdpa"
    assert _processors(unet) == {AttnProcessor2_0}
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample, ref)  # diffusers' default on torch 2


def test_auto_logs_one_line_saying_why(unet, caplog):
    with caplog.at_level(logging.INFO, logger="freezeasguard"):
        assert set_attention_backend(unet, "auto") == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "freezeasguard"]
    n = sum(isinstance(m, Attention) for m in unet.modules())
    assert lines == [f"attention: sdpa on {n} Attention modules (the model is on cpu; xformers needs CUDA)"]


def test_the_choice_follows_the_models_device(unet, monkeypatch):
    usable = Backend("xformers", True, "0.0.35", "CUDA kernels load and run")
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: usable)
    assert resolve_attention_backend("auto", "cuda")[0] == "xformers"
    # a CPU model on a machine where xformers works on the GPU still gets SDPA, never a crash
    assert set_attention_backend(unet, "auto") == "sdpa" and _processors(unet) == {AttnProcessor2_0}
    with pytest.raises(BackendError, match="the model is on cpu: xformers has CUDA kernels only"):
        set_attention_backend(unet, "xformers")


def test_xformers_where_usable_installs_diffusers_xformers_processor(unet, monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: Backend("xformers", True, "0.0.35", "CUDA kernels load"))
    monkeypatch.setattr(attn_mod, "resolve_attention_backend",
                        lambda b, d: ("xformers", "auto; xformers 0.0.35: CUDA kernels load"))  # as on a GPU
    with caplog.at_level(logging.INFO, logger="freezeasguard"):
        assert set_attention_backend(unet, "auto") == "xformers"
    assert _processors(unet) == {XFormersAttnProcessor}
    assert "attention: xformers on" in caplog.text and "auto; xformers 0.0.35" in caplog.text


def test_explicit_xformers_where_it_cannot_run_is_an_actionable_error(unet, monkeypatch):
    before = _processors(unet)
    for probe in (Backend("xformers", False, "0.0.35", "installed, but its attention kernels need CUDA"), None):
        if probe is not None:
            monkeypatch.setattr(attn_mod, "xformers_backend", lambda: probe)
        with pytest.raises(BackendError, match="'xformers' requested but") as info:
            attn_mod.resolve_attention_backend("xformers", "cuda" if probe is not None else "cpu")
        assert "To fix:" in str(info.value) and "model.attention=sdpa" in str(info.value)
        assert isinstance(info.value, FreezeAsGuardError)
    with pytest.raises(BackendError):
        set_attention_backend(unet, "xformers")
    assert _processors(unet) == before  # nothing changed


@pytest.mark.parametrize("probe,fix", [
    (Backend("xformers", False, None, "not installed (pip install xformers)"), "pip install xformers"),
    (Backend("xformers", False, "0.0.35", "installed, but its attention kernels need CUDA"), "CUDA device"),
    (Backend("xformers", False, "0.0.35", "kernel test failed: RuntimeError: no kernel"), "wheel built for torch"),
])
def test_xformers_error_says_how_to_fix(monkeypatch, probe, fix):
    monkeypatch.setattr(attn_mod, "xformers_backend", lambda: probe)
    with pytest.raises(BackendError, match=fix):
        resolve_attention_backend("xformers", "cuda")
    assert resolve_attention_backend("auto", "cuda") == ("sdpa", f"xformers unusable: {probe.reason}")


def test_bad_backend_names_raise(unet):
    with pytest.raises(ValueError, match="'auto', 'xformers' or 'sdpa'"):
        set_attention_backend(unet, "flash")
    with pytest.raises(ValueError, match="no diffusers Attention"):
        set_attention_backend(torch.nn.Linear(2, 2), "sdpa")


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_the_unet_cuda(unet):
    if not attn_mod.xformers_backend().available:
        pytest.skip(f"xformers unusable: {attn_mod.xformers_backend().reason}")
    unet = unet.cuda().half()
    x, t, cond = torch.randn(2, 4, 8, 8).cuda().half(), torch.tensor([3, 500]).cuda(), torch.randn(2, 7, 32).cuda().half()
    set_attention_backend(unet, "sdpa")
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond).sample.float()
    set_attention_backend(unet, "xformers")
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=cond).sample.float()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)  # two fp16 fused kernels: a few fp16 ulp
