"""Delta checkpoints of guarded jobs: reading them, and merging them into the base model.

A delta holds only what a job trained (full tensors by denoiser tensor name, or LoRA pairs
``<module>.lora_A/B.weight``) and the job's provenance in its metadata (``format``, ``job_id``,
``method``, ``base_fingerprint``, ``manifest_digest``, ``steps``; ``lora_rank``/``lora_alpha`` for
LoRA). Merging refuses a delta without that provenance, one trained under another manifest or from
another base, any tensor or adapter that is malformed (``service.adapters``: names, dtypes, nan/inf,
shapes, ranks, scaling), and anything that touches the freeze: a frozen tensor the delta would
change, a name the base does not have, a direction lock it would move. Finally it proves the merged
result against the manifest. Every refusal is one ``MergeError`` naming every problem.

The metadata is the delta's own and unsigned, so these checks cannot tell a job's delta from one
edited, rescaled, summed or concatenated by whoever holds the file: the publisher merges with
``service.provenance.merge_signed_delta``, which accepts only the exact bytes a signed completed
record of the job log holds and gives ``merge_delta`` that record's scale, never the file's.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import nn

from freezeasguard.engine.errors import FreezeAsGuardError, MergeError
from freezeasguard.engine.guard.hashing import named_tensors
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import SubspaceLock, lock_residuals
from freezeasguard.engine.guard.verify import verify_frozen
from freezeasguard.engine.service import adapters as ad
from freezeasguard.engine.service.adapters import MAX_RANK, show

DELTA_FORMAT = "freezeasguard.delta/1"
METHODS = ("full", "lora")
# What every delta written by ``run_job`` carries; a delta without any of it is not merged.
PROVENANCE = ("format", "job_id", "method", "base_fingerprint", "manifest_digest")
# The most steps a delta's lock tolerance is granted by default (its metadata says how many it took,
# unsigned; a claim above the cap is not believed): the tolerance grows with the steps, so an
# unbounded claim would widen it. Pass the policy's max_steps to tighten it to the service's cap.
MAX_TOLERANCE_STEPS = 1_000
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def load_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a delta checkpoint written by ``run_job``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a missing file, or bytes that are not a safetensors file
        raise MergeError([f"{path}: cannot read the delta checkpoint ({type(exc).__name__}: "
                          f"{show(str(exc), 200)})"]) from None
    if meta.get("format") != DELTA_FORMAT:
        raise MergeError([f"{path}: not a delta checkpoint (format {show(meta.get('format'))})"])
    return tensors, meta


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight change ``scaling * B A`` of a LoRA pair, shaped like the weight (fp32)."""
    # Linear: W [out, in] += s * B [out, r] @ A [r, in]. Conv: A is a [r, in, k, k] conv and B a
    # 1x1 [out, r] conv, so the composite kernel is sum_r B[o, r] * A[r, i, :, :].
    return torch.einsum("or,ri...->oi...", b.float().flatten(1), a.float()) * scaling


