"""A hash-chained, signed, append-only JSONL log of job records.

Each line is one entry, the canonical JSON (sorted keys, compact, ASCII) of::

    {"schema": "freezeasguard.joblog/2", "seq": n, "time": ..., "prev": <hash of entry n-1>,
     "record": {...},
     "hash": sha256(canonical JSON of this entry without "hash" and "sig"),
     "sig": {"alg": ..., "key_id": ..., "value": hex(key.sign(ENTRY_TAG + hash))}}

The first entry's ``prev`` is 64 zeros. Editing any entry breaks its own hash; editing it *and*
recomputing its hash breaks the next entry's ``prev``; deleting or reordering entries breaks
``seq`` and ``prev``. A hash chain alone does not stop whoever can write the file from rewriting
*all* of it consistently, so every entry is also signed with the service's key (HMAC-SHA256 or
Ed25519, ``service.signing``) over its hash, under a domain tag of its own (a job-log signature
can never pass as a manifest signature, or the other way round).

What ``audit`` with the service's (verification) key detects, and what it cannot:

* detected: any edit, insertion, deletion or reordering of records by anyone who does not hold
  the service key (the signatures and the chain break);
* not detected: the newest records being deleted from the end (the rest is still a valid signed
  chain) unless a head hash kept elsewhere is given (``expect_head``), and a rewrite by whoever
  holds the service key. Without the key, ``audit`` checks only the chain, and says so.

Schema-1 entries (``freezeasguard.joblog/1``, hash-chained but unsigned) are refused by
``append_record`` and reported by ``audit`` as "unsigned entry (schema 1)".

Records must be JSON; ``encodable`` is the one documented conversion applied to them:
non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, tuples become lists,
and anything else that is not JSON (bytes, objects, non-string keys, reference cycles) is refused
with a ``JobLogError`` naming its key path, before the log is locked or written.

Appends take an exclusive ``fcntl.flock`` on the log for the read-tail / write-line sequence, so
processes appending at once interleave whole entries and each links to the one before it; each
entry is one ``write`` of one line, then flushed and fsynced (and, when the append wrote the
log's first entry, the parent directory is fsynced too, so the new file's name is durable).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.io import fsync_dir
from freezeasguard.engine.service.records import encodable
from freezeasguard.engine.service.signing import HMAC_SHA256, Ed25519Key, HmacKey

SCHEMA = "freezeasguard.joblog/2"
SCHEMA_V1 = "freezeasguard.joblog/1"
GENESIS = "0" * 64
ENTRY_TAG = b"freezeasguard.joblog-entry/1\x00"
"""Domain tag of job-log entry signatures (the manifest tag is ``freezeasguard.manifest-signature/1``)."""
_KEYS = frozenset({"schema", "seq", "time", "prev", "record", "hash", "sig"})
_SIG_KEYS = ("alg", "key_id", "value")
_TAIL_CHUNK = 1 << 16


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


# ------------------------------------------------------------------------------------- entries
def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``hash`` and ``sig`` fields."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def _signed_message(digest: str) -> bytes:
    return ENTRY_TAG + digest.encode("ascii")


def sign_entry_hash(digest: str, key: HmacKey | Ed25519Key) -> dict[str, str]:
    """The ``sig`` field of an entry whose ``hash`` is ``digest``."""
    return {"alg": key.alg, "key_id": key.key_id, "value": key.sign(_signed_message(digest)).hex()}


def _signing_key_problem(key: Any) -> str | None:
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


def _entry_problem(entry: Any) -> str | None:
    """What is structurally wrong with one parsed entry (not its links or signature), or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("schema") == SCHEMA_V1:
        return "unsigned entry (schema 1)"
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


def _signature_problem(entry: dict[str, Any], key: HmacKey | Ed25519Key) -> str | None:
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


def _parse(raw: bytes) -> Any:
    """One log line as JSON (duplicate keys refused: they would let two readers see different entries)."""
    return json.loads(raw, object_pairs_hook=_no_duplicates)


