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

Recovery deletes and renames folders, so it trusts only what it verifies: it reads the log through
``service.logverify.verified_entries`` (every hash, link and signature from the first line; a log
the audit rejects is refused, naming its first bad line), and it touches only the claim and stage
it recomputes from a record's output folder and job id, the paths the service itself created,
never a path a record names on its own. A record whose paths differ from those, or whose claim
file does not name its job, is left alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from freezeasguard.engine.errors import JobError, JobLogError
from freezeasguard.engine.io import file_sha256, rename_noreplace
from freezeasguard.engine.service.audit import JobStates
from freezeasguard.engine.service.joblog import append_record
from freezeasguard.engine.service.logcheckpoint import verified_entries
from freezeasguard.engine.service.records import utc_now

FAILPOINT_ENV = "FREEZEASGUARD_FAILPOINT"
# A job id names files (its stage), so it is a plain name: no separators, no "..".
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)


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


def claim_alive(path: Path) -> bool:
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


def _own_paths(job_id: Any, where: Any) -> tuple[Path, Path, Path] | None:
    """(out, stage, claim) of a record, recomputed from its output folder and job id, or None if
    the record's own stage and claim are not exactly those (then recovery leaves it alone)."""
    if not (isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) and isinstance(where, dict)):
        return None
    out = where.get("out")
    if not isinstance(out, str) or not os.path.isabs(out) or "\x00" in out:
        return None
    out_p = Path(out)
    stage, claim = stage_path(out_p, job_id), claim_path(out_p)
    if where.get("stage") != str(stage) or where.get("claim") != str(claim) or out_p.name in ("", ".", ".."):
        return None
    return out_p, stage, claim


def _claim_names(claim: Path, job_id: str) -> bool:
    """Whether the claim file at ``claim`` is one ``claim_output`` wrote for ``job_id``."""
    try:
        fd = os.open(claim, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        data = json.loads(os.read(fd, 4096) or b"null")
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    finally:
        os.close(fd)
    return isinstance(data, dict) and data.get("job_id") == job_id


def recover_jobs(log: str | os.PathLike, key: Any) -> list[str]:
    """Finish or fail every interrupted job of ``log`` (see the module docstring).

    Returns:
        One line per job recovered, saying what was done.
    Raises:
        JobLogError if the log fails verification with ``key`` (nothing is recovered from it).
    """
    log = Path(log)
    if not log.is_file():
        return []
    jobs = JobStates()
    try:
        for entry in verified_entries(log, key):
            jobs.see(entry["seq"], entry["record"])
    except OSError as exc:
        raise JobLogError(f"{log}: cannot be read for recovery ({exc})") from None
    done = []
    for job_id, rec in jobs.last.items():
        if rec.get("status") not in ("started", "completed"):
            continue
        paths = _own_paths(job_id, rec.get("publish"))
        if paths is None:
            continue
        out, stage, claim = paths
        if rec["status"] == "completed" and os.path.lexists(out):
            continue
        if not claim.exists() or claim_alive(claim) or not _claim_names(claim, job_id):
            continue  # a live job, one already recovered, or a claim this job did not make
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
        name = str(o.get("file", ""))
        if (name and "/" not in name and name not in (".", "..") and stage.is_dir() and not stage.is_symlink()
                and delta.is_file() and not delta.is_symlink() and file_sha256(delta) == o.get("sha256")):
            try:
                publish_stage(stage, out)
                return f"job {job_id}: published its recorded output to {out} (interrupted after its record)"
            except JobError:
                pass
    if not stage.is_symlink():  # rmtree never follows one; a link there is not the service's stage
        shutil.rmtree(stage, ignore_errors=True)
    fail = {k: v for k, v in rec.items() if k not in ("status", "finished", "error", "output")}
    why = ("interrupted after its completion record, and its staged output was lost"
           if rec["status"] == "completed" else "interrupted: the service stopped before the job finished")
    fail.update(status="failed", finished=utc_now(), output=None, error=f"JobError: {why}")
    fail.setdefault("verify", {"ok": False, "checked": 0, "summary": "not verified: the job did not finish",
                               "failures": []})
    append_record(log, fail, key)
    return f"job {job_id}: {why}; recorded as failed"
