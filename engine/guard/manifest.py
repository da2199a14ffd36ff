"""Freeze manifests: a name-keyed, hashed, versioned record of a mask and the base model it fits.

A manifest lists *every* parameter tensor of the base model by name with its shape, dtype and
size, marks the frozen ones and stores the SHA-256 of each frozen tensor's bytes, plus a
fingerprint of the whole base model. With it a fine-tuning service can

* refuse a base model that is not the one the mask was learned for (``check_model``: names,
  shapes, dtypes and fingerprint, every problem reported at once), and
* prove afterwards that every frozen tensor of the fine-tuned model is bit-identical to the base
  (``verify_frozen``).

A manifest may also carry direction locks (``locks``, schema 2): per locked tensor its sides,
ranks, locked degrees of freedom and the SHA-256 of each basis; the bases themselves live in a
safetensors file beside the manifest (``guard.subspace``), read and hash-checked by ``load_lock``.

``signature`` is left out of ``digest()`` so that a policy layer can sign the digest and store the
signature in the same file (so it covers the locks too).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from freezeasguard.engine.version import __version__
from freezeasguard.engine.errors import ManifestError, MaskError
from freezeasguard.engine.guard.hashing import NamedTensors, dtype_name, model_fingerprint, named_tensors, tensor_sha256
from freezeasguard.engine.guard.mask import FreezeMask, ModelLike, read_json
from freezeasguard.engine.guard.subspace import SIDES, SubspaceLock
from freezeasguard.engine.io import atomic_write_json

SCHEMA = "freezeasguard.manifest/2"
READS = ("freezeasguard.manifest/1", SCHEMA)  # 1: tensor masks only; 2 adds direction locks
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCKS_FILE = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")
_TOP_KEYS = ("schema", "base_fingerprint", "counts", "provenance", "signature", "tensors", "locks")
_REQUIRED_KEYS = ("schema", "base_fingerprint", "counts", "provenance", "tensors")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    # The in-memory manifest must equal the one read back from disk (and hash the same), so
    # normalise now exactly as the writer will: tuples -> lists, unknown objects -> str.
    try:
        return json.loads(json.dumps(obj, default=str, allow_nan=False))
    except ValueError as exc:  # NaN/inf have no canonical JSON form
        raise ManifestError(f"provenance is not JSON-serialisable: {exc}") from None


def _counts(tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    frozen = [e for e in tensors.values() if e["frozen"]]
    n_frozen, n_total = len(frozen), len(tensors)
    p_frozen = sum(e["numel"] for e in frozen)
    p_total = sum(e["numel"] for e in tensors.values())
    return {
        "tensors": {"frozen": n_frozen, "total": n_total, "ratio": n_frozen / n_total if n_total else 0.0},
        "params": {"frozen": p_frozen, "total": p_total, "ratio": p_frozen / p_total if p_total else 0.0},
    }


def _entry_problems(name: str, e: Any) -> list[str]:
    if not isinstance(e, dict):
        return [f"tensor {name!r}: entry must be an object"]
    out = []
    missing = [k for k in ("shape", "dtype", "numel", "frozen") if k not in e]
    if missing:
        out.append(f"tensor {name!r}: missing {missing}")
    extra = sorted(set(e) - {"shape", "dtype", "numel", "frozen", "sha256"})
    if extra:
        out.append(f"tensor {name!r}: unknown keys {extra}")
    if missing:
        return out
    shape, numel = e["shape"], e["numel"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        out.append(f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
    elif not isinstance(numel, int) or numel != math.prod(shape):
        out.append(f"tensor {name!r}: numel {numel!r} does not match shape {shape}")
    if not isinstance(e["dtype"], str) or not isinstance(getattr(torch, e["dtype"], None), torch.dtype):
        out.append(f"tensor {name!r}: unknown dtype {e['dtype']!r}")
    if not isinstance(e["frozen"], bool):
        out.append(f"tensor {name!r}: frozen must be true or false")
    elif e["frozen"] and not (isinstance(e.get("sha256"), str) and _HEX64.match(e["sha256"])):
        out.append(f"tensor {name!r}: frozen tensor needs a 64-digit lowercase hex sha256")
    elif not e["frozen"] and "sha256" in e:
        out.append(f"tensor {name!r}: only frozen tensors carry a sha256")
    return out


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def lock_section_problems(locks: Any, tensors: Mapping[str, Any]) -> list[str]:
    """Every way a manifest's ``locks`` section is malformed or does not fit its ``tensors``."""
    if not isinstance(locks, dict) or set(locks) != {"file", "tensors", "counts"}:
        return ["locks must be an object with exactly 'file', 'tensors' and 'counts'"]
    out = []
    if not (isinstance(locks["file"], str) and _LOCKS_FILE.match(locks["file"])):
        out.append(f"locks file must be a bare '*.safetensors' name beside the manifest, got {locks['file']!r}")
    entries = locks["tensors"]
    if not isinstance(entries, dict) or not entries:
        return out + ["locks.tensors must be a non-empty object of name -> lock"]
    dof = 0
    for n, e in entries.items():
        t = tensors.get(n) if isinstance(tensors, dict) else None
        if not isinstance(e, dict) or not {"shape", "dof"} <= set(e) or set(e) - {"shape", "dof", *SIDES} \
                or not any(s in e for s in SIDES):
            out.append(f"lock {n!r}: entry must have shape, dof and an 'out' and/or 'in' basis")
            continue
        if t is None:
            out.append(f"lock {n!r}: not a tensor of the manifest")
        elif e["shape"] != t.get("shape"):
            out.append(f"lock {n!r}: shape {e['shape']}, the manifest's tensor has {t.get('shape')}")
        elif t.get("frozen"):
            out.append(f"lock {n!r}: the tensor is frozen; a lock applies to trainable tensors")
        elif len(e["shape"]) < 2:
            out.append(f"lock {n!r}: only tensors with 2+ dimensions can be locked")
        for s in SIDES:
            b = e.get(s)
            if s in e and not (isinstance(b, dict) and set(b) == {"rank", "sha256"} and _int(b["rank"])
                               and b["rank"] > 0 and isinstance(b["sha256"], str) and _HEX64.match(b["sha256"])):
                out.append(f"lock {n!r}: {s} must be {{rank: int > 0, sha256: 64 hex digits}}")
        if not _int(e["dof"]) or e["dof"] <= 0:
            out.append(f"lock {n!r}: dof must be a positive int")
        else:
            dof += e["dof"]
    c = locks["counts"]
    if not out and (not isinstance(c, dict) or c.get("tensors") != len(entries) or c.get("dof") != dof):
        out.append(f"locks.counts {c} disagree with the locks ({len(entries)} tensors, {dof} dof): the file was edited")
    return out


