"""Outputs only with a durable record: claimed output folders, concurrent jobs into one log, and the
service killed (SIGKILL) at every point of the publish protocol."""
import json
import os
import subprocess
import sys

import pytest
from test_service_run import publish

from freezeasguard.engine.errors import JobError, PolicyViolation
from freezeasguard.engine.service import run as run_mod
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.joblog import read_entries
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.publish import FAILPOINT_ENV, claim_path
from freezeasguard.engine.service.run import DELTA_FILE, RECORD_FILE, run_job, submit
from freezeasguard.engine.service.signing import load_key


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    return publish(tmp_path_factory.mktemp("publisher"), n_images=4)


def _statuses(log):
    return [(e["record"]["job_id"], e["record"]["status"]) for _, e in read_entries(log)]


def _audit(pub, log):
    return audit_jobs(log, outputs=True, key=load_key(pub.root / "keys" / "service.key"),
                      manifest_key_id=pub.manifest.signature["key_id"])


def _consistent(pub, where, log):
    """Every published output has its completion record and every completion record its output."""
    report = _audit(pub, log)
    assert report.ok, report.summary()
    last = {}
    for job, status in _statuses(log):
        last[job] = status
    completed = {json.loads((d / RECORD_FILE).read_text())["job_id"]
                 for d in where.iterdir() if d.is_dir() and (d / DELTA_FILE).exists() and not d.name.startswith(".")}
    assert completed == {j for j, s in last.items() if s == "completed"}
    assert not [p for p in where.iterdir() if p.name.startswith(".") and ".stage-" in p.name]
    return report


def _plan(pub, where, name, out, **train):
    spec = pub.spec(where / f"{name}.yaml", train={"steps": 1, **train})
    return plan_job(spec, pub.policy_path, manifest=pub.manifest_path, base=pub.base, out=out,
                    log_path=where / "jobs.jsonl")


def test_two_jobs_into_one_output_folder(pub, tmp_path):
    a, b = _plan(pub, tmp_path, "a", tmp_path / "out"), _plan(pub, tmp_path, "b", tmp_path / "out", seed=1)
    run_job(a)
    with pytest.raises(JobError, match="already exists; a job never replaces results"):
        run_job(b)
    assert json.loads((tmp_path / "out" / RECORD_FILE).read_text())["job_id"] == a.job_id  # not replaced
    # An empty folder there (a plain rename would replace it) is not replaced either.
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyViolation, match="already exists"):
        _plan(pub, tmp_path, "c", tmp_path / "empty")
    c = _plan(pub, tmp_path, "c", tmp_path / "later")
    (tmp_path / "later").mkdir()  # appears after review
    with pytest.raises(JobError, match="already exists"):
        run_job(c)
    assert list((tmp_path / "later").iterdir()) == []
    _consistent(pub, tmp_path, tmp_path / "jobs.jsonl")


def test_a_claimed_output_folder_refuses_a_second_job(pub, tmp_path):
    plan = _plan(pub, tmp_path, "a", tmp_path / "out")
    claim_path(tmp_path / "out").write_text("{}")  # another job holds it
    with pytest.raises(JobError, match="is claimed by another job"):
        run_job(plan)
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()


def test_a_log_failure_after_training_publishes_nothing(pub, tmp_path, monkeypatch):
    plan = _plan(pub, tmp_path, "a", tmp_path / "out")
    real = run_mod.append_record

    def failing(path, record, key):
        if record["status"] == "completed":
            raise OSError("disk full")
        return real(path, record, key)

    monkeypatch.setattr(run_mod, "append_record", failing)
    with pytest.raises(OSError, match="disk full"):
        run_job(plan)
    assert not (tmp_path / "out").exists() and not claim_path(tmp_path / "out").exists()
    assert _statuses(tmp_path / "jobs.jsonl") == [(plan.job_id, "started"), (plan.job_id, "failed")]
    _consistent(pub, tmp_path, tmp_path / "jobs.jsonl")


def test_non_finite_values_in_a_record_are_encoded_not_fatal(pub, tmp_path, monkeypatch):
    plan = _plan(pub, tmp_path, "a", tmp_path / "out")
    fit = run_mod.Trainer.fit

    def nan_history(self, *a, **k):
        history = fit(self, *a, **k)
        for h in history:
            h.loss = float("nan")  # what the log could not encode before
        return history

    monkeypatch.setattr(run_mod.Trainer, "fit", nan_history)
    result = run_job(plan)
    assert result.record["train"]["losses"] == ["nan"]
    assert json.loads((tmp_path / "out" / RECORD_FILE).read_text()) == result.record
    _consistent(pub, tmp_path, tmp_path / "jobs.jsonl")