def _last_line(f) -> bytes | None:
    """The last complete line of a binary file open for reading (None if the file is empty)."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return None
    f.seek(end - 1)
    if f.read(1) != b"\n":
        raise JobLogError("the log's last line is incomplete (an interrupted write?); "
                          "run `audit` and repair the log before appending")
    # Walk back from the final newline to the one before it.
    pos, buf = end - 1, b""
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        f.seek(start)
        buf = f.read(pos - start) + buf
        cut = buf.rfind(b"\n")
        if cut >= 0:
            return buf[cut + 1:]
        pos = start
    return buf


def _tail_refusal(last: bytes, key: HmacKey | Ed25519Key | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the parsed last entry, None) if a new entry may follow it, else (None, why not)."""
    try:
        tail = _parse(last)
    except (ValueError, UnicodeDecodeError, RecursionError):
        tail = None
    problem = _entry_problem(tail)
    if problem == "unsigned entry (schema 1)":
        return None, ("the last entry is an unsigned entry (schema 1): this log predates signed job logs and "
                      "cannot be extended; start a new log (audit still reads the old one)")
    if problem is not None:
        return None, f"the last entry is damaged ({problem}); run `audit`"
    if key is not None:
        if tail["sig"]["key_id"] != key.key_id:
            return None, (f"the last entry is signed by key {tail['sig']['key_id']!r}, not by this service's key "
                          f"{key.key_id!r} (the service key changed, or another writer used this log); "
                          "refusing to extend it: start a new log for the new key")
        problem = _signature_problem(tail, key)
        if problem is not None:
            return None, f"the last entry's signature is bad ({problem}); run `audit`"
    return tail, None