def _whole(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _metadata(metadata: Any, manifest: Manifest) -> tuple[dict[str, str], list[str]]:
    """The delta's metadata (string keys and values only) and every provenance problem."""
    if metadata is None:
        return {}, [f"the delta has no metadata: without its provenance ({', '.join(PROVENANCE)}) it is not merged"]
    if not isinstance(metadata, Mapping):
        return {}, [f"the delta's metadata is a {type(metadata).__name__}, not a mapping of strings"]
    meta: dict[str, str] = {}
    problems = []
    for k, v in metadata.items():
        if isinstance(k, str) and isinstance(v, str):
            meta[k] = v
        else:
            problems.append(f"metadata {show(k)}: {type(k).__name__} -> {type(v).__name__} (metadata is strings only)")
    missing = [k for k in PROVENANCE if k not in metadata]
    if missing:
        problems.append(f"the delta has no provenance: metadata {missing} missing (only a guarded job's "
                        "delta is merged)")
    if "format" in meta and meta["format"] != DELTA_FORMAT:
        problems.append(f"metadata format {show(meta['format'])} is not {DELTA_FORMAT!r}")
    job = meta.get("job_id")
    if job is not None and not (0 < len(job) <= 256 and job.isprintable() and job.strip() == job):
        problems.append(f"metadata job_id {show(job)} is not a job id (1-256 printable characters)")
    if "method" in meta and meta["method"] not in METHODS:
        problems.append(f"unknown delta method {show(meta['method'])} (a delta is 'full' or 'lora')")
    for key, want, what in (("manifest_digest", manifest.digest(), "under a different manifest"),
                            ("base_fingerprint", manifest.base_fingerprint, "from a different base model")):
        if key not in meta:
            continue
        if not _HEX64.fullmatch(meta[key]):
            problems.append(f"metadata {key} {show(meta[key])} is not a 64-digit lowercase hex digest")
        elif meta[key] != want:
            problems.append(f"the delta was trained {what}")
    return meta, problems


def _merge_full(delta: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], frozen: set[str],
                merged: dict[str, torch.Tensor], problems: list[str]) -> None:
    for n, t in delta.items():
        b = state.get(n)
        if b is None:
            hint = " (a LoRA adapter tensor in a full delta)" if ad.adapter_module(n) else ""
            problems.append(f"{show(n)} is not a tensor of the base model{hint}")
            continue
        bad = ad.tensor_problems(n, t, b)
        if bad:
            problems += bad
        elif t.shape != b.shape or t.dtype != b.dtype:
            problems.append(f"{n!r}: {t.dtype} {list(t.shape)} in the delta, {b.dtype} {list(b.shape)} in the base")
        elif n in frozen:  # an exact copy is not a change (bytes, so -0.0 for 0.0 is one); the base's stays
            if not torch.equal(t.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)):
                problems.append(f"{n!r} is frozen by the manifest; the delta would change it")
        else:
            merged[n] = t


def _lora_pairs(delta: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], frozen: set[str],
                problems: list[str], rank: int | None, max_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The delta's checked LoRA pairs by module; every problem is added to ``problems``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in delta.items():
        hit = ad.adapter_module(n)
        if hit is None:
            what = "a full tensor in a LoRA delta" if n in state else "<module>.lora_A/B.weight"
            problems.append(f"{show(n)} is not a LoRA adapter tensor ({what})")
        else:
            modules.setdefault(hit[0], {})[hit[1]] = t
    pairs = {}
    for m, ab in modules.items():
        w = f"{m}.weight"
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"module {show(m)}: adapter has {sorted(ab)} (needs lora_A and lora_B)")
        elif w not in state:
            problems.append(f"module {show(m)} is not a module of the base model")
        elif frozen & {w, f"{m}.bias"}:
            problems.append(f"module {m!r} has frozen tensor(s) {sorted(frozen & {w, f'{m}.bias'})}; "
                            "the adapter would change them")
        else:
            bad = [p for part in ("lora_A", "lora_B")
                   for p in ad.tensor_problems(f"{m}.{part}.weight", ab[part], state[w])]
            bad = bad or ad.pair_problems(m, ab["lora_A"], ab["lora_B"], state[w], rank, max_rank)
            if bad:
                problems += bad
            else:
                pairs[m] = (ab["lora_A"], ab["lora_B"])
    return pairs


