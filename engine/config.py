"""Typed configuration: dataclasses with a docstring per field, named presets, strict parsing.

A config is built from a preset, then a YAML/JSON file, then ``key.sub=value`` overrides. Any
unknown key is rejected with the closest valid key named, so a typo never silently does nothing.
The resolved config is written next to every result (``to_dict``).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from freezeasguard.engine.errors import ConfigError
from freezeasguard.kernels.choices import COMPACT_STATE_KINDS, STATE_KINDS


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model preset: SD 1.x/2.x 'tiny', 'small', 'sd15', 'sd21'; 'sdxl-tiny', 'sdxl'; 'sd3-tiny', 'sd3'
    (SD3-medium's MMDiT); 'flux-tiny', 'flux' (FLUX.1 [dev]); ignored when `pretrained` is set."""
    pretrained: str | None = None
    """Folder in a diffusers pipeline's layout (unet/ or transformer/, text_encoder*/, tokenizer*/,
    [vae/], scheduler/) of any supported family (SD 1.x/2.x, SDXL, SD3, Flux)."""
    space: str | None = None
    """'latent' (VAE) or 'pixel'; None = the preset's default."""
    resolution: int | None = None
    """Image resolution in pixels; None = the preset's (or the folder's) default."""
    prediction_type: str | None = None
    """'epsilon' or 'v_prediction' (UNet families); None = the preset's or the folder scheduler's
    ('flow' for SD3 and Flux, which are trained with flow matching and take no other)."""
    attention: str = "auto"
    """Attention backend: 'auto' (xformers where it runs, else torch SDPA), 'xformers' or 'sdpa'."""
    tokenizer: str = "auto"
    """Tokenizer of a model built from a preset: 'clip' (Stable Diffusion's BPE; needs
    `pip install --no-deps open-clip-torch`), 'word' (one token per caption word) or 'auto' (clip
    where installed). A folder brings its own."""


