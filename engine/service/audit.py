"""Auditing the job log: its hash chain and signatures, every record, and (optionally) every
published output.

A job appears in the log as a "started" record (written before training: the intent, with no
output yet), then a "completed" or "failed" record. A start with neither after it is an
*interrupted* job (the service died mid-run): ``audit_jobs`` lists those in
``AuditReport.interrupted``, which is not a failure of the log.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from freezeasguard.engine.io import file_sha256
from freezeasguard.engine.service.joblog import GENESIS, REPAIR_SCHEMA, AuditReport, audit, read_entries
from freezeasguard.engine.service.signing import Ed25519Key, HmacKey

RECORD_SCHEMA = "freezeasguard.job/1"
STATUSES = ("started", "completed", "failed")
_STARTED_KEYS = ("schema", "job_id", "status", "spec", "config", "dataset", "manifest", "base")
_RECORD_KEYS = _STARTED_KEYS + ("verify", "output")


def record_manifest_key_id(record: Mapping[str, Any]) -> Any:
    """The key id of the publisher key that signed the manifest a job ran under (None if absent)."""
    manifest = record.get("manifest")
    sig = manifest.get("signature") if isinstance(manifest, Mapping) else None
    return sig.get("key_id") if isinstance(sig, Mapping) else None


def output_problems(record: Mapping[str, Any]) -> list[str]:
    """A completed record's output file: it must exist and match its recorded sha256."""
    o = record.get("output")
    if not isinstance(o, Mapping) or not isinstance(o.get("sha256"), str):
        return [f"job {record.get('job_id')}: completed without an output hash"]
    path = Path(o.get("path") or "")
    if not path.is_file():
        return [f"job {record.get('job_id')}: output {str(path)!r} is missing"]
    if file_sha256(path) != o["sha256"]:
        return [f"job {record.get('job_id')}: output {str(path)!r} does not match its recorded sha256"]
    return []


def record_problems(record: Mapping[str, Any], *, outputs: bool = False,
                    manifest_key_id: str | None = None) -> list[str]:
    """What is wrong with one job record.

    Args:
        outputs: also re-hash a completed job's delta file.
        manifest_key_id: the publisher key id every job's manifest must be signed by.
    """
    if record.get("schema") == REPAIR_SCHEMA:  # the service's own signed note of a torn line it cut off
        ok = (isinstance(record.get("torn_sha256"), str) and isinstance(record.get("torn_bytes"), int)
              and "job_id" not in record)
        return [] if ok else ["a log repair record without the torn bytes' hash and length"]
    missing = [k for k in _STARTED_KEYS if k not in record]
    if missing:
        return [f"job record lacks {missing}"]
    if record["schema"] != RECORD_SCHEMA:
        return [f"unknown job record schema {record['schema']!r}"]
    status, job = record["status"], record["job_id"]
    if status not in STATUSES:
        return [f"job {job}: unknown status {status!r}"]
    if status != "started":
        missing = [k for k in _RECORD_KEYS if k not in record]
        if missing:
            return [f"job {job}: {status} record lacks {missing}"]
    out: list[str] = []
    if manifest_key_id is not None:
        kid = record_manifest_key_id(record)
        if kid is None:
            out.append(f"job {job}: the record does not name the key that signed its manifest "
                       f"(expected publisher key {manifest_key_id!r})")
        elif kid != manifest_key_id:
            out.append(f"job {job}: ran under a manifest signed by key {kid!r}, not by the publisher key "
                       f"{manifest_key_id!r}")
    if status == "completed":
        if not (isinstance(record["verify"], dict) and record["verify"].get("ok") is True):
            out.append(f"job {job}: completed without a passing freeze verification")
        o = record["output"]
        if outputs:
            out += output_problems(record)
        elif not isinstance(o, Mapping) or not isinstance(o.get("sha256"), str):
            out.append(f"job {job}: completed without an output hash")
    return out


