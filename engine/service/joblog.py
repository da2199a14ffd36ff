"""A hash-chained, append-only JSONL log of job records.

Each line is one entry, the canonical JSON (sorted keys, compact, ASCII) of::

    {"schema": ..., "seq": n, "time": ..., "prev": <hash of entry n-1>, "record": {...},
     "hash": sha256(canonical JSON of this entry without "hash")}

The first entry's ``prev`` is 64 zeros. Editing any entry breaks its own hash; editing it *and*
recomputing its hash breaks the next entry's ``prev``; deleting or reordering entries breaks
``seq`` and ``prev``. Only the newest entry can be rewritten consistently, which is why
``audit`` returns the head hash: publish it (or compare it with a copy kept elsewhere) to
anchor the tail.

Appends take an exclusive ``fcntl.flock`` on the log for the read-tail / write-line sequence, so
processes appending at once interleave whole entries and each links to the one before it.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from freezeasguard.engine.errors import JobLogError

SCHEMA = "freezeasguard.joblog/1"
GENESIS = "0" * 64
_KEYS = frozenset({"schema", "seq", "time", "prev", "record", "hash"})
_TAIL_CHUNK = 1 << 16


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _entry_problem(entry: Any) -> str | None:
    """What is structurally wrong with one parsed entry, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if set(entry) != _KEYS:
        missing, extra = sorted(_KEYS - set(entry)), sorted(set(entry) - _KEYS)
        return f"keys differ from the schema (missing {missing}, unexpected {extra})"
    if entry["schema"] != SCHEMA:
        return f"unknown schema {entry['schema']!r}"
    if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool):
        return "seq is not an integer"
    if not isinstance(entry["record"], dict):
        return "record is not an object"
    if entry["hash"] != entry_hash(entry):
        return "hash does not match the entry's content (the entry was edited)"
    return None


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


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` to the log at ``path`` (created if missing); returns the entry written.

    Raises:
        JobLogError if the current last entry is damaged (appending would extend a broken chain).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line_record = json.loads(_canonical(record))  # fail before locking if it is not JSON-able
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            last = _last_line(f)
            if last is None:
                seq, prev = 0, GENESIS
            else:
                try:
                    tail = json.loads(last)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    tail = None
                problem = _entry_problem(tail)
                if problem is not None:
                    raise JobLogError(f"{path}: the last entry is damaged ({problem}); run `audit`")
                seq, prev = tail["seq"] + 1, tail["hash"]
            entry = {"schema": SCHEMA, "seq": seq, "prev": prev, "record": line_record,
                     "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")}
            entry["hash"] = entry_hash(entry)
            # One write of one whole line, at the end (O_APPEND), while holding the lock.
            f.write(_canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return entry


def read_entries(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, entry) for every line; no checks (use ``audit`` for those)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, json.loads(line)


@dataclass
class AuditReport:
    """Outcome of ``audit``: the chain is good up to ``records`` entries, or ``bad_line`` is the
    first entry that fails and ``reason`` says why."""

    path: str
    records: int
    head: str
    bad_line: int | None = None
    bad_seq: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: {self.records} record(s), chain intact, head {self.head}"
        seq = f" (seq {self.bad_seq})" if self.bad_seq is not None else ""
        return (f"{self.path}: line {self.bad_line}{seq} is the first bad record: {self.reason} "
                f"({self.records} record(s) before it are intact)")


def audit(path: str | os.PathLike,
          check_record: Callable[[dict[str, Any]], list[str]] | None = None,
          expect_head: str | None = None) -> AuditReport:
    """Verify every entry's hash and link, and (optionally) each record's content.

    Args:
        path: the log.
        check_record: returns the problems of one record (e.g. its output file's hash).
        expect_head: a head hash kept elsewhere; the log must end exactly there.
    Returns:
        An ``AuditReport`` naming the first bad line (1-based) and why.
    """
    path = Path(path)
    if not path.is_file():
        raise JobLogError(f"job log {str(path)!r} does not exist")
    prev, count = GENESIS, 0

    def bad(lineno: int, reason: str, seq: int | None = None) -> AuditReport:
        return AuditReport(str(path), count, prev, lineno, seq, reason)

    with open(path, "rb") as f:
        lineno = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return bad(lineno, "incomplete last line (interrupted write?)")
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return bad(lineno, f"not valid JSON ({exc})")
            problem = _entry_problem(entry)
            seq = entry.get("seq") if isinstance(entry, dict) else None
            if problem is not None:
                return bad(lineno, problem, seq if isinstance(seq, int) else None)
            if seq != count:
                return bad(lineno, f"seq {seq}, expected {count} (records deleted, duplicated or reordered)",
                           seq)
            if entry["prev"] != prev:
                return bad(lineno, "prev does not match the previous record's hash (a record before "
                                   "it was edited, removed or inserted)", seq)
            if check_record is not None:
                issues = check_record(entry["record"])
                if issues:
                    return bad(lineno, "; ".join(issues), seq)
            prev, count = entry["hash"], count + 1
    if expect_head is not None and prev != expect_head:
        return AuditReport(str(path), count, prev, lineno or 1, count - 1 if count else None,
                           f"head {prev[:16]}... is not the expected {expect_head[:16]}... "
                           "(the newest records were rewritten or truncated)")
    return AuditReport(str(path), count, prev)


def tail_problem(path: str | os.PathLike) -> str | None:
    """Why ``append_record`` would refuse the log at ``path`` now (None if it would append)."""
    try:
        with open(path, "rb") as f:
            last = _last_line(f)
    except JobLogError as exc:
        return str(exc)
    if last is None:
        return None
    try:
        problem = _entry_problem(json.loads(last))
    except (json.JSONDecodeError, UnicodeDecodeError):
        problem = "not valid JSON"
    return None if problem is None else f"the last entry is damaged ({problem}); run `audit`"