@dataclass
class DataConfig:
    path: str = "digits"
    """'digits' (built-in, scikit-learn's handwritten digits) or an image folder with metadata.jsonl."""
    caption_column: str = "text"
    """Caption key in metadata.jsonl."""
    domains: list[str] | None = None
    """Keep only images whose `domain` is one of these (None = all)."""
    center_crop: bool = True
    """Center-crop to a square after resizing the short side (else random crop)."""
    random_flip: bool = False
    """Horizontal flip with probability 1/2 (cached as both orientations)."""
    skip_bad: bool = False
    """Skip unreadable images / bad lines and report each one, instead of failing."""
    cache: bool = True
    """Precompute VAE latents and text embeddings once (the encoders are frozen)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch per optimizer step (split across processes and accumulation micro-steps)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps, then `lr_schedule`."""
    lr_schedule: str = "constant"
    """After warm-up: 'constant', or 'cosine' decay to `min_lr_ratio` * lr at the last step."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of the peak learning rate."""
    optimizer: str = "adamw"
    """'adamw' (torch, fused where available; the engine's flat AdamW under freeze.mode=engine) or
    'adamw8bit' (bitsandbytes, per tensor)."""
    optimizer_states: str = "fp32"
    """Engine AdamW moments: 'fp32', 'bf16' (stochastic rounding) or '8bit' (blockwise); freeze.mode=engine."""
    update_in_backward: bool = False
    """Engine: step each tensor as soon as its gradient is complete, with no gradient buffer (clipping
    then uses the previous step's norm; no grad_accum, no DDP)."""
    compile: str = "none"
    """torch.compile of the UNet by region: 'none', 'blocks' (each down/mid/up block) or 'layers'."""
    weight_decay: float = 1e-2
    """Decoupled weight decay for matrices/kernels (biases and norms get none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None = no clipping)."""
    mixed_precision: str = "fp32"
    """'fp32' or 'bf16' (autocast, fp32 master weights)."""
    gradient_checkpointing: bool = False
    """Recompute UNet block activations in backward."""
    seed: int = 0
    """Seed of data order, noise and timesteps (step-indexed: resume is bit-exact)."""
    log_every: int = 1
    """Write a JSONL log row every N steps."""
    checkpoint_every: int | None = 0
    """Write a resumable checkpoint every N steps and at the last step (0 = at the last step only;
    null = never, e.g. for throwaway benchmark runs)."""
    keep_checkpoints: int | None = None
    """Keep only the newest N checkpoints (null = keep all)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda[:i]'."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    progress: bool = True
    """Show a progress bar."""
    parallel: str = "ddp"
    """Data parallelism over several processes (torchrun): 'ddp' (every process holds the whole UNet)
    or 'fsdp' (FSDP2: each holds a shard of every UNet tensor, for models that do not fit one device;
    not with update_in_backward, adamw8bit or compile)."""


@dataclass
class FreezeConfig:
    mode: str = "full"
    """'full' (every tensor trainable), 'naive' (requires_grad off, stock optimizer) or 'engine'."""
    manifest: str | None = None
    """Freeze manifest (JSON) to enforce; required for 'naive'/'engine' unless `ratio` is set."""
    ratio: float | None = None
    """Without a manifest: freeze a seeded random fraction of the UNet (for benchmarks)."""
    budget_by: str = "params"
    """How `ratio` counts: 'params' or 'tensors'."""
    frozen_dtype: str = "auto"
    """Storage dtype of frozen tensors: 'auto' (bf16 under bf16 autocast, else fp32), 'fp32', 'bf16'."""
    frozen_conv: bool = True
    """Run frozen convolutions through an autograd function that does not save their input."""
    prefix_skip: bool = True
    """Engine: run the frozen prefix of the forward (every module before the first trainable one, fed
    only by inputs that need no gradient) under no_grad."""


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training images and captions."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Which tensors are frozen, and how the engine treats them."""
    out_dir: str = "runs/finetune"
    """Where logs, checkpoints and the final model are written."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "FinetuneConfig":
        checks = [
            (self.model.space in (None, "latent", "pixel"), "model.space must be 'latent', 'pixel' or null"),
            (self.model.prediction_type in (None, "epsilon", "v_prediction", "flow"),
             "model.prediction_type must be 'epsilon', 'v_prediction', 'flow' or null"),
            (self.model.attention in ("auto", "xformers", "sdpa"), "model.attention must be auto|xformers|sdpa"),
            (self.model.tokenizer in ("auto", "clip", "word"), "model.tokenizer must be auto|clip|word"),
            (self.train.steps >= 1, "train.steps must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.batch_size % self.train.grad_accum == 0,
             "train.batch_size must be divisible by train.grad_accum"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (self.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
            (0.0 <= self.train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
            (self.train.mixed_precision in ("fp32", "bf16"), "train.mixed_precision must be 'fp32' or 'bf16'"),
            (self.train.optimizer in ("adamw", "adamw8bit"), "train.optimizer must be 'adamw' or 'adamw8bit'"),
            (self.train.max_grad_norm is None or self.train.max_grad_norm > 0, "train.max_grad_norm must be > 0"),
            (self.train.checkpoint_every is None or self.train.checkpoint_every >= 0,
             "train.checkpoint_every must be >= 0 or null"),
            (self.train.keep_checkpoints is None or self.train.keep_checkpoints >= 1,
             "train.keep_checkpoints must be >= 1 or null"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.freeze.mode in ("full", "naive", "engine"), "freeze.mode must be full|naive|engine"),
            (self.freeze.budget_by in ("params", "tensors"), "freeze.budget_by must be 'params' or 'tensors'"),
            (self.freeze.ratio is None or 0.0 <= self.freeze.ratio <= 1.0, "freeze.ratio must be in [0, 1]"),
            (self.freeze.frozen_dtype in ("auto", "fp32", "bf16"), "freeze.frozen_dtype must be auto|fp32|bf16"),
            (self.train.optimizer_states in STATE_KINDS,
             f"train.optimizer_states must be {'|'.join(STATE_KINDS)}, got {self.train.optimizer_states!r}"),
            (self.train.optimizer_states not in COMPACT_STATE_KINDS
             or (self.freeze.mode == "engine" and self.train.optimizer == "adamw"),
             f"train.optimizer_states={'|'.join(COMPACT_STATE_KINDS)} needs freeze.mode=engine and "
             "train.optimizer=adamw (the flat AdamW; train.optimizer=adamw8bit is bitsandbytes' per-tensor 8-bit AdamW)"),
            (not self.train.update_in_backward or (self.freeze.mode == "engine" and self.train.optimizer == "adamw"),
             "train.update_in_backward needs freeze.mode=engine and train.optimizer=adamw"),
            (not self.train.update_in_backward or self.train.grad_accum == 1,
             "train.update_in_backward needs train.grad_accum=1 (each tensor is updated from its first gradient)"),
            (self.train.compile in ("none", "blocks", "layers"), "train.compile must be none|blocks|layers"),
            (self.train.parallel in ("ddp", "fsdp"),
             f"train.parallel must be 'ddp' or 'fsdp', got {self.train.parallel!r}"),
            *[(self.train.parallel != "fsdp" or ok, f"train.parallel=fsdp does not run with {what}")
              for ok, what in _fsdp_conflicts(self.train)],
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
        return self


def _fsdp_conflicts(tc: TrainConfig) -> list[tuple[bool, str]]:
    """(setting is fine, what it is) for the train settings FSDP sharding refuses (``train.fsdp``)."""
    return [(not tc.update_in_backward, "train.update_in_backward (FSDP reduce-scatters gradients after backward)"),
            (tc.optimizer == "adamw", f"train.optimizer={tc.optimizer} (bitsandbytes does not step DTensor shards)"),
            (tc.compile == "none", f"train.compile={tc.compile} (regions are not compiled over FSDP units)")]


# Named presets: overrides applied on top of the defaults.
CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"preset": "tiny"},
             "train": {"batch_size": 16, "lr": 1e-3, "steps": 100}},
    "small": {"model": {"preset": "small"},
              "train": {"batch_size": 4, "lr": 3e-4, "steps": 100}},
    "sd15": {"model": {"preset": "sd15", "resolution": 512},
             "train": {"batch_size": 4, "lr": 1e-5, "steps": 2000, "mixed_precision": "bf16",
                       "gradient_checkpointing": True}},
    "sd21": {"model": {"preset": "sd21", "resolution": 768},
             "train": {"batch_size": 4, "lr": 1e-5, "steps": 2000, "mixed_precision": "bf16",
                       "gradient_checkpointing": True}},
    **{name: {"model": {"preset": name}, "train": {"batch_size": 8, "lr": 1e-3, "steps": 100}}
       for name in ("sdxl-tiny", "sd3-tiny", "flux-tiny")},
    **{name: {"model": {"preset": name, "resolution": 1024},
              "train": {"batch_size": 1, "lr": 1e-5, "steps": 2000, "mixed_precision": "bf16",
                        "gradient_checkpointing": True}}
       for name in ("sdxl", "sd3", "flux")},
}


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a nested dict, strictly (unknown keys are errors).

    ``base``: an instance whose values are kept for keys that ``data`` does not set.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key {full!r}{_closest(key, list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{where}.{name}" if where else name
        current = getattr(base, name) if base is not None else None
        if name in data:
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                kwargs[name] = from_dict(tp, data[name], full, base=current)
            else:
                kwargs[name] = _coerce(data[name], tp, full)
        elif base is not None:
            kwargs[name] = current
    return cls(**kwargs)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}} (values parsed as YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def resolve(cls: type = FinetuneConfig, *, preset: str | None = None, file: str | None = None,
            overrides: list[str] | tuple[str, ...] = (), presets: dict[str, dict] | None = None) -> Any:
    """Preset, then file, then overrides; strict at every layer."""
    presets = CONFIG_PRESETS if presets is None else presets
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown config preset {preset!r}{_closest(preset, list(presets))}")
        data = _deep_merge(data, presets[preset])
    if file is not None:
        data = _deep_merge(data, load_file(file))
    for o in overrides:
        data = _deep_merge(data, parse_override(o))
    cfg = from_dict(cls, data)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs
