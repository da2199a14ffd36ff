"""UNet families: Stable Diffusion 1.x/2.x and SDXL (diffusers' ``UNet2DConditionModel``).

SD 1.x/2.x condition on one CLIP text encoder's last hidden states. SDXL concatenates the
penultimate hidden states of two (CLIP ViT-L and OpenCLIP ViT-bigG, 768 + 1280 = 2048 features),
and adds the second's pooled, projected embedding and the size/crop micro-conditioning
``(original h, w, crop top, left, target h, w)`` through ``addition_embed_type="text_time"``. Images
here are resized and centre-cropped to the model's resolution, so the size conditioning is that
resolution and the crop offset 0, as for SDXL's training at its native size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from freezeasguard.engine.model.family import Family, TextSlot, stage_list, tokenize

# Top-level children of a UNet2DConditionModel in the order its forward runs them.
UNET_ORDER = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
              "encoder_hid_proj", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
              "conv_act", "conv_out")


class UNetFamily(Family):
    denoiser_dir = "unet"
    denoiser_class = UNet2DConditionModel
    spaces = ("latent", "pixel")

    def build_denoiser(self, config: dict[str, Any], channels: int, size: int) -> nn.Module:
        return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels, **config)

    def forward_stages(self, model: nn.Module) -> list[str]:
        return stage_list(model, UNET_ORDER)

    def blocks(self, model: nn.Module) -> list[str]:
        return stage_list(model, ("down_blocks", "mid_block", "up_blocks"))


class SDFamily(UNetFamily):
    name = "sd"
    pipeline = "StableDiffusionPipeline"
    text_slots = (TextSlot("clip"),)

    def encode(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: list[str],
               device: torch.device | str, resolution: int) -> dict[str, torch.Tensor]:
        ids = tokenize(tokenizers[0], prompts, None).to(device)
        return {"encoder_hidden_states": encoders[0](ids)[0].float()}

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(x_t, t, encoder_hidden_states=tensors["encoder_hidden_states"], return_dict=False)[0]


class SDXLFamily(UNetFamily):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    text_slots = (TextSlot("clip"), TextSlot("clip_proj"))

    def encode(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: list[str],
               device: torch.device | str, resolution: int) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for enc, tok in zip(encoders, tokenizers):
            out = enc(tokenize(tok, prompts, None).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's projected pooled embedding (text_embeds)
        n = len(prompts)
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                                dtype=torch.float32, device=pooled.device).expand(n, 6)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
        return model(x_t, t, encoder_hidden_states=tensors["encoder_hidden_states"], added_cond_kwargs=added,
                     return_dict=False)[0]
