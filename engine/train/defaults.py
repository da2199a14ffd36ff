"""The dataset and networks a trainer trains when its caller hands it only a config.

The dataset is loaded at the model's resolution, which must be known before the model is: it is
read from a model folder's index when that records it (no weights loaded twice), else from
``model.resolution`` or the preset.
"""
from __future__ import annotations

import json
from pathlib import Path

from freezeasguard.engine.config import FinetuneConfig
from freezeasguard.engine.model.components import Components, build_components, load_components
from freezeasguard.engine.model.data import load_dataset
from freezeasguard.engine.model.presets import get_preset
from freezeasguard.engine.model.tokenizer import caption_words


def resolution_hint(cfg: FinetuneConfig, components: Components | None) -> int:
    """The resolution the model trains at, loading its weights only when nothing else says."""
    if components is not None:
        return components.resolution
    m = cfg.model
    if m.pretrained:
        index = Path(m.pretrained) / "model_index.json"
        if index.is_file():
            r = json.loads(index.read_text()).get("_freezeasguard", {}).get("resolution")
            if r:
                return int(r)
        if m.resolution:
            return m.resolution
        return load_components(m.pretrained).resolution
    return m.resolution or get_preset(m.preset).resolution


def default_dataset(cfg: FinetuneConfig, resolution: int):
    """``cfg.data`` loaded at ``resolution`` (the built-in digits when ``data.path`` is 'digits')."""
    d = cfg.data
    if d.path == "digits":
        return load_dataset("digits", resolution, domains=d.domains)
    return load_dataset(d.path, resolution, caption_column=d.caption_column, domains=d.domains,
                        center_crop=d.center_crop, skip_bad=d.skip_bad, seed=cfg.train.seed)


def default_components(cfg: FinetuneConfig, dataset) -> Components:
    """The model folder of ``model.pretrained``, or a preset built for ``dataset`` (its resolution,
    and its caption words in a word-level tokenizer)."""
    m = cfg.model
    if m.pretrained:
        return load_components(m.pretrained)
    return build_components(m.preset, space=m.space, resolution=dataset.resolution, prediction_type=m.prediction_type,
                            extra_words=caption_words(dataset.captions), seed=cfg.train.seed, tokenizer=m.tokenizer)
