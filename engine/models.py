"""Model presets and Stable-Diffusion-layout folders.

A *preset* names a UNet (diffusers' ``UNet2DConditionModel``), a CLIP text encoder and a VAE
configuration. ``sd15``/``sd21`` are the real Stable Diffusion shapes (build them on the ``meta``
device to inspect them for free); ``tiny`` and ``small`` are SD-shaped models that train on a CPU.
Nothing is downloaded: weights come from a folder in the layout ``save_pretrained`` writes for a
Stable Diffusion checkout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or
are initialised from the config.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freezeasguard.engine.diffusion import NoiseSchedule
from freezeasguard.engine.io import atomic_dir, save_safetensors_atomic

# Vocabulary of the offline word-level tokenizer used by the small presets. Real checkouts carry
# their own (CLIP BPE) tokenizer in tokenizer/, which load_components() picks up instead.
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_BASE_WORDS = (
    "a an the of in on at with and or by for to from this that is are photo picture image drawing "
    "painting sketch portrait style digit number handwritten written black white gray dark light "
    "small large big face person man woman artist art logo sign letter texture pattern crop "
    "flower building sky tree water street cat dog bird car house city landscape close up view "
    "blurry sharp simple detailed high quality low red green blue yellow"
).split()


class ModelError(ValueError):
    """A model folder or preset that cannot be used; the message names the problem."""


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
        notes="0.8M-parameter UNet (208 tensors); a CPU training step takes a fraction of a second",
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
    from diffusers import UNet2DConditionModel

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


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """An offline word-level tokenizer (lower-cased, punctuation split) that loads like CLIP's.

    Words outside the vocabulary map to ``<|unk|>``; pass ``extra_words`` (e.g. all caption words
    of a dataset) to cover them.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    words: list[str] = []
    for w in [*_NUMBER_WORDS, *_BASE_WORDS, *(x.lower() for x in extra_words)]:
        if w not in words and w not in specials:
            words.append(w)
    words += [str(d) for d in range(10) if str(d) not in words]
    words += [c for c in ",.;:!?'-()" if c not in words]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|unk|>", pad_token="<|endoftext|>", model_max_length=77)


def build_text_encoder(preset: str | Preset, tokenizer, device: str | torch.device | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

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
    from diffusers import AutoencoderKL

    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device(device or "cpu"):
        return AutoencoderKL(in_channels=3, out_channels=3, **p.vae)


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
                     seed: int = 0) -> Components:
    """Randomly initialised networks of a preset (seeded), on the CPU."""
    p = get_preset(preset)
    space = space or p.space
    resolution = resolution or p.resolution
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_words)
    unet = build_unet(p, space=space, resolution=resolution)
    text_encoder = build_text_encoder(p, tokenizer)
    vae = build_vae(p) if space == "latent" else None
    schedule = NoiseSchedule(prediction_type=prediction_type or p.prediction_type)
    return Components(unet, text_encoder, tokenizer, vae, schedule, resolution, source=preset)


def save_components(c: Components, path: str | os.PathLike, *, unet_state: dict | None = None,
                    extra_json: dict[str, Any] | None = None) -> Path:
    """Write a Stable-Diffusion-layout folder atomically (the whole folder appears at once).

    ``unet_state`` overrides the UNet's tensors written (e.g. the original fp32 values of frozen
    tensors that were held in low precision during training); ``extra_json`` maps file names to
    objects written as JSON inside the folder (e.g. the freeze proof).
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
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
            "scheduler": ["diffusers", "DDPMScheduler"],
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
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    missing = [d for d in ("unet", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise ModelError(f"model folder {str(path)!r} lacks {', '.join(d + '/' for d in missing)} "
                         "(expected the layout save_pretrained writes for Stable Diffusion)")
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    vae = (AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype)
           if (path / "vae").is_dir() else None)
    schedule = (NoiseSchedule.load(path / "scheduler") if (path / "scheduler").is_dir()
                else NoiseSchedule())
    resolution = None
    index = path / "model_index.json"
    if index.is_file():
        resolution = json.loads(index.read_text()).get("_freezeasguard", {}).get("resolution")
    if resolution is None:
        factor = vae_scale_factor(dict(vae.config)) if vae is not None else 1
        resolution = int(unet.config.sample_size) * factor
    return Components(unet, text_encoder, tokenizer, vae, schedule, int(resolution), source=str(path))


def caption_words(captions: list[str]) -> tuple[str, ...]:
    """Distinct lower-cased words of captions, in first-seen order (for build_tokenizer)."""
    seen: dict[str, None] = {}
    for c in captions:
        for w in re.findall(r"[a-z0-9]+", c.lower()):
            seen.setdefault(w, None)
    return tuple(seen)


def param_summary(module: nn.Module) -> tuple[int, int]:
    """(number of parameter tensors, number of parameters)."""
    params = list(module.parameters())
    return len(params), sum(p.numel() for p in params)
