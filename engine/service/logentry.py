"""The job log's entry format: canonical JSON, the entry hash, and its signature.

Each line of a job log is one entry, the canonical JSON (sorted keys, compact, ASCII) of::

    {"schema": "freezeasguard.joblog/2", "seq": n, "time": ..., "prev": <hash of entry n-1>,
     "record": {...},
     "hash": sha256(canonical JSON of this entry without "hash" and "sig"),
     "sig": {"alg": ..., "key_id": ..., "value": hex(key.sign(ENTRY_TAG + hash))}}

The first entry's ``prev`` is 64 zeros. The signature is made under a domain tag of its own, so a
job-log signature can never pass as a manifest signature, or the other way round. This module
judges one entry at a time; ``service.logverify`` walks the chain, ``service.joblog`` appends.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from freezeasguard.engine.service.signing import Ed25519Key, HmacKey

SCHEMA = "freezeasguard.joblog/2"
SCHEMA_V1 = "freezeasguard.joblog/1"
GENESIS = "0" * 64
ENTRY_TAG = b"freezeasguard.joblog-entry/1\x00"
"""Domain tag of job-log entry signatures (the manifest tag is ``freezeasguard.manifest-signature/1``)."""
_KEYS = frozenset({"schema", "seq", "time", "prev", "record", "hash", "sig"})
_SIG_KEYS = ("alg", "key_id", "value")
UNSIGNED_V1 = "unsigned entry (schema 1)"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``hash`` and ``sig`` fields."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def _signed_message(digest: str) -> bytes:
    return ENTRY_TAG + digest.encode("ascii")


def sign_entry_hash(digest: str, key: HmacKey | Ed25519Key) -> dict[str, str]:
    """The ``sig`` field of an entry whose ``hash`` is ``digest``."""
    return {"alg": key.alg, "key_id": key.key_id, "value": key.sign(_signed_message(digest)).hex()}


def signing_key_problem(key: Any) -> str | None:
    """Why ``key`` cannot sign log entries (None if it can)."""
    if key is None:
        return ("no signing key given: every job-log entry is signed with the service's key "
                "(the policy's log_key_file: an Ed25519 private key or an HMAC secret)")
    if not isinstance(key, (HmacKey, Ed25519Key)):
        return f"the log key must be an HmacKey or Ed25519Key, not a {type(key).__name__}"
    if isinstance(key, Ed25519Key) and key.private is None:
        return (f"Ed25519 key {key.key_id} holds only the public half: it can verify the job log, not sign it "
                "(the service needs the private key)")
    return None


def entry_problem(entry: Any) -> str | None:
    """What is structurally wrong with one parsed entry (not its links or signature), or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("schema") == SCHEMA_V1:
        return UNSIGNED_V1
    if set(entry) != _KEYS:
        missing, extra = sorted(_KEYS - set(entry)), sorted(set(entry) - _KEYS)
        return f"keys differ from the schema (missing {missing}, unexpected {extra})"
    if entry["schema"] != SCHEMA:
        return f"unknown schema {entry['schema']!r}"
    if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool):
        return "seq is not an integer"
    if not isinstance(entry["record"], dict):
        return "record is not an object"
    try:
        digest = entry_hash(entry)
    except (ValueError, TypeError):  # a NaN/Infinity literal has no canonical JSON
        return "the entry holds a non-finite number (not written by append_record)"
    if entry["hash"] != digest:
        return "hash does not match the entry's content (the entry was edited)"
    sig = entry["sig"]
    if not isinstance(sig, dict) or set(sig) != set(_SIG_KEYS) or not all(isinstance(sig[k], str) for k in _SIG_KEYS):
        return "sig must be an object with string 'alg', 'key_id' and 'value'"
    return None


def signature_problem(entry: dict[str, Any], key: HmacKey | Ed25519Key) -> str | None:
    """Why a structurally sound entry is not signed by ``key`` (None if it is)."""
    sig = entry["sig"]
    if sig["key_id"] != key.key_id:
        return f"signed by key {sig['key_id']!r}, not by the service key {key.key_id!r}"
    if sig["alg"] != key.alg:
        return f"signed with {sig['alg']!r}, but the service key is {key.alg!r}"
    try:
        value = bytes.fromhex(sig["value"])
    except ValueError:
        return "the signature value is not hex"
    if not key.verify(_signed_message(entry["hash"]), value):
        return "the signature does not verify with the service key (the entry was forged or rewritten)"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def parse_line(raw: bytes) -> Any:
    """One log line as JSON (duplicate keys refused: they would let two readers see different entries)."""
    return json.loads(raw, object_pairs_hook=_no_duplicates)
