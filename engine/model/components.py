"""The networks of one model (``Components``), built from a preset or read from a folder.

Weights come from a folder in the layout diffusers' ``save_pretrained`` writes for the model's
pipeline (the denoiser in ``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ... with their ``tokenizer*/``, ``scheduler/``), or are initialised from a
preset's configs (``model.presets``). The family (``model.families``) says which folders exist.
Folders are written atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.io import atomic_dir, save_safetensors_atomic
from freezeasguard.engine.model.diffusion import SD_SCHEDULER, load_schedule, make_schedule
from freezeasguard.engine.model.families import TEXT_CLASSES, detect_family, get_family
from freezeasguard.engine.model.family import Cond, Family
from freezeasguard.engine.model.flow import FLOW_SCHEDULER
from freezeasguard.engine.model.presets import (
    Preset,
    build_text_encoder,
    build_unet,
    build_vae,
    get_preset,
    vae_scale_factor,
)
from freezeasguard.engine.model.tokenizer import build_tokenizer


@dataclass
class Components:
    """The networks and noise schedule of one text-to-image diffusion model.

    ``unet`` is the denoiser whatever its class (a UNet, or a diffusion transformer for the
    ``sd3``/``flux`` families); ``text_encoders``/``tokenizers`` are in the family's slot order.
    """

    unet: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    vae: nn.Module | None  # None in pixel space
    schedule: Any  # NoiseSchedule or FlowSchedule
    resolution: int
    source: str = "preset"  # preset name or folder path
    family: Family = field(default_factory=lambda: get_family("sd"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def frozen_networks(self) -> list[nn.Module]:
        """The networks fine-tuning never trains: the text encoders and the VAE."""
        return [*self.text_encoders, *([self.vae] if self.vae is not None else [])]

    @property
    def space(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.unet)

    @property
    def latent_size(self) -> int:
        return self.resolution // (vae_scale_factor(dict(self.vae.config)) if self.vae is not None else 1)

    def vae_scaling(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    def vae_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0) if self.vae is not None else 0.0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str = "cpu") -> Cond:
        """The family's conditioning of ``prompts`` (fp32), one row per prompt."""
        return Cond(self.family, self.family.encode(self.text_encoders, self.tokenizers, prompts, device,
                                                    self.resolution))

    def to(self, device: torch.device | str) -> "Components":
        for m in (self.unet, *self.frozen_networks):
            m.to(device)
        self.schedule = self.schedule.to(device)
        return self


def build_components(preset: str, *, space: str | None = None, resolution: int | None = None,
                     prediction_type: str | None = None, extra_words: tuple[str, ...] = (),
                     seed: int = 0, tokenizer: str = "auto") -> Components:
    """Randomly initialised networks of a preset (seeded), on the CPU.

    Args:
        extra_words: caption words the word-level tokenizer must know (ignored by CLIP's BPE).
        tokenizer: 'auto', 'clip' or 'word' (``model.tokenizer.build_tokenizer``); every text
            encoder of a preset model shares it.
    """
    p = get_preset(preset)
    fam = get_family(p.family)
    space = space or p.space
    resolution = resolution or p.resolution
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_words, kind=tokenizer)
    unet = build_unet(p, space=space, resolution=resolution)
    encoders = [build_text_encoder(p, tok, slot=i) for i in range(len(fam.text_slots))]
    vae = build_vae(p) if space == "latent" else None
    for m in (*encoders, *([vae] if vae is not None else [])):
        m.eval()  # as from_pretrained hands them back (T5's dropout is on in train mode)
    schedule = preset_schedule(p, prediction_type)
    return Components(unet, encoders, [tok] * len(encoders), vae, schedule, resolution, source=preset, family=fam)


def preset_schedule(preset: str | Preset, prediction_type: str | None = None):
    """The training process of a preset model: its family's default scheduler with the preset's settings."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    base = FLOW_SCHEDULER if get_family(p.family).objective == "flow" else SD_SCHEDULER
    return make_schedule({**base, **p.scheduler}, prediction_type or p.prediction_type)


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
    fam = c.family
    with atomic_dir(path) as tmp, _no_hub_progress_bars():
        # The config through diffusers, the weights ourselves: the exact tensors given (diffusers'
        # save_pretrained would write the live module, e.g. bf16 copies of frozen tensors).
        c.unet.save_config(tmp / fam.denoiser_dir)
        state = unet_state if unet_state is not None else c.unet.state_dict()
        save_safetensors_atomic(state, tmp / fam.denoiser_dir / "diffusion_pytorch_model.safetensors",
                                metadata={"format": "pt"})
        index = {
            "_class_name": fam.pipeline,
            "_freezeasguard": {"resolution": c.resolution, "source": c.source, "family": fam.name},
            fam.denoiser_dir: ["diffusers", type(c.unet).__name__],
            "scheduler": ["diffusers", c.schedule.config.get("_class_name", "DDIMScheduler")],
            "vae": ["diffusers", "AutoencoderKL"] if c.vae is not None else [None, None],
        }
        for enc, tok, edir, tdir in zip(c.text_encoders, c.tokenizers, fam.text_dirs, fam.tokenizer_dirs):
            enc.save_pretrained(tmp / edir, safe_serialization=True)
            tok.save_pretrained(tmp / tdir)
            index[edir] = ["transformers", type(enc).__name__]
            index[tdir] = ["transformers", type(tok).__name__]
        if c.vae is not None:
            c.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        c.schedule.save(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return path


def load_components(path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32) -> Components:
    """Load a diffusers-layout folder of any supported family (ours, or a real checkout).

    A folder without ``vae/`` is a pixel-space model (UNet families only).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    fam = detect_family(path)
    want = [fam.denoiser_dir, *fam.text_dirs, *fam.tokenizer_dirs, "scheduler"]
    missing = [d for d in want if not (path / d).is_dir()]
    if missing:
        raise ModelError(f"model folder {str(path)!r} lacks {', '.join(d + '/' for d in missing)} "
                         f"(expected the layout save_pretrained writes for {fam.pipeline})")
    if not (path / "vae").is_dir() and "pixel" not in fam.spaces:
        raise ModelError(f"model folder {str(path)!r} lacks vae/ (a {fam.name} model runs in latent space)")
    with _no_hub_progress_bars():
        unet = fam.denoiser_class.from_pretrained(path / fam.denoiser_dir, torch_dtype=torch_dtype)
        encoders = [TEXT_CLASSES[slot.kind].from_pretrained(path / d, dtype=torch_dtype)
                    for slot, d in zip(fam.text_slots, fam.text_dirs)]
        tokenizers = [AutoTokenizer.from_pretrained(path / d) for d in fam.tokenizer_dirs]
        vae = (AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype)
               if (path / "vae").is_dir() else None)
    schedule = load_schedule(path / "scheduler")
    resolution = None
    index = path / "model_index.json"
    if index.is_file():
        resolution = json.loads(index.read_text()).get("_freezeasguard", {}).get("resolution")
    if resolution is None:
        factor = vae_scale_factor(dict(vae.config)) if vae is not None else 1
        resolution = int(unet.config.get("sample_size", 128) or 128) * factor
    return Components(unet, encoders, tokenizers, vae, schedule, int(resolution), source=str(path), family=fam)
