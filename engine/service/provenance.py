"""Merging a delta only as its job made it: the signed job log is the delta's provenance.

A delta's own metadata (``lora_alpha``, ``steps``, ...) is unsigned: whoever holds the file can edit
it, rescale the tensors (``W0 + k (W1 - W0)``), sum two jobs' deltas or concatenate two adapters
into one of a higher rank, and each of those is a well-formed delta. What the user cannot make is a
file whose SHA-256 a *completed* record of the service's signed log holds. So
``merge_signed_delta``:

1. reads the delta file's bytes once (the bytes hashed are the bytes loaded) and finds the signed,
   completed record whose output has that SHA-256, in a log verified from its first line with the
   service's key (``service.logverify``): an edited, rescaled, summed or concatenated delta matches
   no record and is refused. One file is one job's output, so jobs are never stacked in one merge;
2. refuses a record made under another manifest, for another base, or a base whose fingerprint is
   not the record's (a model another delta was already merged into: stacking jobs onto each other
   would add their updates past every per-job cap);
3. merges with the method, LoRA rank and alpha and step count taken from the signed record, never
   from the delta's metadata (``delta.merge_delta`` then checks every tensor and the freeze).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from freezeasguard.engine.errors import FreezeAsGuardError, JobLogError, MergeError
from freezeasguard.engine.guard.hashing import model_fingerprint, named_tensors
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import SubspaceLock
from freezeasguard.engine.service.adapters import MAX_RANK, show
from freezeasguard.engine.service.audit import JobStates
from freezeasguard.engine.service.delta import DELTA_FORMAT, MAX_TOLERANCE_STEPS, METHODS, merge_delta
from freezeasguard.engine.service.logcheckpoint import verified_entries
from freezeasguard.engine.service.signing import Ed25519Key, HmacKey


@dataclass
class SignedDelta:
    """A delta file's tensors and metadata, with the signed completed record it is the output of."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    record: Mapping[str, Any]
    sha256: str


def _parse(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as exc:  # bytes that are not a safetensors file
        raise MergeError([f"{path}: cannot read the delta checkpoint ({type(exc).__name__}: "
                          f"{show(str(exc), 200)})"]) from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MergeError([f"{path}: the delta's metadata is not a mapping of strings"])
    return tensors, meta


def read_signed_delta(path: str | os.PathLike, log: str | os.PathLike,
                      key: HmacKey | Ed25519Key) -> SignedDelta:
    """The delta at ``path`` and the signed completed record of the job that wrote it.

    Raises:
        MergeError if the log fails verification with ``key`` (naming its first bad line), or no job
        the log records as completed (its final record) has exactly these bytes as its output.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MergeError([f"{path}: cannot read the delta checkpoint ({exc})"]) from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        entries = verified_entries(log, key)
    except (JobLogError, OSError) as exc:
        raise MergeError([f"job log: {exc}; no delta is merged on an unverified log"]) from None
    jobs = JobStates()
    for entry in entries:
        jobs.see(entry["seq"], entry["record"])
    found = [rec for _, rec in jobs.completed()
             if isinstance(rec.get("output"), Mapping) and rec["output"].get("sha256") == digest]
    if not found:
        raise MergeError([f"{path} (sha256 {digest[:16]}...) is not the output of any job the signed log "
                          "records as completed: only a job's delta exactly as it wrote it is merged (an edited, "
                          "rescaled, summed or concatenated delta matches no record)"])
    tensors, meta = _parse(path, data)
    return SignedDelta(tensors, meta, found[-1], digest)


def _get(record: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        record = record.get(k) if isinstance(record, Mapping) else None
    return record


def record_metadata(record: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The delta metadata ``merge_delta`` is given, built from the signed record alone."""
    method, steps = _get(record, "method", "name"), _get(record, "train", "steps")
    meta = {"format": DELTA_FORMAT, "job_id": record.get("job_id"), "method": method,
            "base_fingerprint": _get(record, "base", "fingerprint"),
            "manifest_digest": _get(record, "manifest", "digest"), "steps": steps}
    problems = []
    if method not in METHODS:
        problems.append(f"the signed record's method {show(method)} is not one of {list(METHODS)}")
    if method == "lora":
        rank, alpha = _get(record, "method", "rank"), _get(record, "method", "alpha")
        if not (isinstance(rank, int) and not isinstance(rank, bool)) or not isinstance(alpha, (int, float)) \
                or isinstance(alpha, bool):
            problems.append(f"the signed record's LoRA rank {show(rank)} / alpha {show(alpha)} are not numbers")
        else:
            meta.update(lora_rank=str(rank), lora_alpha=repr(float(alpha)))
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        problems.append(f"the signed record's train.steps {show(steps)} is not a whole number")
    meta = {k: str(v) for k, v in meta.items() if v is not None}
    return meta, problems


def merge_signed_delta(base: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                       manifest: Manifest, *, log: str | os.PathLike, key: HmacKey | Ed25519Key,
                       lock: SubspaceLock | None = None, max_steps: int = MAX_TOLERANCE_STEPS,
                       max_rank: int = MAX_RANK) -> dict[str, torch.Tensor]:
    """Merge the delta file at ``path`` into the pinned base, exactly as its job made it (module
    docstring).

    Args:
        base: the pinned base denoiser (or its state dict): the one the job trained from.
        path: the delta file (``delta.safetensors`` of a published job).
        manifest: the freeze manifest the job ran under.
        log: the service's job log; key: its verification key (the policy's ``log_key_file``).
        lock, max_steps, max_rank: as ``delta.merge_delta``.
    Raises:
        MergeError naming every problem (see ``read_signed_delta`` and ``delta.merge_delta``).
    """
    signed = read_signed_delta(path, log, key)
    rec = signed.record
    meta, problems = record_metadata(rec)
    if meta.get("manifest_digest") != manifest.digest():
        problems.append("the job ran under a different manifest than the one given")
    if meta.get("base_fingerprint") != manifest.base_fingerprint:
        problems.append("the job's base fingerprint is not the manifest's base")
    try:
        found = model_fingerprint(named_tensors(base))
    except (FreezeAsGuardError, TypeError, ValueError, AttributeError) as exc:
        raise MergeError([f"base: not a model or state dict of tensors ({show(str(exc), 200)})"]) from None
    if found != meta.get("base_fingerprint"):
        problems.append(f"base fingerprint {found[:16]}... is not the pinned base {str(meta.get('base_fingerprint'))[:16]}"
                        "... the job trained from: a delta merges onto that base only (never onto a model "
                        "another delta was merged into)")
    differ = sorted(k for k, v in meta.items() if signed.metadata.get(k) != v)
    if differ:  # cannot happen for bytes the job wrote; said rather than assumed
        problems.append(f"the delta's metadata {differ} disagrees with its signed record")
    if problems:
        raise MergeError(problems)
    return merge_delta(base, signed.tensors, manifest, meta, lock=lock, max_steps=max_steps, max_rank=max_rank)
