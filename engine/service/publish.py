"""How a job's output comes to exist: claimed, staged, recorded, then published; and recovery.

The protocol (``service.run.run_job`` follows it):

1. **Claim** the output folder: create ``.<name>.claim`` beside it exclusively (``O_EXCL``) and
   hold an ``flock`` on it for the life of the job. A second job naming the same folder is
   refused; an existing folder is never replaced. The lock dies with the process (SIGKILL
   included), which is how recovery tells a live job from an interrupted one.
2. **Intent**: a ``started`` record is appended to the log (signed, fsynced) before training.
3. **Stage**: the job writes into ``.<name>.stage-<job id>`` beside the output folder.
4. **Complete**: the ``completed`` record (with the output's hash) is appended and fsynced, and
   only then is the stage renamed to the output folder (``rename_noreplace``), so a published
   output always has its record. Any error before that appends a ``failed`` record and deletes
   the stage: no output.
5. **Recover** (``recover_jobs``, run before each new job on a log): a job whose claim is no
   longer locked and whose last record is ``started`` was interrupted: its stage is deleted and a
   ``failed`` record appended; one whose last record is ``completed`` but whose output was never
   published (killed between the record and the rename) is published now if its staged delta
   still has the recorded hash, else marked failed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from freezeasguard.engine.errors import JobError, JobLogError
from freezeasguard.engine.io import file_sha256, rename_noreplace
from freezeasguard.engine.service.audit import JobStates
from freezeasguard.engine.service.joblog import append_record, read_entries
from freezeasguard.engine.service.records import utc_now

FAILPOINT_ENV = "FREEZEASGUARD_FAILPOINT"


def failpoint(name: str) -> None:
    """Testing hook: the process kills itself (SIGKILL) here when FREEZEASGUARD_FAILPOINT=name,
    so the crash tests can stop a job at an exact point of the protocol."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def claim_path(out: Path) -> Path:
    return out.parent / f".{out.name}.claim"


def stage_path(out: Path, job_id: str) -> Path:
    return out.parent / f".{out.name}.stage-{job_id}"


@dataclass
class Claim:
    out: Path
    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim_output(out: Path, job_id: str) -> Claim:
    """Claim ``out`` for one job (see the module docstring); JobError if it exists or is claimed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = claim_path(out)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise JobError(f"output folder {str(out)!r} is claimed by another job ({path.name} exists); "
                       "choose another --out") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    claim = Claim(out, path, fd)
    if os.path.lexists(out):
        claim.release()
        raise JobError(f"output folder {str(out)!r} already exists; a job never replaces results")
    os.write(fd, json.dumps({"job_id": job_id, "pid": os.getpid()}).encode())
    os.fsync(fd)
    return claim


def _claim_alive(path: Path) -> bool:
    """Whether a live process still holds the claim at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def publish_stage(stage: Path, out: Path) -> None:
    """Move the finished stage to the output folder, never replacing anything there."""
    try:
        rename_noreplace(stage, out)
    except FileExistsError:
        raise JobError(f"output folder {str(out)!r} appeared while the job ran; the result stays at "
                       f"{str(stage)!r} and is not published") from None


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold the claim of an interrupted job while recovering it (so two recoveries do not race)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def recover_jobs(log: str | os.PathLike, key: Any) -> list[str]:
    """Finish or fail every interrupted job of ``log`` (see the module docstring).

    Returns:
        One line per job recovered, saying what was done.
    """
    log = Path(log)
    if not log.is_file():
        return []
    jobs = JobStates()
    try:
        for lineno, entry in read_entries(log):
            rec = entry.get("record") if isinstance(entry, dict) else None
            if isinstance(rec, dict):
                jobs.see(lineno - 1, rec)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise JobLogError(f"{log}: cannot be read for recovery ({exc}); run `audit`") from None
    done = []
    for job_id, rec in jobs.last.items():
        where = rec.get("publish")
        if rec.get("status") not in ("started", "completed") or not isinstance(where, dict):
            continue
        out, stage, claim = (Path(str(where.get(k, ""))) for k in ("out", "stage", "claim"))
        if rec["status"] == "completed" and out.exists():
            continue
        if not claim.exists() or _claim_alive(claim):
            continue  # a live job, or one already recovered
        try:
            with _held(claim):
                done.append(_recover_one(log, key, rec, out, stage))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claim)
        except BlockingIOError:
            continue  # another process is recovering it right now
    return done


def _recover_one(log: Path, key: Any, rec: dict[str, Any], out: Path, stage: Path) -> str:
    job_id = rec["job_id"]
    if rec["status"] == "completed":
        o = rec.get("output") or {}
        delta = stage / str(o.get("file", ""))
        if stage.is_dir() and delta.is_file() and file_sha256(delta) == o.get("sha256"):
            try:
                publish_stage(stage, out)
                return f"job {job_id}: published its recorded output to {out} (interrupted after its record)"
            except JobError:
                pass
    shutil.rmtree(stage, ignore_errors=True)
    fail = {k: v for k, v in rec.items() if k not in ("status", "finished", "error", "output")}
    why = ("interrupted after its completion record, and its staged output was lost"
           if rec["status"] == "completed" else "interrupted: the service stopped before the job finished")
    fail.update(status="failed", finished=utc_now(), output=None, error=f"JobError: {why}")
    fail.setdefault("verify", {"ok": False, "checked": 0, "summary": "not verified: the job did not finish",
                               "failures": []})
    append_record(log, fail, key)
    return f"job {job_id}: {why}; recorded as failed"
