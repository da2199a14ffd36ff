"""The service trusts only the job log it verifies: a spliced chain (an old signed entry re-appended,
the entries in between deleted), forged records, and torn lines, against append, planning and
recovery."""
import hashlib
import json
import os
import time

import pytest

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.joblog import REPAIR_SCHEMA, append_record, audit, read_entries, tail_problem
from freezeasguard.engine.service.logcheckpoint import verified_entries
from freezeasguard.engine.service.publish import claim_path, recover_jobs, stage_path

KEY = signing.HmacKey(bytes(range(32)))


@pytest.fixture
def log5(tmp_path):
    path = tmp_path / "jobs.jsonl"
    for i in range(5):
        append_record(path, {"job_id": f"j{i}", "n": i}, KEY)
    return path


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


# ------------------------------------------------------------------------------------ the splice (#6)
def test_splice_of_a_reappended_old_entry_is_refused_before_the_service_links_to_it(log5):
    lines = _lines(log5)
    log5.write_bytes(b"".join(lines) + lines[0])  # an old, genuinely signed entry, re-appended
    before = log5.read_bytes()
    # The last line alone is a signed entry; the chain through it is not.
    with pytest.raises(JobLogError, match=r"line 6 \(seq 0\) is the first bad record: seq 0, expected 5"):
        append_record(log5, {"job_id": "next"}, KEY)
    assert log5.read_bytes() == before  # nothing linked to the old entry
    assert "line 6 (seq 0)" in tail_problem(log5, KEY)  # and planning refuses the job up front
    # So there is no entry whose prev is the old one's hash: deleting lines 2-6 leaves seq 0 alone,
    # and the 4 jobs' removal from the end stays the (documented) truncation that --head detects.
    assert [e["seq"] for _, e in read_entries(log5)] == [0, 1, 2, 3, 4, 0]


def test_a_log_audit_rejects_is_never_extended(log5):
    lines = _lines(log5)
    entry = json.loads(lines[1])
    entry["record"]["n"] = 99  # an edit in the middle, far from the last line
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log5.write_bytes(b"".join(lines))
    assert audit(log5, key=KEY).bad_line == 2
    with pytest.raises(JobLogError, match=r"line 2 \(seq 1\) is the first bad record: hash does not match.*run `audit`"):
        append_record(log5, {"job_id": "next"}, KEY)
    assert len(_lines(log5)) == 5


def test_unsigned_records_inserted_before_the_last_line_are_refused(log5):
    lines = _lines(log5)
    forged = {"schema": "freezeasguard.joblog/2", "seq": 4, "prev": "0" * 64, "time": "t", "record":
              {"job_id": "evil", "status": "started"}, "hash": "0" * 64, "sig": {"alg": "x", "key_id": "y", "value": ""}}
    lines.insert(4, json.dumps(forged).encode() + b"\n")
    log5.write_bytes(b"".join(lines))
    with pytest.raises(JobLogError, match=r"line 5 \(seq 4\)"):
        append_record(log5, {"job_id": "next"}, KEY)
    with pytest.raises(JobLogError, match=r"line 5 \(seq 4\)"):
        verified_entries(log5, KEY)


# ------------------------------------------------------------------------------------- torn lines
def test_torn_line_is_cut_off_with_a_signed_repair_record_and_audit_passes(log5):
    torn = b'{"schema":"freezeasguard.joblog/2","seq":5,"prev":"ab'
    with open(log5, "ab") as f:
        f.write(torn)
    assert not audit(log5, key=KEY).ok
    entry = append_record(log5, {"job_id": "next"}, KEY)
    entries = [e for _, e in read_entries(log5)]
    assert [e["seq"] for e in entries] == list(range(7)) and entry["seq"] == 6
    repair = entries[5]["record"]
    assert repair["schema"] == REPAIR_SCHEMA and repair["line"] == 6
    assert repair["torn_sha256"] == hashlib.sha256(torn).hexdigest() and repair["torn_bytes"] == len(torn)
    assert audit(log5, key=KEY).ok
    assert torn not in log5.read_bytes()


