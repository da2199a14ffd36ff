"""Verifying a job log: every entry's hash, link and signature, in one walk from the first line.

Both readers of the log use this walk: ``audit`` (for the publisher), and the service itself before
it appends or recovers (``service.logcheckpoint.verified_walk``), so the service never acts on, or
links a new entry to, anything the audit would reject.

What ``audit`` with the service's (verification) key detects, and what it cannot:

* detected: any edit, insertion, deletion or reordering of records by anyone who does not hold
  the service key (the signatures and the chain break);
* not detected: the newest records being deleted from the end (the rest is still a valid signed
  chain) unless a head hash kept elsewhere is given (``expect_head``), and a rewrite by whoever
  holds the service key. Without the key, ``audit`` checks only the chain, and says so.

Schema-1 entries (``freezeasguard.joblog/1``, hash-chained but unsigned) are reported as
"unsigned entry (schema 1)".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.service.logentry import GENESIS, entry_problem, parse_line, signature_problem
from freezeasguard.engine.service.signing import HMAC_SHA256, Ed25519Key, HmacKey

TORN = "incomplete last line (interrupted write?)"


@dataclass
class Walk:
    """Where a walk over a log's lines stopped: ``count`` good entries ending at byte ``end`` with
    hash ``head``; then either the first bad line (``bad_line``, ``bad_seq``, ``reason``), or, at the
    very end, ``torn``: the bytes of a last line without its newline (a short write), unjudged."""

    count: int = 0
    head: str = GENESIS
    end: int = 0
    claimed: str | None = None  # the key id the first entry claims (every entry must claim the same)
    bad_line: int | None = None
    bad_seq: int | None = None
    reason: str | None = None
    torn: bytes | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)  # the good entries, when kept


def check_entry(entry: Any, walk: Walk, key: HmacKey | Ed25519Key | None) -> tuple[int | None, str | None]:
    """(its seq, why it cannot follow the good entries of ``walk``), or (seq, None) if it can."""
    problem = entry_problem(entry)
    seq = entry.get("seq") if isinstance(entry, dict) else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    if problem is not None:
        return seq, problem
    if seq != walk.count:
        return seq, f"seq {seq}, expected {walk.count} (records deleted, duplicated or reordered)"
    if entry["prev"] != walk.head:
        return seq, ("prev does not match the previous record's hash (a record before it was edited, "
                     "removed or inserted)")
    if key is not None:
        return seq, signature_problem(entry, key)
    if walk.claimed is not None and entry["sig"]["key_id"] != walk.claimed:
        return seq, (f"signed by key {entry['sig']['key_id']!r}, but the records before it by "
                     f"{walk.claimed!r} (the service never changes keys within a log)")
    return seq, None


def walk_log(f: BinaryIO, key: HmacKey | Ed25519Key | None = None,
             check_record: Callable[[dict[str, Any]], list[str]] | None = None, *, keep: bool = False,
             start: Walk | None = None) -> Walk:
    """Walk a log open for binary reading, stopping at the first bad line.

    ``start``: a walk already verified up to byte ``start.end`` (``service.logcheckpoint``): the
    walk goes on from there (its entries, if kept, are carried over).
    """
    walk = start if start is not None else Walk()
    f.seek(walk.end)
    for lineno, raw in enumerate(f, start=walk.count + 1):
        if not raw.endswith(b"\n"):  # only the last line can lack its newline
            walk.torn = raw
            return walk
        try:
            entry = parse_line(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            walk.bad_line, walk.reason = lineno, f"not valid JSON ({exc})"
            return walk
        seq, problem = check_entry(entry, walk, key)
        if problem is None and check_record is not None:
            problem = "; ".join(check_record(entry["record"])) or None
        if problem is not None:
            walk.bad_line, walk.bad_seq, walk.reason = lineno, seq, problem
            return walk
        if walk.claimed is None:
            walk.claimed = entry["sig"]["key_id"]
        walk.count, walk.head, walk.end = walk.count + 1, entry["hash"], walk.end + len(raw)
        if keep:
            walk.entries.append(entry)
    return walk


def refusal(walk: Walk) -> str:
    """Why the service refuses to act on a log whose walk stopped at a bad line (or a torn end)."""
    if walk.reason is None:
        return f"line {walk.count + 1}: {TORN}"
    seq = f" (seq {walk.bad_seq})" if walk.bad_seq is not None else ""
    text = f"line {walk.bad_line}{seq} is the first bad record: {walk.reason}"
    if walk.reason.startswith("unsigned entry (schema 1)"):
        hint = ("this log predates signed job logs and cannot be extended; start a new log (audit still "
                "reads the old one)")
    elif walk.reason.startswith("signed by key"):
        hint = ("the service key changed, or another writer used this log; refusing to extend it: start a "
                "new log for the new key")
    else:
        hint = "the log fails its audit, and the service neither extends it nor acts on its records; run `audit`"
    return f"{text}; {hint}"


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
    with open(path, "rb") as f:
        walk = walk_log(f, key, check_record)
    report = AuditReport(str(path), walk.count, walk.head, signatures_checked=key is not None,
                         key_id=key.key_id if key is not None else walk.claimed,
                         key_alg=key.alg if key is not None else None, anchored=expect_head is not None)
    if walk.torn is not None:
        report.bad_line, report.reason = walk.count + 1, TORN
    elif walk.reason is not None:
        report.bad_line, report.bad_seq, report.reason = walk.bad_line, walk.bad_seq, walk.reason
    elif expect_head is not None and walk.head != expect_head:
        report.bad_line, report.bad_seq = max(walk.count, 1), walk.count - 1 if walk.count else None
        report.reason = (f"head {walk.head[:16]}... is not the expected {expect_head[:16]}... "
                         "(the newest records were rewritten or truncated)")
    return report