def _cli(pub, where, name, out, env=None, steps=1, seed=0):
    spec = pub.spec(where / f"{name}.yaml", train={"steps": steps, "seed": seed})
    cmd = [sys.executable, "-m", "freezeasguard.engine.cli", "job", "submit", str(spec), "--policy",
           str(pub.policy_path), "--manifest", str(pub.manifest_path), "--base", str(pub.base), "--out", str(out),
           "--log", str(where / "jobs.jsonl")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow  # six CLI processes at once
def test_concurrent_jobs_into_one_log_and_colliding_folders(pub, tmp_path):
    # Four jobs at once: two into distinct folders, two pairs colliding on one folder each.
    outs = ["o1", "o2", "shared", "shared", "x", "x"]
    procs = [_cli(pub, tmp_path, f"job{i}", tmp_path / o, seed=i) for i, o in enumerate(outs)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    ok = [rc for rc, _ in results].count(0)
    assert ok == 4, results  # one winner per folder
    losers = [err for rc, err in results if rc != 0]
    assert all("claimed by another job" in e or "already exists" in e for e in losers), losers
    report = _consistent(pub, tmp_path, tmp_path / "jobs.jsonl")
    assert report.signatures_checked and not report.interrupted
    assert sum(1 for _, s in _statuses(tmp_path / "jobs.jsonl") if s == "completed") == 4


# Each point kills a real CLI process (5-10 s of imports each): two run by default, all four in the
# slow set.
@pytest.mark.parametrize("point, published", [pytest.param("after-intent", False, marks=pytest.mark.slow),
                                              ("training", False),
                                              pytest.param("before-record", False, marks=pytest.mark.slow),
                                              ("after-record", True)])
def test_killed_at_every_point_leaves_a_record_for_every_output(pub, tmp_path, point, published):
    proc = _cli(pub, tmp_path, "job", tmp_path / "out", env={FAILPOINT_ENV: point})
    assert proc.wait(timeout=600) == -9  # SIGKILL
    log = tmp_path / "jobs.jsonl"
    statuses = [s for _, s in _statuses(log)]
    assert statuses[0] == "started"
    assert not (tmp_path / "out").exists()  # never published by the killed process itself
    assert statuses == (["started", "completed"] if point == "after-record" else ["started"])
    report = _audit(pub, log)
    if point == "after-record":  # recorded, not yet published: audit says so until recovery publishes it
        assert not report.ok and "is missing" in report.reason
    else:
        assert report.ok and len(report.interrupted) == 1

    # The next job on the log recovers it first: the interrupted job is failed (its stage deleted)
    # or, killed after its durable completion record, published from its stage.
    rerun = _cli(pub, tmp_path, "again", tmp_path / "out2", seed=1)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert (tmp_path / "out").exists() == published
    if published:
        assert (tmp_path / "out" / DELTA_FILE).is_file()
    final = _consistent(pub, tmp_path, log)
    assert not final.interrupted and not claim_path(tmp_path / "out").exists()
    if not published:  # the interrupted job's folder name is free again
        submit(pub.spec(tmp_path / "third.yaml", train={"steps": 1}), pub.policy_path, manifest=pub.manifest_path,
               base=pub.base, out=tmp_path / "out", log_path=log)
        _consistent(pub, tmp_path, log)


def test_resubmitting_to_a_killed_jobs_folder_recovers_its_claim_first(pub, tmp_path):
    proc = _cli(pub, tmp_path, "job", tmp_path / "out", env={FAILPOINT_ENV: "training"})
    assert proc.wait(timeout=600) == -9
    assert claim_path(tmp_path / "out").exists()  # the killed job's claim, no longer held
    # The same --out again, with no other job run in between: recovered, then claimed anew.
    again = _cli(pub, tmp_path, "again", tmp_path / "out", seed=1)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert (tmp_path / "out" / DELTA_FILE).is_file()
    statuses = [s for _, s in _statuses(tmp_path / "jobs.jsonl")]
    assert statuses == ["started", "failed", "started", "completed"]
    _consistent(pub, tmp_path, tmp_path / "jobs.jsonl")


def test_a_live_claim_is_still_refused_at_planning(pub, tmp_path):
    from freezeasguard.engine.service.publish import claim_output
    claim = claim_output(tmp_path / "out", "live-job")  # held by this (live) process
    try:
        with pytest.raises(PolicyViolation, match="is claimed by another job"):
            _plan(pub, tmp_path, "a", tmp_path / "out")
    finally:
        claim.release()


def test_full_disk_is_one_line_and_a_failed_record(pub, tmp_path, monkeypatch, capsys):
    """ENOSPC while the delta is written: the job is logged failed, nothing is published, and the
    command line says one line (exit 2), not a traceback."""
    import errno

    from freezeasguard.engine.cli.main import main

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / DELTA_FILE))

    monkeypatch.setattr(run_mod, "save_safetensors_atomic", full)
    spec = pub.spec(tmp_path / "job.yaml", train={"steps": 1})
    log = tmp_path / "jobs.jsonl"
    capsys.readouterr()
    rc = main(["job", "submit", str(spec), "--policy", str(pub.policy_path), "--manifest", str(pub.manifest_path),
               "--base", str(pub.base), "--out", str(tmp_path / "out"), "--log", str(log)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("freezeasguard")]
    assert rc == 2, err
    assert lines == [f"freezeasguard job submit: error: [Errno {errno.ENOSPC}] No space left on device: "
                     f"{str(tmp_path / 'out' / DELTA_FILE)!r}"]
    assert "Traceback" not in err
    assert [s for _, s in _statuses(log)] == ["started", "failed"]
    assert "No space left on device" in list(read_entries(log))[-1][1]["record"]["error"]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".stage-" in p.name or p.name.startswith(".")]
