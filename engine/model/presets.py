"""Model presets: the configurations of a text-to-image latent diffusion model's three networks.

A *preset* names a UNet (diffusers' ``UNet2DConditionModel``), a CLIP text encoder and a VAE
configuration. ``sd15``/``sd21`` are the real Stable Diffusion shapes (build them on the ``meta``
device to inspect them for free); ``tiny`` and ``small`` are SD-shaped models that train on a CPU.
Nothing is downloaded: networks are initialised from these configs, or loaded from a folder
(``model.components``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from freezeasguard.engine.errors import ModelError


@dataclass(frozen=True)
class Preset:
    """Configurations of the three networks of a text-to-image latent diffusion model."""

    name: str
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    space: str = "latent"  # default space: 'latent' (VAE) or 'pixel'
    resolution: int = 512  # default image resolution in pixels
    prediction_type: str = "epsilon"
    scheduler: dict[str, Any] = field(default_factory=dict)  # diffusers scheduler settings over SD v1's
    notes: str = ""


def _sd_unet(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg


_SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32),
        vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                 norm_num_groups=8, scaling_factor=1.0),
        space="pixel",
        resolution=16,
        # At 16 px SD's scaled-linear betas leave ~10% of the signal at t = T, and with epsilon
        # prediction the caption barely changes the loss: DDPM's linear betas and v-prediction
        # (SD 2.x's) let a CPU-trained tiny model follow its prompt.
        prediction_type="v_prediction",
        scheduler={"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        notes="0.8M-parameter UNet (208 tensors), pixel space, v-prediction; a CPU training step takes a "
              "fraction of a second",
    ),
    "small": Preset(
        name="small",
        # Same block structure as SD v1.5 (4 levels, 686 tensors), 1/6.7 of the width.
        unet=_sd_unet(block_out_channels=(48, 96, 192, 192), cross_attention_dim=128,
                      norm_num_groups=16),
        text_encoder=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=128),
        vae=dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                 norm_num_groups=16, scaling_factor=1.0),
        space="latent",
        resolution=64,
        notes="SD v1.5 block structure (686 tensors) at CPU-benchmark size; 64 px -> 16x16 latents",
    ),
    "sd15": Preset(
        name="sd15",
        unet=_sd_unet(),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                          vocab_size=49408),
        vae=dict(_SD_VAE),
        resolution=512,
        notes="Stable Diffusion v1.5: 859,520,964 UNet parameters in 686 tensors",
    ),
    "sd21": Preset(
        name="sd21",
        unet=_sd_unet(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                      use_linear_projection=True),
        text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, projection_dim=512, hidden_act="gelu",
                          vocab_size=49408),
        vae=dict(_SD_VAE),
        resolution=768,
        prediction_type="v_prediction",
        notes="Stable Diffusion v2.1 (768 px, v-prediction)",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def build_unet(preset: str | Preset, *, space: str | None = None, resolution: int | None = None,
               device: str | torch.device | None = None):
    """Build a randomly initialised UNet of a preset.

    Args:
        preset: preset name or object.
        space: 'latent' (4 channels at resolution / VAE factor) or 'pixel' (3 channels).
        resolution: image resolution in pixels; defaults to the preset's.
        device: where to allocate; 'meta' builds the shapes without memory.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    space = space or p.space
    resolution = resolution or p.resolution
    if space == "latent":
        channels, size = p.vae["latent_channels"], resolution // vae_scale_factor(p.vae)
    elif space == "pixel":
        channels, size = 3, resolution
    else:
        raise ModelError(f"space must be 'latent' or 'pixel', got {space!r}")
    with torch.device(device or "cpu"):
        return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                    **p.unet)


def build_text_encoder(preset: str | Preset, tokenizer, device: str | torch.device | None = None):
    p = get_preset(preset) if isinstance(preset, str) else preset
    cfg = dict(p.text_encoder)
    cfg.setdefault("vocab_size", len(tokenizer))
    if cfg["vocab_size"] < len(tokenizer):
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, text encoder only {cfg['vocab_size']}")
    config = CLIPTextConfig(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **cfg)
    with torch.device(device or "cpu"):
        return CLIPTextModel(config)


def build_vae(preset: str | Preset, device: str | torch.device | None = None):
    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device(device or "cpu"):
        return AutoencoderKL(in_channels=3, out_channels=3, **p.vae)


def param_summary(module: nn.Module) -> tuple[int, int]:
    """(number of parameter tensors, number of parameters)."""
    params = list(module.parameters())
    return len(params), sum(p.numel() for p in params)
