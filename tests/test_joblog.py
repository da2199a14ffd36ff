"""The signed, hash-chained job log: appends, audit of every kind of edit, what audit can and
cannot detect, record encoding, job records, the `audit` command, concurrent appenders."""
import hashlib
import json
import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import pytest

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.io import file_sha256
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.audit import RECORD_SCHEMA, audit_jobs, outputs_problems, record_problems
from freezeasguard.engine.service.joblog import (
    GENESIS,
    SCHEMA,
    SCHEMA_V1,
    append_record,
    audit,
    encodable,
    entry_hash,
    read_entries,
    sign_entry_hash,
    tail_problem,
)

KEY = signing.HmacKey(bytes(range(32)))  # the service's log key in these tests
OTHER = signing.HmacKey(bytes(range(1, 33)))


def _write_lines(path, entries):
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))


def _entries(path):
    return [e for _, e in read_entries(path)]


def _rechain(entries, key=None, start=0):
    """Recompute seq/prev/hash (and, with ``key``, the signature) of every entry from ``start`` on:
    what someone who can write the file can do."""
    prev = entries[start - 1]["hash"] if start else GENESIS
    for i, e in enumerate(entries[start:], start=start):
        e["seq"], e["prev"] = i, prev
        e["hash"] = entry_hash(e)
        if key is not None:
            e["sig"] = sign_entry_hash(e["hash"], key)
        prev = e["hash"]
    return entries


@pytest.fixture
def log3(tmp_path):
    path = tmp_path / "jobs.jsonl"
    for i in range(3):
        append_record(path, {"job_id": f"j{i}", "loss": 0.5 + i}, KEY)
    return path


