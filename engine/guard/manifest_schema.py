"""The manifest file's schema: what a valid document holds, checked before a ``Manifest`` is made.

Reading a manifest never trusts the file: every key, entry and lock is checked and every problem is
reported at once, so an edited or truncated file is refused with the full list of what is wrong.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from freezeasguard.engine.errors import ManifestError
from freezeasguard.engine.guard.subspace import SIDES

SCHEMA = "freezeasguard.manifest/2"
READS = ("freezeasguard.manifest/1", SCHEMA)  # 1: tensor masks only; 2 adds direction locks
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCKS_FILE = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")
_TOP_KEYS = ("schema", "base_fingerprint", "counts", "provenance", "signature", "tensors", "locks")
_REQUIRED_KEYS = ("schema", "base_fingerprint", "counts", "provenance", "tensors")


def counts_of(tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``counts`` section a manifest must carry for ``tensors`` (a hand edit shows as a mismatch)."""
    frozen = [e for e in tensors.values() if e["frozen"]]
    n_frozen, n_total = len(frozen), len(tensors)
    p_frozen = sum(e["numel"] for e in frozen)
    p_total = sum(e["numel"] for e in tensors.values())
    return {
        "tensors": {"frozen": n_frozen, "total": n_total, "ratio": n_frozen / n_total if n_total else 0.0},
        "params": {"frozen": p_frozen, "total": p_total, "ratio": p_frozen / p_total if p_total else 0.0},
    }


def entry_problems(name: str, e: Any) -> list[str]:
    """Every way one ``tensors`` entry is malformed."""
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


def check_document(obj: Any, source: str) -> None:
    """Raise one ``ManifestError`` naming ``source`` and listing every problem of a parsed manifest."""
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
            problems += entry_problems(name, e)
    if not problems and obj["counts"] != counts_of(tensors):
        problems.append(f"counts {obj['counts']} disagree with the tensors "
                        f"({counts_of(tensors)}): the file was edited")
    if "locks" in obj:
        if obj["schema"] != SCHEMA:
            problems.append(f"locks need schema {SCHEMA!r}")
        elif not problems:
            problems += lock_section_problems(obj["locks"], tensors)
    if problems:
        raise ManifestError(f"{source}: not a valid manifest:", problems)
