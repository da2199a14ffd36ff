"""Auditing the job log: its hash chain, every record, and (optionally) every published output."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from freezeasguard.engine.io import file_sha256
from freezeasguard.engine.service.joblog import AuditReport, audit

RECORD_SCHEMA = "freezeasguard.job/1"
_RECORD_KEYS = ("schema", "job_id", "status", "spec", "config", "dataset", "manifest", "base",
                "verify", "output")


def record_problems(record: Mapping[str, Any], *, outputs: bool = False) -> list[str]:
    """What is wrong with one job record; with ``outputs``, also re-hash its delta file."""
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        return [f"job record lacks {missing}"]
    if record["schema"] != RECORD_SCHEMA:
        return [f"unknown job record schema {record['schema']!r}"]
    out: list[str] = []
    if record["status"] == "completed":
        if not (isinstance(record["verify"], dict) and record["verify"].get("ok") is True):
            out.append(f"job {record['job_id']}: completed without a passing freeze verification")
        o = record["output"]
        if not isinstance(o, dict) or not isinstance(o.get("sha256"), str):
            out.append(f"job {record['job_id']}: completed without an output hash")
        elif outputs:
            path = Path(o.get("path", ""))
            if not path.is_file():
                out.append(f"job {record['job_id']}: output {str(path)!r} is missing")
            elif file_sha256(path) != o["sha256"]:
                out.append(f"job {record['job_id']}: output {str(path)!r} does not match its recorded sha256")
    elif record["status"] != "failed":
        out.append(f"job {record['job_id']}: unknown status {record['status']!r}")
    return out


def audit_jobs(path: str | os.PathLike, *, outputs: bool = False,
               expect_head: str | None = None) -> AuditReport:
    """Verify a job log's hash chain and every record in it (see ``joblog.audit``)."""
    return audit(path, check_record=lambda r: record_problems(r, outputs=outputs), expect_head=expect_head)
