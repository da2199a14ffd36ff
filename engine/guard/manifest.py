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
signature in the same file (so it covers the locks too). What a valid file holds is checked in
``guard.manifest_schema``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from freezeasguard.engine.errors import ManifestError, MaskError
from freezeasguard.engine.guard.hashing import NamedTensors, dtype_name, model_fingerprint, named_tensors, tensor_sha256
from freezeasguard.engine.guard.manifest_schema import SCHEMA, check_document, counts_of, lock_section_problems
from freezeasguard.engine.guard.mask import FreezeMask, ModelLike, read_json
from freezeasguard.engine.guard.subspace import SubspaceLock
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.version import __version__


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    # The in-memory manifest must equal the one read back from disk (and hash the same), so
    # normalise now exactly as the writer will: tuples -> lists, unknown objects -> str.
    try:
        return json.loads(json.dumps(obj, default=str, allow_nan=False))
    except ValueError as exc:  # NaN/inf have no canonical JSON form
        raise ManifestError(f"provenance is not JSON-serialisable: {exc}") from None


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
                  counts=counts_of(entries), provenance=_jsonable(prov))
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
        check_document(obj, source)
        return cls(schema=obj["schema"], base_fingerprint=obj["base_fingerprint"], tensors=obj["tensors"],
                   counts=obj["counts"], provenance=obj["provenance"], signature=obj.get("signature"),
                   locks=obj.get("locks"))

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
