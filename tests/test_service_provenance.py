"""A delta merges only as its job made it: byte-identical to the output a signed, completed record
of the service's log holds, with the LoRA scale from that record, onto the pinned base only.

The red team's deltas, each well-formed and each refused: a LoRA delta with ``lora_alpha`` edited
4 -> 1000 (#3), a full delta rescaled to ``W0 + k (W1 - W0)`` (#4), two full jobs' deltas summed
and two adapters concatenated into one of twice the rank (#5), and a genuine delta merged onto a
model another delta was already merged into.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from test_service_run import LORA_TARGETS, publish

from freezeasguard.engine.errors import MergeError
from freezeasguard.engine.io import file_sha256, save_safetensors_atomic
from freezeasguard.engine.service.delta import load_delta, merge_delta
from freezeasguard.engine.service.joblog import append_record
from freezeasguard.engine.service.logentry import entry_hash
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.provenance import merge_signed_delta, read_signed_delta
from freezeasguard.engine.service.run import DELTA_FILE, run_job
from freezeasguard.engine.service.signing import load_key


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """One log holding a LoRA job (rank 2, alpha 2) and two full jobs, each one step."""
    pub = publish(tmp_path_factory.mktemp("publisher"), n_images=4)
    root = tmp_path_factory.mktemp("jobs")
    log = root / "jobs.jsonl"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs = {}
        for name, kw in (("lora", {"method": "lora", "lora": {"rank": 2, "alpha": 2.0, "targets": LORA_TARGETS}}),
                         ("full1", {}), ("full2", {"seed": 1})):
            seed = kw.pop("seed", 0)
            spec = pub.spec(root / f"{name}.yaml", train={"steps": 1, "seed": seed}, **kw)
            plan = plan_job(spec, pub.policy_path, manifest=pub.manifest_path, base=pub.base, out=root / name,
                            log_path=log)
            run_job(plan)
            outs[name] = root / name / DELTA_FILE
    finally:
        torch.set_num_threads(n)
    return SimpleNamespace(pub=pub, root=root, log=log, outs=outs,
                           key=load_key(pub.root / "keys" / "service.key"))


def _merge(jobs, path, base=None, **kw):
    return merge_signed_delta(jobs.pub.base_state if base is None else base, path, jobs.pub.manifest,
                              log=jobs.log, key=jobs.key, **kw)


def _refused(jobs, path, base=None, **kw) -> list[str]:
    with pytest.raises(MergeError) as err:
        _merge(jobs, path, base, **kw)
    return err.value.problems


def _no_record(problems):
    return len(problems) == 1 and "is not the output of any job the signed log records as completed" in problems[0]


def _rewrite(src, dst, tensors=None, **meta):
    """``src``'s delta with its tensors and/or metadata replaced: a well-formed delta file."""
    delta, m = load_delta(src)
    save_safetensors_atomic(tensors if tensors is not None else delta, dst, metadata={**m, **meta})
    return dst


def test_genuine_deltas_merge_as_their_jobs_made_them(jobs, one_thread):
    for name in ("lora", "full1", "full2"):
        delta, meta = load_delta(jobs.outs[name])
        want = merge_delta(jobs.pub.base_state, delta, jobs.pub.manifest, meta)
        got = _merge(jobs, jobs.outs[name])
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert any(not torch.equal(got[n], jobs.pub.base_state[n]) for n in got)
    # The scale the merge takes is all in the signed record: method, rank, alpha, steps, lr, manifest.
    rec = read_signed_delta(jobs.outs["lora"], jobs.log, jobs.key).record
    assert (rec["method"]["name"], rec["method"]["rank"], rec["method"]["alpha"]) == ("lora", 2, 2.0)
    assert rec["train"]["steps"] == 1 and rec["spec"]["train"]["lr"] == rec["config"]["train"]["lr"]
    assert rec["manifest"]["digest"] == jobs.pub.manifest.digest()


