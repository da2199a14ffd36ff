"""What a user may ask for: the job spec, parsed strictly.

A job spec declares the fields a user might send to lift the guard (``train_text_encoder``,
``train_embeddings``, ``unfreeze``, ``freeze``, ...) so that they are refused with the reason
(``service.policy.spec_problems``) rather than reported as unknown keys; any other unknown key is a
parse error naming the closest valid key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezeasguard.engine.config import from_dict, load_file
from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.service.caps import raw_type_problems

METHODS = ("full", "lora")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class DataSpec:
    path: str = ""
    """Image folder with metadata.jsonl (required)."""
    caption_column: str = "text"
    """Caption key in metadata.jsonl."""
    domains: list[str] | None = None
    """Keep only images of these domains (None = all)."""


@dataclass
class LoraSpec:
    rank: int = 4
    """Adapter rank r (B is out x r, A is r x in)."""
    alpha: float = 4.0
    """Scaling numerator: the adapter adds (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module name patterns: a bare name matches modules named so or ending in '.name'; a glob
    (with * ? [) is matched against full module names."""
    skip_frozen: bool = False
    """Leave out the matched modules that hold a frozen tensor (the job record lists them) instead
    of refusing the job; an adapter never goes on a frozen module either way."""


@dataclass
class HyperSpec:
    lr: float = 1e-5
    """Peak learning rate."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Global batch per optimizer step."""
    resolution: int | None = None
    """Image resolution; None = the base model's (any other value must equal it)."""
    seed: int = 0
    """Seed of data order, noise and timesteps."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further TrainConfig settings (e.g. warmup_steps, weight_decay, mixed_precision)."""


@dataclass
class JobSpec:
    data: DataSpec = field(default_factory=DataSpec)
    """Training images and captions."""
    method: str = "full"
    """'full' (every trainable UNet tensor) or 'lora' (adapters on trainable modules)."""
    lora: LoraSpec | None = None
    """LoRA settings (method 'lora'; defaults if omitted)."""
    train: HyperSpec = field(default_factory=HyperSpec)
    """Hyperparameters."""
    name: str | None = None
    """Free-form label copied into the job record."""
    # Bypass attempts: declared so that they are refused with a reason, never silently ignored.
    train_text_encoder: bool = False
    """Refused: the text encoder is locked."""
    train_embeddings: bool = False
    """Refused: token embeddings are locked (textual inversion)."""
    train_vae: bool = False
    """Refused: the VAE is locked."""
    unfreeze: list[str] = field(default_factory=list)
    """Refused: the freeze is the publisher's; no tensor can be unfrozen by a job."""
    freeze: dict[str, Any] | None = None
    """Refused: freeze settings are fixed by the service."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def lora_settings(self) -> LoraSpec:
        return self.lora if self.lora is not None else LoraSpec()

    @classmethod
    def from_dict(cls, data: Any, source: str = "job spec") -> "JobSpec":
        bad = raw_type_problems(cls, data)
        if bad:
            raise ConfigError(f"{source}: " + "; ".join(bad))
        try:
            spec = from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        for where, value in (("train.extra", spec.train.extra), ("freeze", spec.freeze)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: {where} must be a mapping, got {type(value).__name__}")
        if not spec.data.path:
            raise ConfigError(f"{source}: missing required key 'data.path' (the image folder)")
        return spec

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JobSpec":
        """Read a YAML or JSON job spec (strict: unknown keys name the closest valid key).

        A relative ``data.path`` is resolved against the spec file's folder.
        """
        path = Path(path)
        spec = cls.from_dict(load_file(path), source=f"job spec {str(path)!r}")
        if not Path(spec.data.path).is_absolute():
            spec.data.path = str(path.parent / spec.data.path)
        return spec