def test_a_whole_entry_missing_only_its_newline_is_kept(log5):
    data = log5.read_bytes()
    log5.write_bytes(data[:-1])  # the short write lost just the newline
    append_record(log5, {"job_id": "next"}, KEY)
    records = [e["record"] for _, e in read_entries(log5)]
    assert [r.get("job_id") for r in records] == ["j0", "j1", "j2", "j3", "j4", "next"]  # nothing lost
    assert audit(log5, key=KEY).ok


def test_repair_records_pass_the_job_audit(tmp_path):
    log = tmp_path / "jobs.jsonl"
    append_record(log, {"job_id": "a"}, KEY)
    with open(log, "ab") as f:
        f.write(b"{")
    append_record(log, {"job_id": "b"}, KEY)
    repair = [e["record"] for _, e in read_entries(log)][1]
    assert repair["schema"] == REPAIR_SCHEMA
    from freezeasguard.engine.service.audit import record_problems
    assert record_problems(repair) == []
    assert record_problems({**repair, "torn_sha256": None})


def test_verifying_the_whole_log_before_each_append_stays_cheap(tmp_path):
    # Measured: a job record is a few KiB; 2000 jobs' worth of entries verify in well under a second.
    log = tmp_path / "jobs.jsonl"
    pad = {"files": {f"img{i}.png": "ab" * 32 for i in range(40)}}
    with open(log, "wb"):
        pass
    for i in range(300):
        append_record(log, {"job_id": f"j{i}", **pad}, KEY)
    t = time.perf_counter()
    assert len(verified_entries(log, KEY)) == 300
    assert time.perf_counter() - t < 2.0


# --------------------------------------------------------------------------- recovery (#7)
def _started(tmp_path, job_id, out):
    return {"schema": "freezeasguard.job/1", "job_id": job_id, "status": "started",
            "publish": {"out": str(out), "stage": str(stage_path(out, job_id)), "claim": str(claim_path(out))}}


def test_recovery_refuses_a_log_with_forged_records(tmp_path):
    log = tmp_path / "jobs.jsonl"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    keys = tmp_path / "keys"
    keys.mkdir()
    append_record(log, {"job_id": "real", "status": "completed"}, KEY)
    # An unsigned "started" record naming the victim as its stage, inserted before the genuine last line.
    forged = {"schema": "freezeasguard.joblog/2", "seq": 1, "prev": "0" * 64, "time": "t", "hash": "0" * 64,
              "sig": {"alg": KEY.alg, "key_id": KEY.key_id, "value": "00"},
              "record": {"job_id": "evil", "status": "completed",
                         "publish": {"out": str(tmp_path / "dest"), "stage": str(keys), "claim": str(victim / "precious")},
                         "output": {"file": "x", "sha256": "0"}}}
    lines = _lines(log)
    log.write_bytes(json.dumps(forged).encode() + b"\n" + b"".join(lines))
    with pytest.raises(JobLogError, match=r"line 1 \(seq 1\)"):
        recover_jobs(log, KEY)
    assert (victim / "precious").exists() and keys.is_dir() and not (tmp_path / "dest").exists()


def test_recovery_touches_only_the_paths_it_derives_from_a_signed_record(tmp_path):
    log = tmp_path / "jobs.jsonl"
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    rec = _started(tmp_path, "j1", out)
    rec["publish"]["stage"] = str(victim)  # a (signed) record whose stage is not the derived one
    append_record(log, rec, KEY)
    claim_path(out).write_text(json.dumps({"job_id": "j1", "pid": 1}))
    assert recover_jobs(log, KEY) == [] and victim.is_dir()
    # The same job with its own paths is recovered: its stage deleted, a failed record signed.
    log2 = tmp_path / "jobs2.jsonl"
    append_record(log2, _started(tmp_path, "j1", out), KEY)
    stage_path(out, "j1").mkdir()
    done = recover_jobs(log2, KEY)
    assert len(done) == 1 and not stage_path(out, "j1").exists() and not claim_path(out).exists()
    assert [e["record"]["status"] for e in verified_entries(log2, KEY)] == ["started", "failed"]