class JobStates:
    """Follows records in log order: which started jobs have not finished, each job's final record
    (a "completed" record can be followed by a "failed" one, e.g. when publishing failed or a
    recovery found the staged output lost; only the final one describes the job), and each job's
    last record of any status (what recovery resumes from)."""

    def __init__(self) -> None:
        self.open: dict[str, None] = {}  # insertion-ordered set of started, unfinished job ids
        self.final: dict[str, tuple[int, Mapping[str, Any]]] = {}  # job id -> (seq, its last record)
        self.last: dict[str, Mapping[str, Any]] = {}  # job id -> its last record, "started" included

    def see(self, seq: int, record: Mapping[str, Any]) -> None:
        job, status = record.get("job_id"), record.get("status")
        if not isinstance(job, str):
            return
        self.last[job] = record
        if status == "started":
            self.open[job] = None
        elif status in ("completed", "failed"):
            self.open.pop(job, None)
            self.final[job] = (seq, record)

    @property
    def interrupted(self) -> list[str]:
        return list(self.open)

    def completed(self) -> list[tuple[int, Mapping[str, Any]]]:
        """(seq, record) of every job whose final record is "completed", in log order."""
        return sorted((v for v in self.final.values() if v[1].get("status") == "completed"), key=lambda v: v[0])


class OutputsCheck(NamedTuple):
    problems: list[str]
    """Jobs whose final record is "completed" but whose output file is missing or does not match
    its recorded sha256."""
    interrupted: list[str]
    """Job ids with a "started" record and no "completed" or "failed" record after it."""


def _records(path: str | os.PathLike) -> list[tuple[int, Mapping[str, Any]]]:
    """(seq, record) of every readable entry; unreadable lines are skipped (``audit`` names them)."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                entry = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            record = entry.get("record") if isinstance(entry, dict) else None
            if isinstance(record, dict):
                seq = entry.get("seq")
                out.append((seq if isinstance(seq, int) else lineno - 1, record))
    return out


def outputs_problems(path: str | os.PathLike) -> OutputsCheck:
    """Cross-check a job log's records against the files on disk (no chain or signature checks:
    ``audit_jobs`` does those): every completed job's output exists with its recorded hash, and
    which started jobs never finished."""
    jobs = JobStates()
    for seq, record in _records(path):
        jobs.see(seq, record)
    problems = [p for _, record in jobs.completed() for p in output_problems(record)]
    return OutputsCheck(problems, jobs.interrupted)


def audit_jobs(path: str | os.PathLike, *, outputs: bool = False, expect_head: str | None = None,
               key: HmacKey | Ed25519Key | None = None, manifest_key_id: str | None = None) -> AuditReport:
    """Verify a job log's hash chain, signatures and every record in it (see ``joblog.audit``).

    Args:
        outputs: also re-hash the output file of every job whose final record is "completed" (after
            the chain and every record passed; the first mismatch is reported at its record's line).
        expect_head: a head hash kept elsewhere; the log must end exactly there.
        key: the service's verification key; without it signatures are not checked.
        manifest_key_id: the publisher key id that must have signed every job's manifest.
    Returns:
        The ``AuditReport``, with ``interrupted`` listing started jobs that never finished (among
        the records that passed).
    """
    jobs, seen = JobStates(), [0]

    def check(record: dict[str, Any]) -> list[str]:
        problems = record_problems(record, manifest_key_id=manifest_key_id)
        if not problems:
            jobs.see(seen[0], record)
            seen[0] += 1
        return problems

    report = audit(path, check_record=check, expect_head=expect_head, key=key)
    report.interrupted = jobs.interrupted
    if report.ok and outputs:
        for seq, record in jobs.completed():
            problems = output_problems(record)
            if problems:
                hashes = [e.get("hash") for _, e in read_entries(path)]
                report.records, report.head = seq, hashes[seq - 1] if seq else GENESIS
                report.bad_line, report.bad_seq, report.reason = seq + 1, seq, "; ".join(problems)
                break
    return report
