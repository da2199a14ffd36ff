"""Model presets: the configurations of a text-to-image latent diffusion model's networks.

A *preset* names a model family (``model.families``: ``sd``, ``sdxl``, ``sd3``, ``flux``), the
configuration of its denoiser (diffusers' ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
``FluxTransformer2DModel``), of each of its text encoders, of its VAE and of its training process.
``sd15``/``sd21``/``sdxl``/``sd3``/``flux`` are the real published shapes (build them on the
``meta`` device to inspect them for free); ``tiny``, ``small`` and the ``*-tiny`` presets are
models of the same structure that train on a CPU. Nothing is downloaded: networks are initialised
from these configs, or loaded from a folder (``model.components``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.model.families import build_text_encoder as _build_text
from freezeasguard.engine.model.families import get_family


@dataclass(frozen=True)
class Preset:
    """Configurations of the networks of a text-to-image latent diffusion model.

    ``unet`` is the denoiser's configuration whatever its class (a UNet or a diffusion
    transformer, per ``family``); ``text_encoder`` the first text encoder's and
    ``extra_text_encoders`` the others', in the family's slot order (``Family.text_slots``).
    """

    name: str
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    family: str = "sd"
    extra_text_encoders: tuple[dict[str, Any], ...] = ()
    space: str = "latent"  # default space: 'latent' (VAE) or 'pixel'
    resolution: int = 512  # default image resolution in pixels
    prediction_type: str = "epsilon"
    scheduler: dict[str, Any] = field(default_factory=dict)  # settings over the family's default process
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


# Text encoders of the published models: CLIP ViT-L/14 (SD v1, SDXL, SD3, Flux), OpenCLIP ViT-bigG/14
# (SDXL, SD3) and T5 v1.1 XXL's encoder (SD3, Flux).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               projection_dim=1280, hidden_act="gelu", vocab_size=49408)
_T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False)
_DIT_VAE = dict(_SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_TINY_CLIP16 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
_TINY_T5 = dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False)


def _tiny_vae(latent_channels: int, **extra: Any) -> dict[str, Any]:
    return dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=latent_channels,
                norm_num_groups=8, **extra)


_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                   "max_image_seq_len": 4096}

PRESETS.update({
    "sdxl-tiny": Preset(
        name="sdxl-tiny", family="sdxl",
        unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                  cross_attention_dim=64, attention_head_dim=(4, 8), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
        text_encoder=dict(_TINY_CLIP), extra_text_encoders=(dict(_TINY_CLIP),),
        vae=_tiny_vae(4, scaling_factor=0.13025), resolution=32,
        notes="SDXL's structure (size/crop conditioning, two text encoders, deeper attention at low "
              "resolution) at CPU size; 32 px -> 16x16 latents",
    ),
    "sdxl": Preset(
        name="sdxl", family="sdxl",
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, norm_num_groups=32),
        text_encoder=dict(_CLIP_L), extra_text_encoders=(dict(_CLIP_G),),
        vae=dict(_SD_VAE, scaling_factor=0.13025), resolution=1024,
        notes="Stable Diffusion XL base 1.0: 2,567,463,684 UNet parameters in 1,680 tensors",
    ),
    "sd3-tiny": Preset(
        name="sd3-tiny", family="sd3",
        unet=dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                  pooled_projection_dim=32, pos_embed_max_size=16),
        text_encoder=dict(_TINY_CLIP16), extra_text_encoders=(dict(_TINY_CLIP16), dict(_TINY_T5)),
        vae=_tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                      use_post_quant_conv=False),
        resolution=32, prediction_type="flow", scheduler=dict(_SD3_SCHEDULER),
        notes="SD3's MMDiT (joint text/image attention, three text encoders, flow matching) at CPU size",
    ),
    "sd3": Preset(
        name="sd3", family="sd3",
        unet=dict(patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192),
        text_encoder=dict(_CLIP_L), extra_text_encoders=(dict(_CLIP_G), dict(_T5_XXL)),
        vae=dict(_DIT_VAE, scaling_factor=1.5305, shift_factor=0.0609), resolution=1024,
        prediction_type="flow", scheduler=dict(_SD3_SCHEDULER),
        notes="Stable Diffusion 3 medium: 2,028,328,000 transformer parameters in 682 tensors",
    ),
    "flux-tiny": Preset(
        name="flux-tiny", family="flux",
        unet=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(2, 2, 4)),
        text_encoder=dict(_TINY_CLIP), extra_text_encoders=(dict(_TINY_T5),),
        vae=_tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                      use_post_quant_conv=False),
        resolution=32, prediction_type="flow", scheduler=dict(_FLUX_SCHEDULER),
        notes="FLUX.1's structure (double- and single-stream blocks, RoPE, guidance embedding, flow "
              "matching) at CPU size",
    ),
    "flux": Preset(
        name="flux", family="flux",
        unet=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        text_encoder=dict(_CLIP_L), extra_text_encoders=(dict(_T5_XXL),),
        vae=dict(_DIT_VAE, scaling_factor=0.3611, shift_factor=0.1159), resolution=1024,
        prediction_type="flow", scheduler=dict(_FLUX_SCHEDULER),
        notes="FLUX.1 [dev]: 11,901,408,320 transformer parameters in 1,160 tensors",
    ),
})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def build_unet(preset: str | Preset, *, space: str | None = None, resolution: int | None = None,
               device: str | torch.device | None = None):
    """Build a randomly initialised denoiser of a preset (a UNet, or a diffusion transformer).

    Args:
        preset: preset name or object.
        space: 'latent' (the VAE's channels at resolution / VAE factor) or 'pixel' (3 channels;
            UNet families only).
        resolution: image resolution in pixels; defaults to the preset's.
        device: where to allocate; 'meta' builds the shapes without memory.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    fam = get_family(p.family)
    space = space or p.space
    resolution = resolution or p.resolution
    if space not in ("latent", "pixel"):
        raise ModelError(f"space must be 'latent' or 'pixel', got {space!r}")
    if space not in fam.spaces:
        raise ModelError(f"a {fam.name} model runs in latent space only, not {space!r}")
    if space == "latent":
        channels, size = p.vae["latent_channels"], resolution // vae_scale_factor(p.vae)
    else:
        channels, size = 3, resolution
    if size % fam.latent_packing:
        raise ModelError(f"a {fam.name} model needs latents of a size divisible by {fam.latent_packing}; "
                         f"resolution {resolution} gives {size}")
    with torch.device(device or "cpu"):
        return fam.build_denoiser(dict(p.unet), channels, size)


build_denoiser = build_unet


def text_encoder_configs(preset: str | Preset) -> list[dict[str, Any]]:
    p = get_preset(preset) if isinstance(preset, str) else preset
    return [dict(p.text_encoder), *(dict(c) for c in p.extra_text_encoders)]


def build_text_encoder(preset: str | Preset, tokenizer, device: str | torch.device | None = None, slot: int = 0):
    """The text encoder of ``slot`` (0: the first) of a preset, randomly initialised for ``tokenizer``."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    slots = get_family(p.family).text_slots
    configs = text_encoder_configs(p)
    if len(configs) != len(slots):
        raise ModelError(f"preset {p.name!r} has {len(configs)} text encoder configs; a {p.family} model has "
                         f"{len(slots)}")
    with torch.device(device or "cpu"):
        return _build_text(slots[slot].kind, configs[slot], tokenizer)


def build_vae(preset: str | Preset, device: str | torch.device | None = None):
    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device(device or "cpu"):
        return AutoencoderKL(in_channels=3, out_channels=3, **p.vae)


def param_summary(module: nn.Module) -> tuple[int, int]:
    """(number of parameter tensors, number of parameters)."""
    params = list(module.parameters())
    return len(params), sum(p.numel() for p in params)