def append_record(path: str | os.PathLike, record: dict[str, Any],
                  key: HmacKey | Ed25519Key) -> dict[str, Any]:
    """Append ``record`` to the log at ``path`` (created if missing), signed with ``key``; returns
    the entry written.

    ``record`` is passed through ``encodable`` (non-finite floats become "nan"/"inf"/"-inf").

    Args:
        key: the service's signing key (``HmacKey``, or ``Ed25519Key`` with its private half).
    Raises:
        JobLogError, before anything is written, if ``key`` cannot sign, ``record`` is not a JSON
        object tree, the current last entry is damaged or unsigned (schema 1), or the last entry
        is signed by another key (the service key changed, or someone else wrote the log).
    """
    problem = _signing_key_problem(key)
    if problem is not None:
        raise JobLogError(f"cannot append to the job log: {problem}")
    if not isinstance(record, dict):
        raise JobLogError(f"a job record must be a JSON object, not a {type(record).__name__}")
    line_record = encodable(record)  # fails (naming the key path) before the log is touched
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644), True
    except FileExistsError:
        fd, created = os.open(path, os.O_RDWR | os.O_APPEND), False
    with os.fdopen(fd, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            last = _last_line(f)
            if last is None:
                seq, prev = 0, GENESIS
            else:
                tail, why = _tail_refusal(last, key)
                if why is not None:
                    raise JobLogError(f"{path}: {why}")
                seq, prev = tail["seq"] + 1, tail["hash"]
            entry = {"schema": SCHEMA, "seq": seq, "prev": prev, "record": line_record,
                     "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")}
            entry["hash"] = entry_hash(entry)
            entry["sig"] = sign_entry_hash(entry["hash"], key)
            # One write of one whole line, at the end (O_APPEND), while holding the lock.
            f.write(_canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
            if created or last is None:  # the file's name must survive a crash as well as its line
                fsync_dir(path.parent)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return entry


def read_entries(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, entry) for every line; no checks (use ``audit`` for those)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, json.loads(line)


# --------------------------------------------------------------------------------------- audit
@dataclass
class AuditReport:
    """Outcome of ``audit``: the chain is good up to ``records`` entries, or ``bad_line`` is the
    first entry that fails and ``reason`` says why.

    ``signatures_checked`` says whether every entry's signature was verified with the service key
    ``key_id`` (algorithm ``key_alg``); without a key ``key_id`` is the key id the entries claim
    (unverified) and ``key_alg`` is None. ``anchored``: an expected head was given.
    ``interrupted`` (filled by ``audit.audit_jobs``) lists jobs that started and never finished;
    they are not failures.
    """

    path: str
    records: int
    head: str
    bad_line: int | None = None
    bad_seq: int | None = None
    reason: str | None = None
    signatures_checked: bool = False
    key_id: str | None = None
    anchored: bool = False
    key_alg: str | None = None
    interrupted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bad_line is None

    def limits(self) -> str:
        """What this audit detects and what it cannot, in plain words."""
        if self.signatures_checked:
            text = (f"Signatures were checked with the service key {self.key_id}: audit detects any edit, "
                    "insertion, deletion or reordering of records by anyone who does not hold that key.")
            if self.key_alg == HMAC_SHA256:
                text += (" (An HMAC secret signs as well as verifies: everyone who holds it, this auditor "
                         "included, holds the service key.)")
            if self.anchored:
                return text + (" The log must also end at the expected head hash, so the newest records "
                               "being deleted from the end, or any rewrite of the records up to that head (even "
                               "by someone who holds the service key), is detected too, as far as that copy of "
                               "the head can be trusted.")
            return text + (" It cannot detect the newest records being deleted from the end of the log "
                           "(truncation) unless a head hash kept elsewhere is given as the expected head, nor a "
                           "rewrite by someone who holds the service key.")
        text = ("Signatures were NOT checked (no service key given): audit detects only damage and edits that "
                "break the hash chain.")
        if self.anchored:
            return text + (" The log must end at the expected head hash, so any change to the records up to "
                           "that head is detected, as far as that copy of the head can be trusted; give the "
                           "service's verification key to check who wrote them.")
        return text + (" Whoever can write the log file can rewrite all of it consistently, or delete the newest "
                       "records, and it still passes; give the service's verification key to detect that.")

    def summary(self) -> str:
        if self.ok:
            signed = (f"signatures verified (key {self.key_id})" if self.signatures_checked
                      else "signatures NOT checked")
            head = f"{self.path}: {self.records} record(s), chain intact, {signed}, head {self.head}"
        else:
            seq = f" (seq {self.bad_seq})" if self.bad_seq is not None else ""
            head = (f"{self.path}: line {self.bad_line}{seq} is the first bad record: {self.reason} "
                    f"({self.records} record(s) before it are intact)")
        lines = [head, self.limits()]
        if self.interrupted:
            lines.append(f"{len(self.interrupted)} job(s) started and never finished (interrupted, not a "
                         f"failure of the log): {', '.join(self.interrupted)}")
        return "\n".join(lines)


def audit(path: str | os.PathLike,
          check_record: Callable[[dict[str, Any]], list[str]] | None = None,
          expect_head: str | None = None,
          key: HmacKey | Ed25519Key | None = None) -> AuditReport:
    """Verify every entry's hash, link and (with ``key``) signature, and (optionally) each record.

    Args:
        path: the log.
        check_record: returns the problems of one record (e.g. its output file's hash).
        expect_head: a head hash kept elsewhere; the log must end exactly there.
        key: the service's verification key (Ed25519 public or private key, or the HMAC secret).
            Without it signatures are not checked, and the report says so (``limits()``).
    Returns:
        An ``AuditReport`` naming the first bad line (1-based) and why.
    """
    path = Path(path)
    if not path.is_file():
        raise JobLogError(f"job log {str(path)!r} does not exist")
    if key is not None and not isinstance(key, (HmacKey, Ed25519Key)):
        raise JobLogError(f"the log key must be an HmacKey or Ed25519Key, not a {type(key).__name__}")
    prev, count = GENESIS, 0
    claimed: str | None = None  # the key id the first entry claims (every entry must claim the same)

    def report(**kw: Any) -> AuditReport:
        return AuditReport(str(path), count, prev, signatures_checked=key is not None,
                           key_id=key.key_id if key is not None else claimed,
                           key_alg=key.alg if key is not None else None,
                           anchored=expect_head is not None, **kw)

    def bad(lineno: int, reason: str, seq: int | None = None) -> AuditReport:
        return report(bad_line=lineno, bad_seq=seq, reason=reason)

    with open(path, "rb") as f:
        lineno = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return bad(lineno, "incomplete last line (interrupted write?)")
            try:
                entry = _parse(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                return bad(lineno, f"not valid JSON ({exc})")
            problem = _entry_problem(entry)
            seq = entry.get("seq") if isinstance(entry, dict) else None
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            if problem is not None:
                return bad(lineno, problem, seq)
            if seq != count:
                return bad(lineno, f"seq {seq}, expected {count} (records deleted, duplicated or reordered)",
                           seq)
            if entry["prev"] != prev:
                return bad(lineno, "prev does not match the previous record's hash (a record before "
                                   "it was edited, removed or inserted)", seq)
            if key is not None:
                problem = _signature_problem(entry, key)
                if problem is not None:
                    return bad(lineno, problem, seq)
            elif claimed is not None and entry["sig"]["key_id"] != claimed:
                return bad(lineno, f"signed by key {entry['sig']['key_id']!r}, but the records before it by "
                                   f"{claimed!r} (the service never changes keys within a log)", seq)
            if check_record is not None:
                issues = check_record(entry["record"])
                if issues:
                    return bad(lineno, "; ".join(issues), seq)
            if claimed is None:
                claimed = entry["sig"]["key_id"]
            prev, count = entry["hash"], count + 1
    if expect_head is not None and prev != expect_head:
        return bad(lineno or 1, f"head {prev[:16]}... is not the expected {expect_head[:16]}... "
                                "(the newest records were rewritten or truncated)", count - 1 if count else None)
    return report()


def tail_problem(path: str | os.PathLike, key: HmacKey | Ed25519Key | None = None) -> str | None:
    """Why ``append_record`` would refuse the log at ``path`` now (None if it would append).

    With ``key``, also whether the last entry is signed by that key (as ``append_record`` checks);
    the key's signing ability itself is not checked here.
    """
    try:
        with open(path, "rb") as f:
            last = _last_line(f)
    except JobLogError as exc:
        return str(exc)
    if last is None:
        return None
    return _tail_refusal(last, key)[1]
