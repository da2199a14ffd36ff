"""Diffusion-transformer families trained with flow matching: SD3 (MMDiT) and Flux.

SD3 (``SD3Transformer2DModel``): joint attention over text and image tokens. Its text is CLIP
ViT-L's and OpenCLIP bigG's penultimate hidden states side by side (768 + 1280 features, zero-padded
to T5's width) followed along the sequence by T5 XXL's last hidden states; the pooled input is both
CLIP encoders' projected pooled embeddings (768 + 1280 = 2048). Timesteps enter as ``t`` in [0, T].

Flux (``FluxTransformer2DModel``): double-stream then single-stream blocks with rotary position
ids. The latent is packed 2x2 into tokens of 4C features; text is T5's last hidden states with
position ids 0, the pooled input CLIP ViT-L's pooled output (not projected); timesteps enter as
``t / T``, and FLUX.1 [dev] takes the guidance scale as an input (``guidance_embeds``), trained
here at ``FLUX_TRAIN_GUIDANCE`` as diffusers' fine-tuning scripts do by default.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn

from freezeasguard.engine.model.family import Family, TextSlot, stage_list, tokenize

FLUX_TRAIN_GUIDANCE = 3.5


class SD3Family(Family):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    denoiser_dir = "transformer"
    denoiser_class = SD3Transformer2DModel
    text_slots = (TextSlot("clip_proj"), TextSlot("clip_proj"), TextSlot("t5", max_length=256))
    objective = "flow"

    def build_denoiser(self, config: dict[str, Any], channels: int, size: int) -> nn.Module:
        return SD3Transformer2DModel(sample_size=size, **{"in_channels": channels, **config})

    def encode(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: list[str],
               device: torch.device | str, resolution: int) -> dict[str, torch.Tensor]:
        clip_h, pooled = [], []
        for enc, tok, slot in zip(encoders[:2], tokenizers[:2], self.text_slots[:2]):
            out = enc(tokenize(tok, prompts, slot.max_length).to(device), output_hidden_states=True)
            clip_h.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())
        t5 = encoders[2](tokenize(tokenizers[2], prompts, self._t5_length(tokenizers[2])).to(device))[0].float()
        clip = torch.cat(clip_h, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def _t5_length(self, tok) -> int:
        return min(self.text_slots[2].max_length, int(tok.model_max_length))

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(hidden_states=x_t, encoder_hidden_states=tensors["encoder_hidden_states"],
                     pooled_projections=tensors["pooled_projections"], timestep=t, return_dict=False)[0]

    def forward_stages(self, model: nn.Module) -> list[str]:
        return stage_list(model, ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks",
                                  "norm_out", "proj_out"))

    def blocks(self, model: nn.Module) -> list[str]:
        return stage_list(model, ("transformer_blocks",))


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token (Flux's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for an [H, W] latent."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids (0, row, column) of the packed tokens of an [H, W] latent."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxFamily(Family):
    name = "flux"
    pipeline = "FluxPipeline"
    denoiser_dir = "transformer"
    denoiser_class = FluxTransformer2DModel
    text_slots = (TextSlot("clip"), TextSlot("t5", max_length=512))
    objective = "flow"
    latent_packing = 2

    def build_denoiser(self, config: dict[str, Any], channels: int, size: int) -> nn.Module:  # noqa: ARG002
        return FluxTransformer2DModel(**{"in_channels": channels * 4, **config})

    def encode(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: list[str],
               device: torch.device | str, resolution: int) -> dict[str, torch.Tensor]:
        pooled = encoders[0](tokenize(tokenizers[0], prompts, None).to(device)).pooler_output.float()
        length = min(self.text_slots[1].max_length, int(tokenizers[1].model_max_length))
        hidden = encoders[1](tokenize(tokenizers[1], prompts, length).to(device))[0].float()
        guidance = torch.full((len(prompts),), FLUX_TRAIN_GUIDANCE, device=pooled.device)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "guidance": guidance}

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, h, w = x_t.shape
        text = tensors["encoder_hidden_states"]
        cfg = getattr(model, "config", None) or model.module.config  # DDP/FSDP wrappers
        guidance = tensors["guidance"] if cfg.guidance_embeds else None
        out = model(hidden_states=pack_latents(x_t), encoder_hidden_states=text,
                    pooled_projections=tensors["pooled_projections"], timestep=t.float() / 1000.0,
                    img_ids=image_ids(h, w, x_t.device, x_t.dtype),
                    txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                    guidance=guidance, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def forward_stages(self, model: nn.Module) -> list[str]:
        return stage_list(model, ("x_embedder", "time_text_embed", "context_embedder", "pos_embed",
                                  "transformer_blocks", "single_transformer_blocks", "norm_out", "proj_out"))

    def blocks(self, model: nn.Module) -> list[str]:
        return stage_list(model, ("transformer_blocks", "single_transformer_blocks"))
