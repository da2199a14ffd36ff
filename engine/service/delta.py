"""Delta checkpoints of guarded jobs: reading them, and merging them into the base model.

A delta holds only what a job trained (full tensors by UNet name, or LoRA pairs
``<module>.lora_A/B.weight``). Merging refuses anything that touches the freeze: a frozen tensor
the delta would change, a name the base does not have, a delta trained under another manifest or
from another base, and finally proves the merged result against the manifest.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn

from freezeasguard.engine.errors import MergeError
from freezeasguard.engine.guard.hashing import named_tensors
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import SubspaceLock, lock_residuals
from freezeasguard.engine.guard.verify import verify_frozen

DELTA_FORMAT = "freezeasguard.delta/1"
# The most steps a delta's lock tolerance is granted by default (its metadata says how many it took,
# unsigned; a claim above the cap is not believed): the tolerance grows with the steps, so an
# unbounded claim would widen it. Pass the policy's max_steps to tighten it to the service's cap.
MAX_TOLERANCE_STEPS = 1_000


def load_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a delta checkpoint written by ``run_job``."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != DELTA_FORMAT:
        raise MergeError([f"{path}: not a delta checkpoint (format {meta.get('format')!r})"])
    return tensors, meta


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight change ``scaling * B A`` of a LoRA pair, shaped like the weight (fp32)."""
    # Linear: W [out, in] += s * B [out, r] @ A [r, in]. Conv: A is a [r, in, k, k] conv and B a
    # 1x1 [out, r] conv, so the composite kernel is sum_r B[o, r] * A[r, i, :, :].
    return torch.einsum("or,ri...->oi...", b.float().flatten(1), a.float()) * scaling


def merge_delta(base: nn.Module | Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                manifest: Manifest, metadata: Mapping[str, str] | None = None, *,
                lock: SubspaceLock | None = None, max_steps: int = MAX_TOLERANCE_STEPS) -> dict[str, torch.Tensor]:
    """Apply a delta to the base UNet's tensors, refusing anything that touches the freeze.

    Args:
        base: the base UNet (or its state dict); must be the manifest's base model.
        delta: full tensors by UNet name, or LoRA pairs ``<module>.lora_A/B.weight``.
        manifest: the freeze manifest the delta must respect.
        metadata: the delta's metadata (``method``, ``steps``, and ``lora_rank``/``lora_alpha`` for LoRA).
        lock: the manifest's direction locks (``manifest.load_lock``); required when it has any.
        max_steps: the most steps the lock tolerance is granted, whatever the metadata claims.
    Returns:
        The merged state (new tensors where the delta applies, the base's elsewhere).
    Raises:
        MergeError listing every tensor the delta would change that is frozen, every name not
        in the base, and every shape/dtype mismatch.
    """
    state = named_tensors(base)
    problems = [f"base: {p}" for p in manifest.model_problems(state)]
    meta = metadata or {}
    if manifest.locks is not None and (lock is None or lock.entries() != manifest.locks["tensors"]):
        raise MergeError(["the manifest has direction locks: pass its lock (manifest.load_lock) to check them"])
    if meta.get("manifest_digest", manifest.digest()) != manifest.digest():
        problems.append("the delta was trained under a different manifest")
    if meta.get("base_fingerprint", manifest.base_fingerprint) != manifest.base_fingerprint:
        problems.append("the delta was trained from a different base model")
    frozen = set(manifest.frozen_names)
    merged = dict(state)
    method = meta.get("method", "full")
    if method == "full":
        for n, t in delta.items():
            b = state.get(n)
            if b is None:
                problems.append(f"{n!r} is not a tensor of the base model")
            elif t.shape != b.shape or t.dtype != b.dtype:
                problems.append(f"{n!r}: {t.dtype} {list(t.shape)} in the delta, {b.dtype} {list(b.shape)} in the base")
            elif n in frozen and not torch.equal(t, b):
                problems.append(f"{n!r} is frozen by the manifest; the delta would change it")
            else:
                merged[n] = t
    elif method == "lora":
        try:
            scaling = float(meta["lora_alpha"]) / int(meta["lora_rank"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(["LoRA delta without valid lora_rank / lora_alpha metadata"]) from None
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for n, t in delta.items():
            for part in ("lora_A", "lora_B"):
                if n.endswith(f".{part}.weight"):
                    modules.setdefault(n[:-len(f".{part}.weight")], {})[part] = t
                    break
            else:
                problems.append(f"{n!r} is not a LoRA adapter tensor (<module>.lora_A/B.weight)")
        for m, ab in modules.items():
            w = f"{m}.weight"
            if set(ab) != {"lora_A", "lora_B"}:
                problems.append(f"module {m!r}: adapter has {sorted(ab)} (needs lora_A and lora_B)")
            elif w not in state:
                problems.append(f"module {m!r} is not a module of the base model")
            elif frozen & {w, f"{m}.bias"}:
                problems.append(f"module {m!r} has frozen tensor(s) {sorted(frozen & {w, f'{m}.bias'})}; "
                                "the adapter would change them")
            else:
                a, b, W = ab["lora_A"], ab["lora_B"], state[w]
                if (b.shape[0], a.shape[1], tuple(a.shape[2:])) != (W.shape[0], W.shape[1], tuple(W.shape[2:])) \
                        or a.shape[0] != b.shape[1]:
                    problems.append(f"module {m!r}: adapter shapes A {list(a.shape)}, B {list(b.shape)} "
                                    f"do not fit the weight {list(W.shape)}")
                else:
                    merged[w] = (W.float() + lora_delta(a, b, scaling)).to(W.dtype)
    else:
        problems.append(f"unknown delta method {method!r}")
    steps = None
    if lock is not None:
        try:
            steps = min(int(meta["steps"]), max_steps)
        except (KeyError, ValueError):
            problems.append(f"the delta's metadata has no valid 'steps' ({meta.get('steps')!r}): its direction "
                            "locks cannot be checked against a tolerance")
    if lock is not None and not problems:
        deltas = {n: merged[n].float() - state[n].float() for n in lock.locks if merged[n] is not state[n]}
        norms = {n: float(state[n].double().norm()) for n in deltas}
        problems += [f"{r.describe()}: the delta moves the base along directions the manifest locks"
                     for r in lock_residuals(lock, deltas, norms, max(steps or 0, 0)) if not r.ok]
    if problems:
        raise MergeError(problems)
    report = verify_frozen(manifest, merged)  # the proof on the merged result, not just the rules
    if not report.ok:
        raise MergeError([report.details[n] for n in report.failures])
    return merged
