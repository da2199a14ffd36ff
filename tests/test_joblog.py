"""The hash-chained job log: appends, audit of every kind of edit, concurrent appenders."""
import json
import multiprocessing as mp

import pytest

from freezeasguard.engine.errors import JobLogError
from freezeasguard.engine.service.joblog import GENESIS, append_record, audit, entry_hash, read_entries, tail_problem


def _write_lines(path, entries):
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))


@pytest.fixture
def log3(tmp_path):
    path = tmp_path / "jobs.jsonl"
    for i in range(3):
        append_record(path, {"job_id": f"j{i}", "loss": 0.5 + i})
    return path


def test_append_links_records(log3):
    entries = [e for _, e in read_entries(log3)]
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert entries[0]["prev"] == GENESIS
    assert [e["prev"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    report = audit(log3)
    assert report.ok and report.records == 3 and report.head == entries[-1]["hash"]
    assert "chain intact" in report.summary()


def test_edited_record_is_named(log3):
    entries = [e for _, e in read_entries(log3)]
    entries[1]["record"]["loss"] = 0.0
    _write_lines(log3, entries)
    report = audit(log3)
    assert not report.ok and report.bad_line == 2 and report.bad_seq == 1 and report.records == 1
    assert "was edited" in report.reason and "line 2 (seq 1) is the first bad record" in report.summary()


def test_edit_with_recomputed_hash_breaks_the_next_link(log3):
    entries = [e for _, e in read_entries(log3)]
    entries[1]["record"]["loss"] = 0.0
    entries[1]["hash"] = entry_hash(entries[1])
    _write_lines(log3, entries)
    report = audit(log3)
    assert report.bad_line == 3 and "prev does not match" in report.reason


def test_deleted_and_reordered_records(log3):
    entries = [e for _, e in read_entries(log3)]
    _write_lines(log3, [entries[0], entries[2]])
    assert audit(log3).bad_line == 2 and "seq 2, expected 1" in audit(log3).reason
    _write_lines(log3, [entries[1], entries[0], entries[2]])
    assert audit(log3).bad_line == 1


def test_rewritten_tail_is_caught_by_the_anchor(log3):
    head = audit(log3).head
    entries = [e for _, e in read_entries(log3)]
    entries[2]["record"]["loss"] = 0.0
    entries[2]["hash"] = entry_hash(entries[2])
    _write_lines(log3, entries)
    assert audit(log3).ok  # an unanchored chain cannot tell a consistently rewritten last entry
    report = audit(log3, expect_head=head)
    assert not report.ok and "not the expected" in report.reason


def test_torn_last_line_blocks_appends(log3):
    with open(log3, "ab") as f:
        f.write(b'{"schema": "freezeasguard.joblog/1", "se')
    assert audit(log3).bad_line == 4 and "incomplete" in audit(log3).reason
    assert "incomplete" in tail_problem(log3)
    before = log3.read_bytes()
    with pytest.raises(JobLogError, match="incomplete"):
        append_record(log3, {"job_id": "x"})
    assert log3.read_bytes() == before


def test_damaged_last_entry_blocks_appends(log3):
    entries = [e for _, e in read_entries(log3)]
    entries[2]["record"]["loss"] = 9.0
    _write_lines(log3, entries)
    assert "damaged" in tail_problem(log3)
    with pytest.raises(JobLogError, match="damaged"):
        append_record(log3, {"job_id": "x"})


def test_record_checker_and_missing_log(log3, tmp_path):
    report = audit(log3, check_record=lambda r: ["bad loss"] if r["loss"] > 2 else [])
    assert report.bad_line == 3 and report.reason == "bad loss"
    with pytest.raises(JobLogError, match="does not exist"):
        audit(tmp_path / "none.jsonl")
    with pytest.raises(ValueError):  # NaN has no canonical JSON: refused before touching the log
        append_record(log3, {"loss": float("nan")})
    assert audit(log3).records == 3


def _append_many(path: str, worker: int, n: int, go) -> None:
    import time

    from freezeasguard.engine.service import joblog

    read_tail = joblog._last_line

    def slow_read_tail(f):
        # Widen the read-tail -> write-line window so that, without the lock, two appenders
        # would link to the same previous entry (this test fails with the flock removed).
        line = read_tail(f)
        time.sleep(0.002)
        return line

    joblog._last_line = slow_read_tail
    go.wait()
    for i in range(n):
        append_record(path, {"worker": worker, "i": i, "pad": "x" * (97 * (i % 5))})


def test_concurrent_appenders_never_corrupt_the_log(tmp_path):
    path = tmp_path / "jobs.jsonl"
    workers, n = 4, 25
    ctx = mp.get_context("spawn")  # fresh interpreters: no state shared with the test process
    go = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(str(path), w, n, go)) for w in range(workers)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    report = audit(path)
    assert report.ok, report.summary()
    assert report.records == workers * n
    seen = sorted((e["record"]["worker"], e["record"]["i"]) for _, e in read_entries(path))
    assert seen == [(w, i) for w in range(workers) for i in range(n)]