@dataclass(kw_only=True)
class Manifest:
    """A freeze mask bound to the exact base model it was made for.

    Fields mirror the JSON file. ``tensors`` keeps the model's parameter order; each entry is
    ``{"shape", "dtype", "numel", "frozen"}`` plus ``"sha256"`` for frozen tensors.
    """

    schema: str = SCHEMA
    base_fingerprint: str
    tensors: dict[str, dict[str, Any]]
    counts: dict[str, Any]
    provenance: dict[str, Any]
    signature: dict[str, Any] | None = None
    locks: dict[str, Any] | None = None  # {"file", "tensors": name -> entry, "counts"}

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model: NamedTensors, mask: FreezeMask,
              provenance: Mapping[str, Any] | None = None, *, lock: SubspaceLock | None = None,
              lock_file: str | None = None) -> "Manifest":
        """Hash ``model`` (its parameters) and record ``mask`` over it (and ``lock``, whose bases
        ``save(path, lock=...)`` writes to ``lock_file`` beside the manifest).

        Args:
            model: the base model, or its state dict.
            mask: a mask over exactly the model's tensors.
            provenance: how the mask was made: ``method`` (e.g. 'random', 'patterns',
                'learned'), ``config`` (dict), ``seed``, plus any extra keys. ``version`` and
                ``created`` are filled in unless given.
        """
        tensors = named_tensors(model)
        problems = []
        mask_sizes = dict(zip(mask.names, mask.numels))
        for n in sorted(set(tensors) - set(mask_sizes)):
            problems.append(f"model tensor {n!r} is not in the mask")
        for n in sorted(set(mask_sizes) - set(tensors)):
            problems.append(f"mask tensor {n!r} is not in the model")
        for n in sorted(set(tensors) & set(mask_sizes)):
            if tensors[n].numel() != mask_sizes[n]:
                problems.append(f"tensor {n!r}: {tensors[n].numel()} elements in the model, "
                                f"{mask_sizes[n]} in the mask")
        if problems:
            raise ManifestError("the mask was not made for this model:", problems)

        digests = {n: tensor_sha256(t) for n, t in tensors.items()}
        entries: dict[str, dict[str, Any]] = {}
        for n, t in tensors.items():
            e: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                                 "numel": t.numel(), "frozen": n in mask.frozen_set}
            if e["frozen"]:
                e["sha256"] = digests[n]
            entries[n] = e

        prov = dict(provenance or {})
        prov.setdefault("method", "unspecified")
        prov.setdefault("config", {})
        prov.setdefault("seed", None)
        prov.setdefault("version", __version__)
        prov.setdefault("created", _now_iso())
        if not isinstance(prov["method"], str):
            raise ManifestError(f"provenance method must be a string, got {prov['method']!r}")
        out = cls(base_fingerprint=model_fingerprint(tensors, digests=digests), tensors=entries,
                  counts=_counts(entries), provenance=_jsonable(prov))
        if lock is not None and len(lock):
            bad = lock.problems(tensors)
            if bad:
                raise ManifestError("the lock does not fit this model:", bad)
            ents = lock.entries()
            out.locks = {"file": lock_file or "manifest.locks.safetensors", "tensors": ents,
                         "counts": {"tensors": len(ents), "dof": lock.dof, **{
                             k: v for k, v in lock.counts(tensors).items() if k not in ("tensors", "dof")}}}
            problems = lock_section_problems(out.locks, entries)
            if problems:
                raise ManifestError("the lock cannot be recorded:", problems)
        return out

    # ----------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        d = {"schema": self.schema, "base_fingerprint": self.base_fingerprint,
             "counts": self.counts, "provenance": self.provenance,
             "signature": self.signature, "tensors": self.tensors}
        if self.locks is not None:
            d["locks"] = self.locks
        return d

    def save(self, path: str | os.PathLike, *, lock: SubspaceLock | None = None) -> Path:
        """Write the manifest as JSON, atomically; with ``lock``, its bases first, beside it
        (checked against the manifest's lock entries)."""
        if lock is not None:
            if self.locks is None or lock.entries() != self.locks["tensors"]:
                raise ManifestError("the lock given is not the one this manifest records")
            target = Path(path).parent / self.locks["file"]
            if target.exists():
                try:  # the same bases may be rewritten; another manifest's must not be replaced
                    SubspaceLock.load(target, self.locks["tensors"])
                except ManifestError:
                    raise ManifestError(f"{str(target)!r} holds other bases (another manifest's locks); "
                                        "save this manifest in another folder or build it with another "
                                        "lock_file") from None
            else:
                lock.save(target)
        elif self.locks is not None and not (Path(path).parent / self.locks["file"]).is_file():
            raise ManifestError(f"the manifest records locks but {self.locks['file']!r} is not beside "
                                f"{str(path)!r}: pass lock= to write it")
        return atomic_write_json(path, self.to_dict())

    def load_lock(self, manifest_path: str | os.PathLike) -> SubspaceLock | None:
        """The direction locks of this manifest (None without any), read from the file beside
        ``manifest_path`` and checked basis by basis against the recorded SHA-256."""
        if self.locks is None:
            return None
        return SubspaceLock.load(Path(manifest_path).parent / self.locks["file"], self.locks["tensors"])

    @property
    def locked_names(self) -> tuple[str, ...]:
        return tuple(self.locks["tensors"]) if self.locks else ()

    @classmethod
    def from_dict(cls, obj: Any, *, source: str = "manifest") -> "Manifest":
        """Validate a parsed manifest; every problem is reported in one ``ManifestError``."""
        if not isinstance(obj, dict):
            raise ManifestError(f"{source}: a manifest is a JSON object, got {type(obj).__name__}")
        if "schema" in obj and obj["schema"] not in READS:
            raise ManifestError(f"{source}: unsupported manifest schema {obj['schema']!r} "
                                f"(this version reads {list(READS)})")
        problems = [f"missing key {k!r}" for k in _REQUIRED_KEYS if k not in obj]
        problems += [f"unknown key {k!r}" for k in obj if k not in _TOP_KEYS]
        if problems:
            raise ManifestError(f"{source}: not a valid manifest:", problems)

        if not (isinstance(obj["base_fingerprint"], str) and _HEX64.match(obj["base_fingerprint"])):
            problems.append("base_fingerprint must be a 64-digit lowercase hex string")
        prov = obj["provenance"]
        if not isinstance(prov, dict) or not isinstance(prov.get("method"), str):
            problems.append("provenance must be an object with a string 'method'")
        if obj.get("signature") is not None and not isinstance(obj["signature"], dict):
            problems.append("signature must be an object or null")
        tensors = obj["tensors"]
        if not isinstance(tensors, dict) or not tensors:
            problems.append("tensors must be a non-empty object of name -> entry")
        else:
            for name, e in tensors.items():
                problems += _entry_problems(name, e)
        if not problems and obj["counts"] != _counts(tensors):
            problems.append(f"counts {obj['counts']} disagree with the tensors "
                            f"({_counts(tensors)}): the file was edited")
        if "locks" in obj:
            if obj["schema"] != SCHEMA:
                problems.append(f"locks need schema {SCHEMA!r}")
            elif not problems:
                problems += lock_section_problems(obj["locks"], tensors)
        if problems:
            raise ManifestError(f"{source}: not a valid manifest:", problems)
        return cls(schema=obj["schema"], base_fingerprint=obj["base_fingerprint"], tensors=tensors,
                   counts=obj["counts"], provenance=prov, signature=obj.get("signature"), locks=obj.get("locks"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"manifest {str(path)!r} does not exist") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(obj, source=f"manifest {str(path)!r}")

    def digest(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, compact) of everything but ``signature``."""
        body = {k: v for k, v in self.to_dict().items() if k != "signature"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    # ----------------------------------------------------------------------------- use
    @property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(n for n, e in self.tensors.items() if e["frozen"])

    def mask(self, model: NamedTensors | None = None) -> FreezeMask:
        """The manifest's mask; with ``model``, first checked against its names and shapes.

        dtypes and the fingerprint are not checked here (a meta-device or bf16 copy of the model
        is fine for reading a mask); call ``check_model`` to pin the base model.
        """
        if model is None:
            return FreezeMask(tuple(self.tensors), tuple(e["numel"] for e in self.tensors.values()),
                              frozenset(self.frozen_names))
        tensors = model if isinstance(model, nn.Module) else named_tensors(model)  # read pairs once
        self.check_model(tensors, dtypes=False, fingerprint=False)
        try:
            return FreezeMask.from_names(tensors, self.frozen_names)
        except MaskError as exc:  # unreachable after check_model; kept for a precise message
            raise ManifestError(str(exc)) from None

    def model_problems(self, model: NamedTensors, *, dtypes: bool = True,
                       fingerprint: bool = True) -> list[str]:
        """Every way ``model`` differs from the base model this manifest was made for."""
        tensors = named_tensors(model)
        problems = [f"unknown tensor {n!r} (in the model, not in the manifest)"
                    for n in tensors if n not in self.tensors]
        problems += [f"missing tensor {n!r} (in the manifest, not in the model)"
                     for n in self.tensors if n not in tensors]
        for n, t in tensors.items():
            e = self.tensors.get(n)
            if e is None:
                continue
            if list(t.shape) != e["shape"]:
                problems.append(f"tensor {n!r}: shape {list(t.shape)}, manifest has {e['shape']}")
            if dtypes and dtype_name(t.dtype) != e["dtype"]:
                problems.append(f"tensor {n!r}: dtype {dtype_name(t.dtype)}, manifest has {e['dtype']}")
        if fingerprint:
            if any(t.device.type == "meta" for t in tensors.values()):
                problems.append("cannot check the fingerprint: the model is on the meta device")
            else:
                found = model_fingerprint(tensors)
                if found != self.base_fingerprint:
                    problems.append(f"fingerprint {found[:16]}... differs from the manifest's "
                                    f"{self.base_fingerprint[:16]}...: not the same base weights")
        return problems

    def fit_summary(self, model: NamedTensors) -> str | None:
        """One line on how ``model``'s tensor layout differs from this manifest's (None: names and
        shapes fit), e.g. "212 of 686 tensors differ in shape, 3 missing, 1 unknown"."""
        tensors = named_tensors(model)
        shape = sum(1 for n, t in tensors.items() if n in self.tensors and list(t.shape) != self.tensors[n]["shape"])
        missing = sum(1 for n in self.tensors if n not in tensors)
        unknown = sum(1 for n in tensors if n not in self.tensors)
        if not (shape or missing or unknown):
            return None
        parts = [f"{shape} of {len(self.tensors)} tensors differ in shape"]
        parts += [f"{missing} missing"] if missing else []
        parts += [f"{unknown} unknown to the manifest"] if unknown else []
        return ", ".join(parts)

    def check_model(self, model: NamedTensors, *, dtypes: bool = True, fingerprint: bool = True) -> None:
        """Raise ``ManifestError`` listing every difference between ``model`` and the base model."""
        problems = self.model_problems(model, dtypes=dtypes, fingerprint=fingerprint)
        if problems:
            raise ManifestError(f"model does not match the manifest ({len(problems)} problem(s)):",
                                problems)


def load_mask(path: str | os.PathLike, model: ModelLike) -> FreezeMask:
    """Read a mask file (``{"frozen": [names...]}``) or a manifest, checked against ``model``."""
    path = Path(path)
    obj = read_json(path)
    if isinstance(obj, dict) and "schema" in obj:
        try:
            return Manifest.from_dict(obj, source=f"manifest {str(path)!r}").mask(model)
        except ManifestError as exc:
            raise MaskError(str(exc)) from None
    return FreezeMask.from_dict(obj, model, source=f"mask file {str(path)!r}")
