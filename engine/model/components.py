"""The networks of one model (``Components``), built from a preset or read from a folder.

Weights come from a folder in the layout ``save_pretrained`` writes for a Stable Diffusion checkout
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or are initialised from a
preset's config (``model.presets``). Folders are written atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel
from transformers.utils import logging as hf_logging

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.io import atomic_dir, save_safetensors_atomic
from freezeasguard.engine.model.diffusion import SD_SCHEDULER, NoiseSchedule
from freezeasguard.engine.model.presets import build_text_encoder, build_unet, build_vae, get_preset, vae_scale_factor
from freezeasguard.engine.model.tokenizer import build_tokenizer


@dataclass
class Components:
    """The networks and noise schedule of one text-to-image diffusion model."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module | None  # None in pixel space
    schedule: NoiseSchedule
    resolution: int
    source: str = "preset"  # preset name or folder path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    def vae_scaling(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    def to(self, device: torch.device | str) -> "Components":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        self.schedule = self.schedule.to(device)
        return self


def build_components(preset: str, *, space: str | None = None, resolution: int | None = None,
                     prediction_type: str | None = None, extra_words: tuple[str, ...] = (),
                     seed: int = 0, tokenizer: str = "auto") -> Components:
    """Randomly initialised networks of a preset (seeded), on the CPU.

    Args:
        extra_words: caption words the word-level tokenizer must know (ignored by CLIP's BPE).
        tokenizer: 'auto', 'clip' or 'word' (``model.tokenizer.build_tokenizer``).
    """
    p = get_preset(preset)
    space = space or p.space
    resolution = resolution or p.resolution
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_words, kind=tokenizer)
    unet = build_unet(p, space=space, resolution=resolution)
    text_encoder = build_text_encoder(p, tok)
    vae = build_vae(p) if space == "latent" else None
    schedule = NoiseSchedule({**SD_SCHEDULER, **p.scheduler}, prediction_type=prediction_type or p.prediction_type)
    return Components(unet, text_encoder, tok, vae, schedule, resolution, source=preset)


@contextlib.contextmanager
def _no_hub_progress_bars():
    # transformers draws a progress bar for every load and save, even of a 36-tensor text encoder.
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_components(c: Components, path: str | os.PathLike, *, unet_state: dict | None = None,
                    extra_json: dict[str, Any] | None = None) -> Path:
    """Write a Stable-Diffusion-layout folder atomically (the whole folder appears at once).

    ``unet_state`` overrides the UNet's tensors written (e.g. the original fp32 values of frozen
    tensors that were held in low precision during training); ``extra_json`` maps file names to
    objects written as JSON inside the folder (e.g. the freeze proof).
    """
    path = Path(path)
    with atomic_dir(path) as tmp, _no_hub_progress_bars():
        # The config through diffusers, the weights ourselves: the exact tensors given (diffusers'
        # save_pretrained would write the live module, e.g. bf16 copies of frozen tensors).
        c.unet.save_config(tmp / "unet")
        state = unet_state if unet_state is not None else c.unet.state_dict()
        save_safetensors_atomic(state, tmp / "unet" / "diffusion_pytorch_model.safetensors",
                                metadata={"format": "pt"})
        c.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        c.tokenizer.save_pretrained(tmp / "tokenizer")
        if c.vae is not None:
            c.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        c.schedule.save(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_freezeasguard": {"resolution": c.resolution, "source": c.source},
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", type(c.tokenizer).__name__],
            "scheduler": ["diffusers", c.schedule.config.get("_class_name", "DDIMScheduler")],
            "vae": ["diffusers", "AutoencoderKL"] if c.vae is not None else [None, None],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return path


def load_components(path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32) -> Components:
    """Load a Stable-Diffusion-layout folder (ours, or a real checkout saved by diffusers).

    A folder without ``vae/`` is a pixel-space model.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise ModelError(f"model folder {str(path)!r} lacks {', '.join(d + '/' for d in missing)} "
                         "(expected the layout save_pretrained writes for Stable Diffusion)")
    with _no_hub_progress_bars():
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        vae = (AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype)
               if (path / "vae").is_dir() else None)
    schedule = NoiseSchedule.load(path / "scheduler")
    resolution = None
    index = path / "model_index.json"
    if index.is_file():
        resolution = json.loads(index.read_text()).get("_freezeasguard", {}).get("resolution")
    if resolution is None:
        factor = vae_scale_factor(dict(vae.config)) if vae is not None else 1
        resolution = int(unet.config.sample_size) * factor
    return Components(unet, text_encoder, tokenizer, vae, schedule, int(resolution), source=str(path))
