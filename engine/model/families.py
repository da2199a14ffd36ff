"""The supported model families, by name, and how a diffusers folder says which one it holds.

``sd`` (SD 1.x/2.x), ``sdxl``, ``sd3`` and ``flux`` (``model.family_unet``, ``model.family_dit``).
A folder's family comes from its ``model_index.json`` (the pipeline class diffusers wrote), or,
without one, from its denoiser: ``transformer/`` names its class; a ``unet/`` with
``addition_embed_type="text_time"`` is SDXL's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.model.family import Family
from freezeasguard.engine.model.family_dit import FluxFamily, SD3Family
from freezeasguard.engine.model.family_unet import SDFamily, SDXLFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (SDFamily(), SDXLFamily(), SD3Family(), FluxFamily())}
_BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}
_BY_PIPELINE.update({"StableDiffusionXLImg2ImgPipeline": FAMILIES["sdxl"], "FluxImg2ImgPipeline": FAMILIES["flux"],
                     "StableDiffusion3Img2ImgPipeline": FAMILIES["sd3"]})
TEXT_CLASSES: dict[str, type[nn.Module]] = {"clip": CLIPTextModel, "clip_proj": CLIPTextModelWithProjection,
                                            "t5": T5EncoderModel}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def family_of(model: nn.Module) -> Family:
    """The family of a denoiser module (unwrapping DDP/FSDP-style ``.module`` wrappers)."""
    model = getattr(model, "module", model)
    cls = type(getattr(model, "_orig_mod", model))
    for fam in FAMILIES.values():
        if issubclass(cls, fam.denoiser_class):
            if fam.denoiser_dir == "unet":
                text_time = getattr(model.config, "addition_embed_type", None) == "text_time"
                return FAMILIES["sdxl"] if text_time else FAMILIES["sd"]
            return fam
    raise ModelError(f"{cls.__name__} is not the denoiser of a supported model family "
                     f"({', '.join(sorted(FAMILIES))})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj


def detect_family(folder: str | os.PathLike) -> Family:
    """The family of a diffusers checkout (ours or one saved by diffusers)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        cls = str(_read_json(index).get("_class_name", ""))
        if cls in _BY_PIPELINE:
            return _BY_PIPELINE[cls]
    tcfg = folder / "transformer" / "config.json"
    if tcfg.is_file():
        cls = str(_read_json(tcfg).get("_class_name", ""))
        for fam in FAMILIES.values():
            if fam.denoiser_class.__name__ == cls:
                return fam
        raise ModelError(f"{folder}: transformer/ holds a {cls or 'nameless'} model; supported: "
                         + ", ".join(f.denoiser_class.__name__ for f in FAMILIES.values() if f.denoiser_dir == "transformer"))
    if (folder / "unet").is_dir():  # a unet/ without a config fails at loading, naming what it lacks
        ucfg = folder / "unet" / "config.json"
        text_time = ucfg.is_file() and _read_json(ucfg).get("addition_embed_type") == "text_time"
        return FAMILIES["sdxl"] if text_time else FAMILIES["sd"]
    raise ModelError(f"model folder {str(folder)!r} has neither unet/ nor transformer/ (expected the layout "
                     "save_pretrained writes for a diffusers pipeline)")


def build_text_encoder(kind: str, config: dict[str, Any], tokenizer) -> nn.Module:
    """A randomly initialised text encoder of ``kind`` ('clip', 'clip_proj', 't5') for ``tokenizer``."""
    cfg = dict(config)
    cfg.setdefault("vocab_size", len(tokenizer))
    if cfg["vocab_size"] < len(tokenizer):
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, text encoder only {cfg['vocab_size']}")
    if kind == "t5":
        return T5EncoderModel(T5Config(pad_token_id=tokenizer.pad_token_id or 0, **cfg))
    if kind not in ("clip", "clip_proj"):
        raise ModelError(f"unknown text encoder kind {kind!r}; one of {sorted(TEXT_CLASSES)}")
    config = CLIPTextConfig(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    return TEXT_CLASSES[kind](config)