# ------------------------------------------------------------------------------- chain + signatures
def test_append_links_and_signs_records(log3):
    entries = _entries(log3)
    assert [e["schema"] for e in entries] == [SCHEMA] * 3 and SCHEMA == "freezeasguard.joblog/2"
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert entries[0]["prev"] == GENESIS
    assert [e["prev"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    for e in entries:
        assert set(e["sig"]) == {"alg", "key_id", "value"}
        assert e["sig"]["alg"] == "hmac-sha256" and e["sig"]["key_id"] == KEY.key_id
        assert KEY.verify(b"freezeasguard.joblog-entry/1\x00" + e["hash"].encode(), bytes.fromhex(e["sig"]["value"]))
    report = audit(log3, key=KEY)
    assert report.ok and report.records == 3 and report.head == entries[-1]["hash"]
    assert report.signatures_checked and report.key_id == KEY.key_id
    assert "chain intact, signatures verified (key " + KEY.key_id + ")" in report.summary()
    unchecked = audit(log3)
    assert unchecked.ok and not unchecked.signatures_checked and unchecked.key_id == KEY.key_id  # claimed only
    assert "signatures NOT checked" in unchecked.summary()


def test_ed25519_log_key_signs_and_its_public_half_verifies(tmp_path):
    key = signing.new_ed25519_key()
    path = tmp_path / "jobs.jsonl"
    for i in range(2):
        append_record(path, {"i": i}, key)
    public = signing.Ed25519Key(public=key.public)
    assert audit(path, key=public).ok and audit(path, key=key).ok
    assert _entries(path)[0]["sig"]["alg"] == "ed25519"
    assert "HMAC" not in audit(path, key=public).limits()
    assert "signed by key" in audit(path, key=signing.Ed25519Key(public=signing.new_ed25519_key().public)).reason


def test_edited_record_is_named(log3):
    entries = _entries(log3)
    entries[1]["record"]["loss"] = 0.0
    _write_lines(log3, entries)
    report = audit(log3, key=KEY)
    assert not report.ok and report.bad_line == 2 and report.bad_seq == 1 and report.records == 1
    assert "was edited" in report.reason and "line 2 (seq 1) is the first bad record" in report.summary()


def test_edit_with_recomputed_hash_breaks_the_next_link(log3):
    entries = _entries(log3)
    entries[1]["record"]["loss"] = 0.0
    entries[1]["hash"] = entry_hash(entries[1])
    _write_lines(log3, entries)
    report = audit(log3)
    assert report.bad_line == 3 and "prev does not match" in report.reason


def test_deleted_and_reordered_records(log3):
    entries = _entries(log3)
    _write_lines(log3, [entries[0], entries[2]])
    assert audit(log3, key=KEY).bad_line == 2 and "seq 2, expected 1" in audit(log3, key=KEY).reason
    _write_lines(log3, [entries[1], entries[0], entries[2]])
    assert audit(log3, key=KEY).bad_line == 1


def test_whole_chain_rewritten_consistently_without_the_key_is_detected(log3):
    entries = _entries(log3)
    entries[0]["record"]["loss"] = 0.0
    # 1. the attacker re-signs everything with a key of their own
    _write_lines(log3, _rechain(entries, OTHER))
    assert audit(log3).ok  # the chain alone is consistent: without the key this cannot be told
    assert "NOT checked" in audit(log3).summary()
    report = audit(log3, key=KEY)
    assert not report.ok and report.bad_line == 1 and report.bad_seq == 0 and report.records == 0
    assert report.reason == f"signed by key {OTHER.key_id!r}, not by the service key {KEY.key_id!r}"
    # 2. ... or keeps claiming the service key id, with signatures they cannot make
    for e in entries:
        e["sig"] = {**e["sig"], "key_id": KEY.key_id, "value": "00" * 32}
    _write_lines(log3, entries)
    report = audit(log3, key=KEY)
    assert report.bad_line == 1 and report.reason == ("the signature does not verify with the service key "
                                                      "(the entry was forged or rewritten)")


def test_inserted_record_is_detected(log3):
    good = _entries(log3)
    forged = {**good[1], "record": {"job_id": "inserted"}}
    entries = _rechain([good[0], forged, *[dict(e) for e in good[1:]]], OTHER, start=1)
    _write_lines(log3, entries)
    report = audit(log3, key=KEY)
    assert report.bad_line == 2 and report.records == 1 and "not by the service key" in report.reason


def test_manifest_signature_cannot_stand_in_for_an_entry_signature(log3):
    # The same key signing the same 64 hex digits as a *manifest* digest gives another value.
    entries = _entries(log3)
    entries[2]["sig"]["value"] = signing.sign_digest(entries[2]["hash"], KEY)["value"]
    _write_lines(log3, entries)
    assert "does not verify" in audit(log3, key=KEY).reason


def test_entry_signed_by_another_key(log3):
    entries = _entries(log3)
    entries[2]["sig"] = sign_entry_hash(entries[2]["hash"], OTHER)  # correctly chained, other signer
    _write_lines(log3, entries)
    report = audit(log3, key=KEY)
    assert report.bad_line == 3 and report.records == 2 and "not by the service key" in report.reason
    report = audit(log3)  # even unverified, a key id changing mid-log is refused
    assert report.bad_line == 3 and report.reason == (
        f"signed by key {OTHER.key_id!r}, but the records before it by {KEY.key_id!r} "
        "(the service never changes keys within a log)")
    before = log3.read_bytes()
    with pytest.raises(JobLogError, match=r"line 3 \(seq 2\) is the first bad record: signed by key"):
        append_record(log3, {"job_id": "x"}, KEY)
    assert log3.read_bytes() == before


def test_key_change_is_refused_on_append(log3):
    before = log3.read_bytes()
    assert tail_problem(log3, key=KEY) is None and "signed by key" in tail_problem(log3, key=OTHER)
    with pytest.raises(JobLogError, match=f"signed by key '{KEY.key_id}', not by the service key "
                                          f"'{OTHER.key_id}'.*start a new log"):
        append_record(log3, {"job_id": "x"}, OTHER)
    assert log3.read_bytes() == before
    # A last entry that claims the service key id but does not verify is not extended either.
    entries = _entries(log3)
    entries[2]["sig"]["value"] = "00" * 32
    _write_lines(log3, entries)
    with pytest.raises(JobLogError, match="signature does not verify"):
        append_record(log3, {"job_id": "x"}, KEY)


def test_schema_1_entry_is_unsigned(tmp_path, log3):
    old = {"schema": SCHEMA_V1, "seq": 0, "time": "2024-01-01T00:00:00+00:00", "prev": GENESIS,
           "record": {"job_id": "j0"}}
    old["hash"] = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path = tmp_path / "old.jsonl"
    _write_lines(path, [old])
    for key in (None, KEY):
        report = audit(path, key=key)
        assert report.bad_line == 1 and report.reason == "unsigned entry (schema 1)"
    assert "unsigned entry (schema 1)" in tail_problem(path)
    with pytest.raises(JobLogError, match=r"unsigned entry \(schema 1\).*start a new log"):
        append_record(path, {"job_id": "x"}, KEY)
    # A downgraded entry in the middle of a signed log is refused the same way.
    entries = _entries(log3)
    del entries[1]["sig"]
    entries[1]["schema"] = SCHEMA_V1
    _rechain(entries, KEY, start=1)
    del entries[1]["sig"]
    _write_lines(log3, entries)
    report = audit(log3, key=KEY)
    assert report.bad_line == 2 and report.reason == "unsigned entry (schema 1)"


def test_rewritten_tail_is_caught_by_the_key_or_the_anchor(log3):
    head = audit(log3).head
    entries = _entries(log3)
    entries[2]["record"]["loss"] = 0.0
    entries[2]["hash"] = entry_hash(entries[2])
    _write_lines(log3, entries)
    assert audit(log3).ok  # an unanchored, unverified chain cannot tell a consistently rewritten last entry
    assert "does not verify" in audit(log3, key=KEY).reason
    report = audit(log3, expect_head=head)
    assert not report.ok and "not the expected" in report.reason


def test_truncation_needs_the_anchor(log3):
    head = audit(log3).head
    entries = _entries(log3)
    _write_lines(log3, entries[:2])
    assert audit(log3, key=KEY).ok  # the documented limit: deleting the newest records is not seen ...
    report = audit(log3, key=KEY, expect_head=head)  # ... unless a head kept elsewhere is given
    assert not report.ok and report.bad_line == 2 and "truncated" in report.reason


def test_audit_limits_text(log3):
    plain = audit(log3)
    assert plain.limits().startswith("Signatures were NOT checked (no service key given)")
    assert "can rewrite all of it consistently" in plain.limits() and plain.limits() in plain.summary()
    signed = audit(log3, key=KEY)
    text = signed.limits()
    assert text == (f"Signatures were checked with the service key {KEY.key_id}: audit detects any edit, insertion, "
                    "deletion or reordering of records by anyone who does not hold that key. (An HMAC secret signs "
                    "as well as verifies: everyone who holds it, this auditor included, holds the service key.) "
                    "It cannot detect the "
                    "newest records being deleted from the end of the log (truncation) unless a head hash kept "
                    "elsewhere is given as the expected head, nor a rewrite by someone who holds the service key.")
    assert text in signed.summary()
    anchored = audit(log3, key=KEY, expect_head=signed.head)
    assert anchored.ok and anchored.anchored and "the newest records being deleted from the end" in anchored.limits()
    assert "is detected too" in anchored.limits()
    assert "as far as that copy of the head can be trusted" in audit(log3, expect_head=signed.head).limits()
    bad = audit(log3, key=OTHER)
    assert not bad.ok and bad.limits() in bad.summary()


def test_torn_last_line_is_audited_then_repaired_by_the_next_append(log3):
    torn = b'{"schema": "freezeasguard.joblog/2", "se'
    with open(log3, "ab") as f:
        f.write(torn)
    assert audit(log3).bad_line == 4 and "incomplete" in audit(log3).reason
    assert tail_problem(log3, KEY) is None  # the append repairs it (tests/test_joblog_trust.py)
    append_record(log3, {"job_id": "x"}, KEY)
    assert torn not in log3.read_bytes() and audit(log3, key=KEY).ok


def test_damaged_last_entry_blocks_appends(log3):
    entries = _entries(log3)
    entries[2]["record"]["loss"] = 9.0
    _write_lines(log3, entries)
    assert "line 3 (seq 2) is the first bad record: hash does not match" in tail_problem(log3)
    with pytest.raises(JobLogError, match="hash does not match"):
        append_record(log3, {"job_id": "x"}, KEY)


def test_malformed_lines_are_named_not_crashes(log3):
    lines = log3.read_bytes().splitlines(keepends=True)
    nan = lines[1].replace(b'"loss":1.5', b'"loss":NaN')
    log3.write_bytes(lines[0] + nan + lines[2])
    assert audit(log3, key=KEY).bad_line == 2 and "non-finite" in audit(log3, key=KEY).reason
    dup = lines[1].replace(b'"loss":1.5', b'"loss":1.5,"loss":0.0')
    log3.write_bytes(lines[0] + dup + lines[2])
    assert "duplicate key 'loss'" in audit(log3, key=KEY).reason
    log3.write_bytes(lines[0] + lines[1].replace(b'"sig":{', b'"sig":{"x":1,') + lines[2])
    assert "sig must be an object" in audit(log3, key=KEY).reason


def test_record_checker_and_missing_log(log3, tmp_path):
    report = audit(log3, check_record=lambda r: ["bad loss"] if r["loss"] > 2 else [], key=KEY)
    assert report.bad_line == 3 and report.reason == "bad loss"
    with pytest.raises(JobLogError, match="does not exist"):
        audit(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------------- keys and records
def test_append_needs_a_key_that_can_sign(tmp_path):
    path = tmp_path / "sub" / "jobs.jsonl"
    public_only = signing.Ed25519Key(public=signing.new_ed25519_key().public)
    with pytest.raises(JobLogError, match=f"Ed25519 key {public_only.key_id} holds only the public half"):
        append_record(path, {"job_id": "x"}, public_only)
    with pytest.raises(JobLogError, match="no signing key given"):
        append_record(path, {"job_id": "x"}, None)
    with pytest.raises(JobLogError, match="not a str"):
        append_record(path, {"job_id": "x"}, "secret")
    with pytest.raises(TypeError):
        append_record(path, {"job_id": "x"})  # the key is a required argument
    assert not path.exists() and not path.parent.exists()


def test_non_finite_floats_encode(tmp_path):
    nan, inf = float("nan"), float("inf")
    record = {"loss": nan, "train": {"losses": [0.5, inf, -inf, (nan, 1)]}, "ok": True, "n": None}
    want = {"loss": "nan", "train": {"losses": [0.5, "inf", "-inf", ["nan", 1]]}, "ok": True, "n": None}
    assert encodable(record) == want and encodable(want) == want
    path = tmp_path / "jobs.jsonl"
    entry = append_record(path, record, KEY)
    assert entry["record"] == want and _entries(path)[0]["record"] == want
    assert audit(path, key=KEY).ok
    assert record["loss"] != record["loss"]  # the caller's record is not modified


@pytest.mark.parametrize("record, where", [
    ({"output": {"blob": b"\x00"}}, "record.output.blob: bytes is not a JSON value"),
    ({"train": {"losses": [1.0, object()]}}, r"record.train.losses\[1\]: object is not a JSON value"),
    ({"files": {1: "a"}}, r"record.files: key 1 \(int\) is not a string"),
    ({"s": {1, 2}}, "record.s: set is not a JSON value"),
])
def test_non_json_values_are_refused_before_anything_is_written(log3, tmp_path, record, where):
    before = log3.read_bytes()
    with pytest.raises(JobLogError, match=where):
        append_record(log3, record, KEY)
    assert log3.read_bytes() == before
    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(JobLogError, match=where):
        append_record(fresh, record, KEY)
    assert not fresh.exists()


def test_reference_cycle_is_refused(tmp_path):
    record = {"a": []}
    record["a"].append(record)
    with pytest.raises(JobLogError, match=r"record.a\[0\]: a reference cycle"):
        append_record(tmp_path / "jobs.jsonl", record, KEY)
    shared = [1]
    assert encodable({"x": shared, "y": shared}) == {"x": [1], "y": [1]}  # shared, not cyclic: fine


# ---------------------------------------------------------------------------------------- job records
def _job(job_id, status, manifest_kid="pub1", **extra):
    record = {"schema": RECORD_SCHEMA, "job_id": job_id, "status": status, "spec": {}, "config": {},
              "dataset": {}, "manifest": {"digest": "d", "signature": {"alg": "ed25519", "key_id": manifest_kid}},
              "base": {"fingerprint": "f"}}
    if status != "started":
        record.update(verify={"ok": status == "completed"}, output=None)
    record.update(extra)
    return record


def _completed(job_id, out, **kw):
    return _job(job_id, "completed", output={"path": str(out), "sha256": file_sha256(out)}, **kw)


def test_job_record_statuses(tmp_path):
    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"delta")
    assert record_problems(_job("a", "started")) == []
    assert record_problems(_job("a", "failed")) == []
    assert record_problems(_completed("a", out), outputs=True) == []
    assert record_problems(_job("a", "paused")) == ["job a: unknown status 'paused'"]
    failed = _job("a", "failed")
    del failed["verify"]
    assert record_problems(failed) == ["job a: failed record lacks ['verify']"]
    started = _job("a", "started")
    del started["base"]
    assert record_problems(started) == ["job record lacks ['base']"]
    done = _completed("a", out)
    out.write_bytes(b"other")
    assert "does not match its recorded sha256" in record_problems(done, outputs=True)[0]
    out.unlink()
    assert "is missing" in record_problems(done, outputs=True)[0] and record_problems(done) == []


def test_manifest_key_id_mismatch(tmp_path):
    path = tmp_path / "jobs.jsonl"
    append_record(path, _job("a", "started"), KEY)
    append_record(path, _job("a", "failed"), KEY)
    append_record(path, _job("b", "started", manifest_kid="intruder"), KEY)
    assert audit_jobs(path, key=KEY).ok  # without an expected id, any publisher key id passes
    report = audit_jobs(path, key=KEY, manifest_key_id="pub1")
    assert not report.ok and report.bad_line == 3 and report.records == 2
    assert report.reason == "job b: ran under a manifest signed by key 'intruder', not by the publisher key 'pub1'"
    unsigned = _job("c", "started")
    unsigned["manifest"]["signature"] = {"alg": None, "key_id": None}
    assert record_problems(unsigned, manifest_key_id="pub1") == [
        "job c: the record does not name the key that signed its manifest (expected publisher key 'pub1')"]


def test_interrupted_starts_are_listed(tmp_path):
    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"delta")
    path = tmp_path / "jobs.jsonl"
    for record in (_job("j1", "started"), _completed("j1", out), _job("j2", "started"), _job("j3", "started"),
                   _job("j3", "failed"), _job("j4", "started")):
        append_record(path, record, KEY)
    report = audit_jobs(path, outputs=True, key=KEY, manifest_key_id="pub1")
    assert report.ok and report.records == 6 and report.interrupted == ["j2", "j4"]
    assert "2 job(s) started and never finished (interrupted, not a failure of the log): j2, j4" in report.summary()
    check = outputs_problems(path)
    assert check.problems == [] and check.interrupted == ["j2", "j4"]
    out.write_bytes(b"swapped")
    problems, interrupted = outputs_problems(path)
    assert problems == [f"job j1: output {str(out)!r} does not match its recorded sha256"]
    assert interrupted == ["j2", "j4"]
    report = audit_jobs(path, outputs=True, key=KEY)
    assert not report.ok and report.bad_line == 2 and report.bad_seq == 1 and report.records == 1
    assert report.head == _entries(path)[0]["hash"] and "does not match" in report.reason
    assert audit_jobs(path, key=KEY).ok  # without outputs the files are not read


def test_output_of_a_completed_job_that_later_failed_is_not_required(tmp_path):
    # The service records "completed" before publishing; if publishing fails (or a recovery finds
    # the staged output lost) a "failed" record follows, and the output never existed.
    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"delta")
    path = tmp_path / "jobs.jsonl"
    for record in (_job("j1", "started"), _completed("j1", out), _job("j1", "failed")):
        append_record(path, record, KEY)
    out.unlink()
    assert audit_jobs(path, outputs=True, key=KEY).ok
    assert outputs_problems(path) == ([], [])


