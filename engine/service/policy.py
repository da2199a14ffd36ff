"""What a publisher allows (``Policy``), and the rules that compare a job spec with it before any
work starts.

Every check returns a list of problems instead of raising at the first one, so a refusal
(``PolicyViolation``) names everything wrong with a job at once.

Rules enforced (FreezeAsGuard's threat model: the freeze is useless if a job can route around it):

* the base UNet is the one the policy pins (fingerprint), and the manifest was made for it;
* the manifest carries a valid publisher signature over its digest;
* method is allowed; LoRA only on modules whose tensors are *all* trainable under the mask
  (an adapter on a frozen module restores its adaptability as W + BA);
* text encoder, token embeddings and VAE are locked; the freeze cannot be lifted or changed;
* learning rate, steps, batch, resolution and LoRA rank are capped, every other value of a spec is
  finite and bounded, and what scales the update counts against the lr cap (``service.caps``);
  optimizers are allow-listed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from torch import nn

from freezeasguard.engine.config import TrainConfig, from_dict, load_file
from freezeasguard.engine.errors import ConfigError, SignatureError
from freezeasguard.engine.guard.hashing import model_fingerprint, model_folder_files, model_folder_fingerprint
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.io import atomic_write_text
from freezeasguard.engine.service.caps import value_problems
from freezeasguard.engine.service.signing import ALGORITHMS, ED25519, Ed25519Key, Key, load_key, signature_problem
from freezeasguard.engine.service.spec import METHODS, JobSpec
from freezeasguard.kernels.choices import STATE_KINDS

# Train settings the service owns: where and how it runs, not how the model learns.
SERVICE_TRAIN_KEYS = frozenset({"device", "num_threads", "progress", "log_every", "checkpoint_every",
                                "keep_checkpoints", "compile", "update_in_backward", "parallel"})
# Set through JobSpec.train's own fields; `extra` must not restate them.
FIRST_CLASS_TRAIN_KEYS = frozenset({"lr", "steps", "batch_size", "seed"})
# Methods users ask for by name that exist only to train what the guard locks.
_LOCKED_METHODS = {
    "textual_inversion": "trains token embeddings, which are locked",
    "text_encoder": "trains the text encoder, which is locked",
    "dreambooth_text_encoder": "trains the text encoder, which is locked",
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class SignaturePolicy:
    algorithm: str = ED25519
    """'ed25519' (the service holds only the public key) or 'hmac-sha256' (shared secret)."""
    key_file: str | None = None
    """Verification key file (relative to the policy file's folder), the only key a job's manifest
    is checked with (required)."""


@dataclass
class Policy:
    base_fingerprint: str = ""
    """model_fingerprint of the base UNet every job must start from (required)."""
    model_fingerprint: str = ""
    """model_folder_fingerprint of the whole base model folder: every file that affects training or
    sampling (each component's weights and config, tokenizer, scheduler, model_index.json; required)."""
    manifests: list[str] = field(default_factory=list)
    """Digests of the signed manifests a job may run under (required): a manifest the publisher
    signed for some other purpose (one that freezes nothing, say) is refused."""
    min_guard_share: float = 0.0
    """Least share of the UNet's parameters a manifest must guard: frozen parameters plus locked
    degrees of freedom, over all parameters."""
    text_encoder_fingerprint: str | None = None
    """If set, model_fingerprint of the base text encoder (pins it too)."""
    max_lr: float = 1e-4
    """Largest learning rate a job may use."""
    max_steps: int = 2000
    """Most optimizer steps a job may run."""
    max_batch_size: int = 16
    """Largest global batch."""
    max_resolution: int = 512
    """Largest training resolution in pixels."""
    max_lora_rank: int = 64
    """Largest LoRA rank."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Allowed methods ('full', 'lora')."""
    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    """Allowed train.optimizer values."""
    optimizer_states: list[str] = field(default_factory=lambda: ["fp32"])
    """Allowed train.optimizer_states values (the engine AdamW's moments, ``STATE_KINDS``)."""
    max_weight_decay: float = 0.1
    """Largest decoupled weight decay (train.extra.weight_decay)."""
    signature: SignaturePolicy = field(default_factory=SignaturePolicy)
    """How manifests must be signed."""
    log_key_file: str | None = None
    """The service's own signing key (Ed25519 private PEM or HMAC secret; relative to the policy
    file's folder): every job-log entry is signed with it, so a log cannot be rewritten unnoticed
    by whoever can write the file but does not hold this key."""
    data_root: str | None = None
    """If set, every job's data.path must lie inside this folder (relative to the policy file's
    folder); nothing outside it is looked at, so a job cannot probe the service's filesystem."""
    max_images: int = 10_000
    """Most images (metadata lines) a job's dataset may hold."""
    max_image_pixels: int = 4096 * 4096
    """Most pixels (width x height, read from the header before decoding) of one image."""
    max_image_bytes: int = 32 << 20
    """Largest image file in bytes."""
    max_metadata_bytes: int = 16 << 20
    """Largest metadata.jsonl in bytes."""
    max_review_seconds: float = 600.0
    """Longest the service spends reading a dataset before refusing it."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the policy (recorded with every job)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def problems(self) -> list[str]:
        checks = [
            (bool(_HEX64.match(self.base_fingerprint)),
             "base_fingerprint must be the 64-digit hex model_fingerprint of the base UNet"),
            (bool(_HEX64.match(self.model_fingerprint)),
             "model_fingerprint must be the 64-digit hex model_folder_fingerprint of the base model folder"),
            (bool(self.manifests) and all(isinstance(d, str) and _HEX64.match(d) for d in self.manifests),
             "manifests must list the 64-digit hex digest of every manifest a job may run under"),
            (math.isfinite(self.min_guard_share) and 0 <= self.min_guard_share <= 1,
             "min_guard_share must be in [0, 1]"),
            (bool(self.log_key_file), "log_key_file must name the service's log signing key"),
            (self.text_encoder_fingerprint is None or bool(_HEX64.match(self.text_encoder_fingerprint)),
             "text_encoder_fingerprint must be 64 hex digits or null"),
            (math.isfinite(self.max_lr) and 0 < self.max_lr <= 1, "max_lr must be in (0, 1]"),
            (math.isfinite(self.max_weight_decay) and 0 <= self.max_weight_decay <= 1,
             "max_weight_decay must be in [0, 1]"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.max_resolution >= 1, "max_resolution must be >= 1"),
            (self.max_lora_rank >= 1, "max_lora_rank must be >= 1"),
            (bool(self.methods) and set(self.methods) <= set(METHODS),
             f"methods must be a non-empty subset of {list(METHODS)}"),
            (bool(self.optimizers) and set(self.optimizers) <= {"adamw", "adamw8bit"},
             "optimizers must be a non-empty subset of ['adamw', 'adamw8bit']"),
            (bool(self.optimizer_states) and set(self.optimizer_states) <= set(STATE_KINDS),
             f"optimizer_states must be a non-empty subset of {list(STATE_KINDS)}"),
            (self.signature.algorithm in ALGORITHMS, f"signature.algorithm must be one of {list(ALGORITHMS)}"),
            (bool(self.signature.key_file), "signature.key_file must name the publisher's verification key"),
            (self.max_images >= 1, "max_images must be >= 1"),
            (self.max_image_pixels >= 1, "max_image_pixels must be >= 1"),
            (self.max_image_bytes >= 1, "max_image_bytes must be >= 1"),
            (self.max_metadata_bytes >= 1, "max_metadata_bytes must be >= 1"),
            (math.isfinite(self.max_review_seconds) and self.max_review_seconds > 0,
             "max_review_seconds must be a finite number > 0"),
        ]
        return [msg for ok, msg in checks if not ok]

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy", root: Path | None = None) -> "Policy":
        """Parse strictly; a relative ``signature.key_file`` is resolved against ``root``."""
        try:
            policy = from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        problems = policy.problems()
        if problems:
            raise ConfigError(f"{source} is not a usable policy:\n  " + "\n  ".join(problems))
        kf = policy.signature.key_file
        if kf and root is not None and not Path(kf).is_absolute():
            policy.signature.key_file = str(root / kf)
        lk = policy.log_key_file
        if lk and root is not None and not Path(lk).is_absolute():
            policy.log_key_file = str(root / lk)
        dr = policy.data_root
        if dr and root is not None and not Path(dr).is_absolute():
            policy.data_root = str(root / dr)
        return policy

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        path = Path(path)
        return cls.from_dict(load_file(path), source=f"policy {str(path)!r}", root=path.parent)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as YAML, atomically; key files relative to its folder."""
        path = Path(path)
        data = self.to_dict()
        for node, key in ((data["signature"], "key_file"), (data, "log_key_file"), (data, "data_root")):
            if node[key]:  # resolved on both sides, as load() joins it to the policy's real folder
                try:
                    node[key] = os.path.relpath(Path(node[key]).resolve(), path.resolve().parent)
                except ValueError:  # another drive: keep it absolute
                    node[key] = str(Path(node[key]).resolve())
        return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def policy_for(manifests: Manifest | list[Manifest], key_file: str | os.PathLike, base: str | os.PathLike, *,
               log_key_file: str | os.PathLike, text_encoder: nn.Module | Sequence[nn.Module] | None = None,
               **caps: Any) -> Policy:
    """A policy pinning the base model folder ``base`` (and, if given, its text encoders), accepting
    exactly ``manifests`` (each must verify with ``key_file`` and be made for that base), with the
    service's default caps unless ``caps`` sets them; job-log entries are signed with ``log_key_file``."""
    manifests = [manifests] if isinstance(manifests, Manifest) else list(manifests)
    if not manifests:
        raise ConfigError("a policy accepts at least one manifest")
    key = load_key(key_file)
    if isinstance(key, Ed25519Key) and key.private is not None:
        raise SignatureError(f"{key_file} holds a private Ed25519 key: the service verifies with the public half "
                             "only (keygen --public writes it)")
    for m in manifests:
        bad = manifest_signature_problems(m, key)
        if bad:
            raise SignatureError(f"the manifest does not verify with {key_file}: {bad[0]}")
    if len({m.base_fingerprint for m in manifests}) != 1:
        raise ConfigError("the manifests were made for different base models")
    log_key = load_key(log_key_file)
    if isinstance(log_key, Ed25519Key) and log_key.private is None:
        raise SignatureError(f"{log_key_file} holds only a public key: the service signs its log with the private one")
    if log_key.alg == key.alg and log_key.key_id == key.key_id:
        # whoever holds the publisher's key could then sign log entries, and the log proves nothing
        raise SignatureError(f"{log_key_file} is the publisher's key ({key_file}, key id {key.key_id}): the "
                             "service signs its log with a key of its own (keygen writes one)")
    policy = from_dict(Policy, {"base_fingerprint": manifests[0].base_fingerprint, **caps,
                                "model_fingerprint": model_folder_fingerprint(model_folder_files(base)),
                                "manifests": [m.digest() for m in manifests], "log_key_file": str(log_key_file),
                                "signature": {"algorithm": key.alg, "key_file": str(key_file)}})
    if text_encoder is not None:
        policy.text_encoder_fingerprint = text_fingerprint(text_encoder)
    problems = policy.problems()
    if problems:
        raise ConfigError("not a usable policy:\n  " + "\n  ".join(problems))
    shares = [guard_share(m) for m in manifests]
    if max(shares) < policy.min_guard_share:
        raise ConfigError(f"min_guard_share {policy.min_guard_share:.1%} is met by none of the manifests (they "
                          f"guard {', '.join(f'{s:.1%}' for s in shares)} of the UNet's parameters): every job "
                          "would be refused")
    return policy


# ---------------------------------------------------------------------------------------- rules
def spec_problems(spec: JobSpec, policy: Policy, mask: FreezeMask | None = None) -> list[str]:
    """Caps, methods, optimizer, locked components and freeze overrides (no model needed).

    With ``mask``, each ``unfreeze`` name is also classified (frozen / already trainable /
    not a tensor of the UNet), so the refusal says exactly what was attempted.
    """
    out: list[str] = []
    t = spec.train
    if spec.method not in METHODS:
        why = _LOCKED_METHODS.get(spec.method, f"known methods are {list(METHODS)}")
        out.append(f"method {spec.method!r} is not available: {why}")
    elif spec.method not in policy.methods:
        out.append(f"method {spec.method!r} is not allowed by the policy (allowed: {policy.methods})")
    if spec.method != "lora" and spec.lora is not None:
        out.append(f"'lora' settings were given but method is {spec.method!r}")
    if spec.method == "lora" and not spec.lora_settings.targets:
        out.append("lora.targets is empty")
    out += value_problems(dataclasses.replace(spec, lora=spec.lora_settings) if spec.method == "lora" else spec,
                          policy)
    out += extra_problems(t.extra, policy)

    if spec.train_text_encoder:
        out.append("train_text_encoder: the text encoder is locked; jobs train the UNet only")
    if spec.train_embeddings:
        out.append("train_embeddings: token embeddings are locked (no textual inversion)")
    if spec.train_vae:
        out.append("train_vae: the VAE is locked; jobs train the UNet only")
    if spec.freeze is not None:
        out.append(f"freeze: freeze settings are fixed by the service and the publisher's manifest "
                   f"(got {sorted(spec.freeze)})")
    for name in spec.unfreeze:
        if mask is None:
            out.append(f"unfreeze: {name!r}: the freeze is the publisher's; a job cannot lift it")
        elif name in mask.frozen_set:
            out.append(f"unfreeze: {name!r} is frozen by the publisher's manifest and stays frozen")
        elif name in mask.names:
            out.append(f"unfreeze: {name!r} is already trainable; 'unfreeze' is not a job setting")
        else:
            out.append(f"unfreeze: {name!r} is not a tensor of the base UNet")
    return out


def extra_problems(extra: dict[str, Any], policy: Policy) -> list[str]:
    """Problems of ``train.extra``: unknown or mistyped TrainConfig keys (closest key named),
    service-owned keys, restated first-class keys, optimizers the policy does not allow."""
    out = []
    restated = sorted(set(extra) & FIRST_CLASS_TRAIN_KEYS)
    if restated:
        out.append(f"train.extra restates {restated}; set them as train.<key> instead")
    service = sorted(set(extra) & SERVICE_TRAIN_KEYS)
    if service:
        out.append(f"train.extra sets {service}, which the service controls")
    for k, v in extra.items():
        if k in FIRST_CLASS_TRAIN_KEYS | SERVICE_TRAIN_KEYS:
            continue
        try:  # one key at a time, so every bad key is named (unknown ones with the closest key)
            parsed = from_dict(TrainConfig, {k: v})
        except ConfigError as exc:
            out.append(f"train.extra: {exc}")
            continue
        if k == "optimizer" and parsed.optimizer not in policy.optimizers:
            out.append(f"train.extra.optimizer {parsed.optimizer!r} is not allowed by the policy "
                       f"(allowed: {policy.optimizers})")
        if k == "optimizer_states" and parsed.optimizer_states not in policy.optimizer_states:
            out.append(f"train.extra.optimizer_states {parsed.optimizer_states!r} is not allowed by the policy "
                       f"(allowed: {policy.optimizer_states})")
    return out


def text_fingerprint(encoders: nn.Module | Sequence[nn.Module]) -> str:
    """One fingerprint of a model's text encoders (their parameters, as ``model_fingerprint`` of a
    module): the encoder's own for one (SD 1.x/2.x), else over every encoder's parameters keyed by
    slot ('0.', '1.', ...), so none can be swapped alone."""
    encoders = [encoders] if isinstance(encoders, nn.Module) else list(encoders)
    if len(encoders) == 1:
        return model_fingerprint(encoders[0])
    return model_fingerprint({f"{i}.{n}": t for i, e in enumerate(encoders) for n, t in e.named_parameters()})


def base_problems(policy: Policy, manifest: Manifest | None, unet: nn.Module,
                  text_encoder: nn.Module | Sequence[nn.Module] | None = None) -> tuple[str, list[str]]:
    """Pin the base model and bind the manifest (if it could be read) to it.

    Returns:
        (the UNet's fingerprint, problems).
    """
    out: list[str] = []
    found = model_fingerprint(unet)
    if found != policy.base_fingerprint:
        what = "transformer" if "Transformer" in type(unet).__name__ else "UNet"  # SD3/Flux, or a UNet (or tensors)
        out.append(f"base {what} fingerprint {found[:16]}... is not the pinned "
                   f"{policy.base_fingerprint[:16]}...: the base model was modified or replaced")
    if manifest is not None:
        out += manifest_policy_problems(policy, manifest)
        if manifest.base_fingerprint != policy.base_fingerprint:
            out.append(f"the manifest was made for base {manifest.base_fingerprint[:16]}..., not the "
                       f"pinned {policy.base_fingerprint[:16]}...")
        # The fingerprint was compared above; hashing the whole model again buys nothing.
        out += [f"manifest vs base UNet: {p}" for p in manifest.model_problems(unet, fingerprint=False)]
    if policy.text_encoder_fingerprint is not None:
        if text_encoder is None or (not isinstance(text_encoder, nn.Module) and not list(text_encoder)):
            out.append("the policy pins a text encoder, but the base model has none")
        elif text_fingerprint(text_encoder) != policy.text_encoder_fingerprint:
            n = 1 if isinstance(text_encoder, nn.Module) else len(list(text_encoder))
            out.append("base text encoder fingerprint is not the pinned one" + (f" (over all {n} text encoders)"
                                                                              if n > 1 else "")
                       + ": it was modified or replaced")
    return found, out


def manifest_signature_problems(manifest: Manifest, key: Key) -> list[str]:
    problem = signature_problem(manifest.digest(), manifest.signature, key)
    return [] if problem is None else [f"manifest signature: {problem}"]


def guard_share(manifest: Manifest) -> float:
    """Frozen parameters plus locked degrees of freedom, over all the UNet's parameters."""
    params = manifest.counts["params"]
    locked = manifest.locks["counts"].get("dof", 0) if manifest.locks else 0
    return (params["frozen"] + locked) / params["total"] if params["total"] else 0.0


def manifest_policy_problems(policy: Policy, manifest: Manifest) -> list[str]:
    """The manifest is one the policy lists, and guards at least its minimum share."""
    out = []
    digest = manifest.digest()
    if digest not in policy.manifests:
        out.append(f"manifest {digest[:16]}... is not one the policy accepts (policy manifests): a job runs only "
                   "under a manifest the policy lists")
    share = guard_share(manifest)
    if share < policy.min_guard_share:
        out.append(f"the manifest guards {share:.1%} of the UNet's parameters, under the policy's min_guard_share "
                   f"{policy.min_guard_share:.1%}")
    return out


def folder_problems(policy: Policy, files: dict[str, str]) -> list[str]:
    """The base model folder's files hash to the pinned model_fingerprint."""
    found = model_folder_fingerprint(files)
    if found == policy.model_fingerprint:
        return []
    return [f"base model folder fingerprint {found[:16]}... is not the pinned {policy.model_fingerprint[:16]}...: "
            f"a file of the model folder (weights, config, tokenizer or scheduler) was changed, added or removed"]