def test_recovery_leaves_a_claim_another_job_made(tmp_path):
    log = tmp_path / "jobs.jsonl"
    out = tmp_path / "out"
    append_record(log, _started(tmp_path, "j1", out), KEY)
    claim_path(out).write_text(json.dumps({"job_id": "someone-else", "pid": 1}))
    assert recover_jobs(log, KEY) == [] and claim_path(out).exists()
    os.unlink(claim_path(out))


# ------------------------------------------------------------------ the signed checkpoint (a cache)
def _checked(monkeypatch):
    from freezeasguard.engine.service import logverify
    seen = []
    real = logverify.check_entry

    def counting(entry, walk, key):
        seen.append(entry.get("seq"))
        return real(entry, walk, key)

    monkeypatch.setattr(logverify, "check_entry", counting)
    return seen


@pytest.fixture
def cp5(tmp_path, monkeypatch):
    """log5, with a checkpoint kept from the first entry on (as a long log keeps one)."""
    from freezeasguard.engine.service import logcheckpoint
    monkeypatch.setattr(logcheckpoint, "CHECKPOINT_FROM", 1)
    path = tmp_path / "jobs.jsonl"
    for i in range(5):
        append_record(path, {"job_id": f"j{i}", "n": i}, KEY)
    return path


def test_a_short_log_keeps_no_checkpoint(log5):
    from freezeasguard.engine.service.logcheckpoint import checkpoint_path
    assert not checkpoint_path(log5).exists()


def test_the_checkpoint_spares_verifying_the_prefix_again(cp5, monkeypatch):
    from freezeasguard.engine.service.logcheckpoint import checkpoint_path
    log5 = cp5
    assert checkpoint_path(log5).is_file()
    seen = _checked(monkeypatch)
    append_record(log5, {"job_id": "next"}, KEY)
    assert seen == []  # the five entries the last append verified are vouched for by its checkpoint
    assert [e["record"]["job_id"] for e in verified_entries(log5, KEY)][-1] == "next"


@pytest.mark.parametrize("how", ["forged", "edited-prefix", "old-checkpoint"])
def test_the_checkpoint_never_vouches_for_bytes_the_service_did_not_verify(cp5, monkeypatch, how):
    from freezeasguard.engine.service.logcheckpoint import checkpoint_path
    log5 = cp5
    cp = checkpoint_path(log5)
    old = cp.read_bytes()
    lines = _lines(log5)
    if how == "forged":
        bad = 2
    elif how == "old-checkpoint":  # an earlier, genuine checkpoint put back: only its prefix is skipped
        append_record(log5, {"job_id": "j5"}, KEY)
        lines = _lines(log5)
        bad = 6
    else:
        bad = 2
    entry = json.loads(lines[bad - 1])
    entry["record"]["n"] = 99
    lines[bad - 1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log5.write_bytes(b"".join(lines))
    if how == "old-checkpoint":
        cp.write_bytes(old)
    if how == "forged":  # a checkpoint vouching for the edited bytes, with the old signature
        body = json.loads(old)
        body["prefix_sha256"] = hashlib.sha256(log5.read_bytes()).hexdigest()
        body["end"] = log5.stat().st_size
        cp.write_text(json.dumps(body))
    with pytest.raises(JobLogError, match=rf"line {bad} \(seq {bad - 1}\) is the first bad record"):
        append_record(log5, {"job_id": "next"}, KEY)
    with pytest.raises(JobLogError, match=rf"line {bad} \(seq {bad - 1}\)"):
        verified_entries(log5, KEY)