def test_edited_lora_alpha_is_refused(jobs, tmp_path):  # red team #3
    edited = _rewrite(jobs.outs["lora"], tmp_path / "alpha.safetensors", lora_alpha="1000.0")
    delta, meta = load_delta(edited)
    merge_delta(jobs.pub.base_state, delta, jobs.pub.manifest, meta)  # the unsigned checks alone let it by
    assert _no_record(_refused(jobs, edited))


def test_scaled_full_delta_is_refused(jobs, tmp_path):  # red team #4
    base = jobs.pub.base_state
    delta, _ = load_delta(jobs.outs["full1"])
    for k in (10, 300, 100):
        scaled = {n: base[n] + k * (t - base[n]) for n, t in delta.items()}
        assert _no_record(_refused(jobs, _rewrite(jobs.outs["full1"], tmp_path / f"k{k}.safetensors", scaled)))


def test_summed_full_deltas_and_concatenated_adapters_are_refused(jobs, tmp_path):  # red team #5
    base = jobs.pub.base_state
    d1, _ = load_delta(jobs.outs["full1"])
    d2, _ = load_delta(jobs.outs["full2"])
    summed = {n: d1[n] + d2[n] - base[n] for n in d1}
    assert _no_record(_refused(jobs, _rewrite(jobs.outs["full1"], tmp_path / "sum.safetensors", summed)))
    lora, _ = load_delta(jobs.outs["lora"])
    cat = {n: torch.cat([t, t], dim=0 if ".lora_A." in n else 1) for n, t in lora.items()}
    assert _no_record(_refused(jobs, _rewrite(jobs.outs["lora"], tmp_path / "cat.safetensors", cat,
                                              lora_rank="4", lora_alpha="4.0")))


def test_a_delta_merges_onto_the_pinned_base_only(jobs):
    merged = _merge(jobs, jobs.outs["full1"])
    problems = _refused(jobs, jobs.outs["full2"], base=merged)  # stacking a second job onto the first
    assert any("is not the pinned base" in p for p in problems)


def test_a_delta_whose_job_later_failed_is_refused(jobs, tmp_path):
    log = tmp_path / "jobs.jsonl"
    log.write_bytes(jobs.log.read_bytes())
    rec = read_signed_delta(jobs.outs["full1"], log, jobs.key).record
    append_record(log, {**rec, "status": "failed", "output": None, "error": "JobError: x"}, jobs.key)
    with pytest.raises(MergeError) as err:
        merge_signed_delta(jobs.pub.base_state, jobs.outs["full1"], jobs.pub.manifest, log=log, key=jobs.key)
    assert _no_record(err.value.problems)


def test_a_forged_record_for_an_edited_delta_is_refused(jobs, tmp_path):
    # The user appends a record of their own for the edited file: not signed by the service key.
    edited = _rewrite(jobs.outs["lora"], tmp_path / "alpha.safetensors", lora_alpha="1000.0")
    log = tmp_path / "jobs.jsonl"
    lines = jobs.log.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    rec = read_signed_delta(jobs.outs["full2"], jobs.log, jobs.key).record
    forged = {**last, "seq": last["seq"] + 1, "prev": last["hash"],
              "record": {**rec, "output": {**rec["output"], "sha256": file_sha256(edited)}}}
    forged["hash"] = entry_hash(forged)  # chained correctly; the signature is the old entry's
    log.write_bytes(b"".join(lines) + json.dumps(forged).encode() + b"\n")
    with pytest.raises(MergeError, match=r"job log: .*line \d+ \(seq \d+\) is the first bad record: the signature"):
        merge_signed_delta(jobs.pub.base_state, edited, jobs.pub.manifest, log=log, key=jobs.key)


def test_a_truncated_delta_file_is_refused(jobs, tmp_path):
    data = jobs.outs["full1"].read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-4])
    assert _no_record(_refused(jobs, tmp_path / "short.safetensors"))