# ------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    from freezeasguard.engine.cli.main import main

    rc = main(["audit", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_audit_command(tmp_path, capsys, monkeypatch):
    from freezeasguard.engine.service.policy import Policy

    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"delta")
    log_key, publisher = signing.new_ed25519_key(), signing.new_ed25519_key()
    signing.save_key(log_key, tmp_path / "log.pem", public_path=tmp_path / "log.pub.pem")
    signing.save_key(publisher, tmp_path / "pub.pem", public_path=tmp_path / "pub.pub.pem")
    path = tmp_path / "jobs.jsonl"
    for record in (_job("a", "started", publisher.key_id), _completed("a", out, manifest_kid=publisher.key_id),
                   _job("b", "started", publisher.key_id)):
        append_record(path, record, log_key)

    rc, stdout, _ = _cli(capsys, str(path), "--key", str(tmp_path / "log.pub.pem"), "--outputs")
    assert rc == 0 and "signatures verified" in stdout
    assert "nor a rewrite by someone who holds the service key" in stdout
    assert "never finished" in stdout and ": b" in stdout
    rc, stdout, _ = _cli(capsys, str(path))
    assert rc == 0 and "Signatures were NOT checked" in stdout
    rc, _, stderr = _cli(capsys, str(path), "--key", str(tmp_path / "pub.pub.pem"))
    assert rc == 1 and "not by the service key" in stderr and "Signatures were checked" in stderr

    # The policy's other fields are not audit's business; only where its keys are is read.
    policies = {"policy.yaml": (tmp_path / "log.pem", tmp_path / "pub.pub.pem"),
                "wrong-publisher.yaml": (tmp_path / "log.pem", tmp_path / "log.pub.pem"),
                "no-log-key.yaml": (None, tmp_path / "pub.pub.pem"),
                "no-publisher.yaml": (tmp_path / "log.pem", None)}

    def load(path):
        log_file, key_file = policies[Path(path).name]
        return SimpleNamespace(log_key_file=log_file and str(log_file),
                               signature=SimpleNamespace(algorithm="ed25519", key_file=key_file and str(key_file)))

    monkeypatch.setattr(Policy, "load", staticmethod(load))  # what the command loads, however it imports it
    rc, stdout, _ = _cli(capsys, str(path), "--policy", "policy.yaml")
    assert rc == 0 and f"every job's manifest must be signed by the publisher key {publisher.key_id}" in stdout
    assert f"signatures verified (key {log_key.key_id})" in stdout
    rc, _, stderr = _cli(capsys, str(path), "--policy", "wrong-publisher.yaml")
    assert rc == 1 and f"not by the publisher key {log_key.key_id!r}" in stderr
    rc, _, stderr = _cli(capsys, str(path), "--policy", "no-log-key.yaml")
    assert rc == 2 and "names no log_key_file" in stderr
    rc, stdout, _ = _cli(capsys, str(path), "--policy", "no-publisher.yaml")
    assert rc == 0 and "manifest key ids NOT checked" in stdout

    rc, _, stderr = _cli(capsys, str(path), "--key", str(tmp_path / "missing.pem"))
    assert rc == 2 and "does not exist" in stderr
    rc, _, stderr = _cli(capsys, str(tmp_path / "none.jsonl"))
    assert rc == 2 and "does not exist" in stderr
    with pytest.raises(SystemExit):  # one source of keys at a time
        _cli(capsys, str(path), "--key", "a", "--policy", "b")


# ---------------------------------------------------------------------------------------- concurrency
def _append_many(path: str, worker: int, n: int, go, secret: bytes) -> None:
    import time

    from freezeasguard.engine.service import joblog
    from freezeasguard.engine.service.signing import HmacKey

    key = HmacKey(secret)
    read_log = joblog._read_log

    def slow_read_log(f, path, key):
        # Widen the verify -> write-line window so that, without the lock, two appenders
        # would link to the same previous entry (this test fails with the flock removed).
        walk = read_log(f, path, key)
        time.sleep(0.002)
        return walk

    joblog._read_log = slow_read_log
    go.wait()
    for i in range(n):
        append_record(path, {"worker": worker, "i": i, "pad": "x" * (97 * (i % 5))}, key)


def test_concurrent_appenders_never_corrupt_the_log(tmp_path):
    path = tmp_path / "jobs.jsonl"
    workers, n = 4, 25
    ctx = mp.get_context("spawn")  # fresh interpreters: no state shared with the test process
    go = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(str(path), w, n, go, KEY.secret)) for w in range(workers)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    report = audit(path, key=KEY)
    assert report.ok, report.summary()
    assert report.records == workers * n
    seen = sorted((e["record"]["worker"], e["record"]["i"]) for _, e in read_entries(path))
    assert seen == [(w, i) for w in range(workers) for i in range(n)]