def merge_delta(base: nn.Module | Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                manifest: Manifest, metadata: Mapping[str, str] | None = None, *,
                lock: SubspaceLock | None = None, max_steps: int = MAX_TOLERANCE_STEPS,
                max_rank: int = MAX_RANK) -> dict[str, torch.Tensor]:
    """Apply a delta to the base denoiser's tensors (a UNet or a diffusion transformer), refusing
    anything that touches the freeze.

    Args:
        base: the base denoiser (or its state dict); must be the manifest's base model.
        delta: full tensors by name, or LoRA pairs ``<module>.lora_A/B.weight``.
        manifest: the freeze manifest the delta must respect.
        metadata: the delta's metadata as ``load_delta`` returns it (strings): its provenance
            (``format``, ``job_id``, ``method``, ``base_fingerprint``, ``manifest_digest``; all
            required), ``steps`` (required with locks) and ``lora_rank``/``lora_alpha`` for LoRA.
        lock: the manifest's direction locks (``manifest.load_lock``); required when it has any.
        max_steps: the most steps the lock tolerance is granted, whatever the metadata claims.
        max_rank: the largest adapter rank accepted (pass the policy's ``max_lora_rank``).
    Returns:
        The merged state (new tensors where the delta applies, the base's elsewhere).
    Raises:
        MergeError listing every problem: missing or mismatched provenance, every malformed tensor
        or adapter, every tensor the delta would change that is frozen, every name not in the base,
        and every shape/dtype mismatch. Nothing is computed from a delta that has any.
    """
    if not (_whole(max_steps, 0) and _whole(max_rank, 1)):
        raise MergeError([f"max_steps must be a whole number >= 0 and max_rank one >= 1, got {max_steps!r} "
                          f"and {max_rank!r}"])
    try:
        state = named_tensors(base)
        problems = [f"base: {p}" for p in manifest.model_problems(state)]
    except (FreezeAsGuardError, TypeError, ValueError, AttributeError) as exc:
        raise MergeError([f"base: not a model or state dict of tensors ({show(str(exc), 200)})"]) from None
    if manifest.locks is not None and (lock is None or lock.entries() != manifest.locks["tensors"]):
        raise MergeError(["the manifest has direction locks: pass its lock (manifest.load_lock) to check them"])
    meta, bad_meta = _metadata(metadata, manifest)
    problems += bad_meta
    if not isinstance(delta, Mapping):
        raise MergeError(problems + [f"the delta is a {type(delta).__name__}, not a mapping of name -> tensor"])
    if not delta:
        problems.append("the delta holds no tensors")
    named = [p for p in (ad.name_problem(n, state) for n in delta) if p]
    problems += named
    delta = {n: t for n, t in delta.items() if isinstance(n, str)}
    steps = ad.parse_steps(meta)
    if lock is not None and steps is None:
        problems.append(f"the delta's metadata has no valid 'steps' ({show(meta.get('steps'))}): its direction "
                        "locks cannot be checked against a tolerance")
    elif "steps" in meta and steps is None:
        problems.append(f"metadata steps {show(meta['steps'])} is not a whole number of steps (plain digits)")
    frozen = set(manifest.frozen_names)
    merged = dict(state)
    method = meta.get("method")
    if named or method not in METHODS:
        pass  # odd names or no method: nothing more can be read from the tensors
    elif method == "full":
        _merge_full(delta, state, frozen, merged, problems)
    else:
        rank, bad = ad.parse_rank(meta, max_rank)
        alpha, bad_alpha = ad.parse_alpha(meta)
        problems += bad + bad_alpha
        pairs = _lora_pairs(delta, state, frozen, problems, rank, max_rank)
        scaling = alpha / rank if rank is not None and alpha is not None else math.nan
        if rank is not None and alpha is not None and not (math.isfinite(scaling) and scaling > 0):
            problems.append(f"LoRA scaling lora_alpha / lora_rank = {scaling!r} is not a positive finite number")
        if not problems:
            for m, (a, b) in pairs.items():
                W = state[f"{m}.weight"]
                new = (W.float() + lora_delta(a, b, scaling)).to(W.dtype)
                if not bool(torch.isfinite(new).all()):
                    problems.append(f"module {m!r}: the merged weight is not finite (the adapter times {scaling!r} "
                                    f"overflows {str(W.dtype).removeprefix('torch.')})")
                merged[f"{m}.weight"] = new
    if lock is not None and not problems:
        with torch.no_grad():  # the base may be a live module's parameters
            deltas = {n: merged[n].float() - state[n].float() for n in lock.locks if merged[n] is not state[n]}
            norms = {n: float(state[n].double().norm()) for n in deltas}
        problems += [f"{r.describe()}: the delta moves the base along directions the manifest locks"
                     for r in lock_residuals(lock, deltas, norms, min(steps, max_steps)) if not r.ok]
    if problems:
        raise MergeError(problems)
    report = verify_frozen(manifest, merged)  # the proof on the merged result, not just the rules
    if not report.ok:
        raise MergeError([report.details[n] for n in report.failures])
    return merged
