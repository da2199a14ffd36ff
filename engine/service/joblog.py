"""A hash-chained, signed, append-only JSONL log of job records: appending to it.

The entry format is ``service.logentry``'s; ``service.logverify`` walks and audits a log. A hash
chain alone does not stop whoever can write the file from rewriting *all* of it consistently, so
every entry is also signed with the service's key (HMAC-SHA256 or Ed25519, ``service.signing``).

The service trusts only what it verifies. Before each append, under the lock, it verifies the
*whole* log (every hash, link and signature, from the first line, or from the signed checkpoint of
what it verified before, ``service.logcheckpoint``) and refuses to extend one the
audit rejects, naming the first bad line: a check of the last line alone would let anyone who can
write the file re-append an old signed entry, let the service link its next job to it, and then
delete the entries in between, leaving a valid chain with jobs missing. A line that a short write
left without its newline (the one kind of damage the service causes itself) is repaired in place:
if it is a whole, valid next entry its newline is written; otherwise its bytes are cut off and a
signed ``repair`` record holding their SHA-256 and length is appended before the new record, so
the loss stays on the record.

Records must be JSON; ``encodable`` is the one documented conversion applied to them:
non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, tuples become lists,
and anything else that is not JSON (bytes, objects, non-string keys, reference cycles) is refused
with a ``JobLogError`` naming its key path, before the log is locked or written.

Appends take an exclusive ``fcntl.flock`` on the log for the verify / write-line sequence, so
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
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.io import fsync_dir
from freezeasguard.engine.service.logcheckpoint import save_checkpoint, verified_walk
from freezeasguard.engine.service.logentry import (  # noqa: F401  (the log's public names, in one place)
    ENTRY_TAG,
    GENESIS,
    SCHEMA,
    SCHEMA_V1,
    canonical,
    entry_hash,
    parse_line,
    sign_entry_hash,
    signing_key_problem,
)
from freezeasguard.engine.service.logverify import (  # noqa: F401
    AuditReport,
    Walk,
    audit,
    check_entry,
    refusal,
    walk_log,
)
from freezeasguard.engine.service.records import encodable
from freezeasguard.engine.service.signing import Ed25519Key, HmacKey

REPAIR_SCHEMA = "freezeasguard.log-repair/1"
"""Schema of the record the service signs when it cuts off a torn last line."""


def _read_log(f: BinaryIO, path: Path, key: HmacKey | Ed25519Key) -> Walk:
    """The verified walk of the whole log (a seam the concurrency test widens)."""
    return verified_walk(f, path, key)


def _torn_entry(walk: Walk, key: HmacKey | Ed25519Key) -> dict[str, Any] | None:
    """The torn bytes as an entry, if they are a whole, valid next entry missing only its newline."""
    try:
        entry = parse_line(walk.torn)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return entry if check_entry(entry, walk, key)[1] is None else None


def _write_entry(f: BinaryIO, record: Any, seq: int, prev: str, key: HmacKey | Ed25519Key) -> dict[str, Any]:
    entry = {"schema": SCHEMA, "seq": seq, "prev": prev, "record": record,
             "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")}
    entry["hash"] = entry_hash(entry)
    entry["sig"] = sign_entry_hash(entry["hash"], key)
    # One write of one whole line, at the end (O_APPEND), while holding the lock.
    f.write(canonical(entry) + b"\n")
    f.flush()
    os.fsync(f.fileno())
    return entry


def _repair(f: BinaryIO, walk: Walk, key: HmacKey | Ed25519Key) -> tuple[int, str]:
    """Repair a torn last line (see the module docstring); (seq, prev) for the next entry."""
    whole = _torn_entry(walk, key)
    if whole is not None:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
        return walk.count + 1, whole["hash"]
    os.ftruncate(f.fileno(), walk.end)
    os.fsync(f.fileno())
    repair = {"schema": REPAIR_SCHEMA, "status": "repair", "time": _dt.datetime.now(_dt.timezone.utc)
              .isoformat(timespec="seconds"), "line": walk.count + 1, "torn_bytes": len(walk.torn),
              "torn_sha256": hashlib.sha256(walk.torn).hexdigest(),
              "why": "a short write left this line without its newline; its bytes were cut off"}
    entry = _write_entry(f, repair, walk.count, walk.head, key)
    return walk.count + 1, entry["hash"]


def append_record(path: str | os.PathLike, record: dict[str, Any],
                  key: HmacKey | Ed25519Key) -> dict[str, Any]:
    """Append ``record`` to the log at ``path`` (created if missing), signed with ``key``; returns
    the entry written.

    ``record`` is passed through ``encodable`` (non-finite floats become "nan"/"inf"/"-inf").

    Args:
        key: the service's signing key (``HmacKey``, or ``Ed25519Key`` with its private half).
    Raises:
        JobLogError, before anything is written, if ``key`` cannot sign, ``record`` is not a JSON
        object tree, or any entry of the log fails verification with ``key`` (edited, inserted,
        forged, unsigned (schema 1), signed by another key, out of order): the message names the
        first bad line. A torn last line is repaired instead (module docstring).
    """
    problem = signing_key_problem(key)
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
            walk = _read_log(f, path, key)
            if walk.reason is not None:
                raise JobLogError(f"{path}: {refusal(walk)}")
            seq, prev = (walk.count, walk.head) if walk.torn is None else _repair(f, walk, key)
            entry = _write_entry(f, line_record, seq, prev, key)
            if created or seq == 0:  # the file's name must survive a crash as well as its line
                fsync_dir(path.parent)
            # What this append verified and wrote, for the next walk to start from.
            save_checkpoint(f, path, Walk(count=seq + 1, head=entry["hash"], end=f.seek(0, os.SEEK_END)), key)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return entry


def read_entries(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, entry) for every line; no checks (use ``audit`` or ``verified_entries``
    for those; never act on what this returns)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, json.loads(line)


def tail_problem(path: str | os.PathLike, key: HmacKey | Ed25519Key | None = None) -> str | None:
    """Why ``append_record`` would refuse the log at ``path`` now (None if it would append, a torn
    last line included: the append repairs it).

    Verifies the whole log, with ``key``'s signatures when given (the key's ability to sign is not
    checked here).
    """
    try:
        with open(path, "rb") as f:
            walk = verified_walk(f, path, key) if key is not None else walk_log(f)
    except OSError as exc:
        return f"cannot be read ({exc})"
    return refusal(walk) if walk.reason is not None else None
