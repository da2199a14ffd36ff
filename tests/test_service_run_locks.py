"""Direction locks through the guarded-job service, end to end on the tiny preset: a signed manifest
with a mask and locks is accepted, full and LoRA jobs hold and prove the locks, merged deltas are
checked against them, and a job or a locks file that breaks them is refused.

fp32 tolerances: a trained tensor's locked residual is checked against
``guard.subspace.residual_tolerance`` (fp32 rounding of each projected step, 2 u (steps + 1) (||W0|| +
||D||), u = 2^-24); a LoRA delta ``s B A`` with ``U^T B`` and ``A V`` projected to fp32 rounding has a
relative residual ~1e-7, so 1e-5 leaves a 100x margin while any real leak (>= 1e-3 of the energy,
~3% of the norm) is 3000x above it.
"""
import dataclasses
import json
import math

import pytest
import torch
from test_service_run import LORA_TARGETS, publish
from test_subspace import mixed_lock

from freezeasguard.engine.errors import JobError, ManifestError, MergeError, PolicyViolation
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import residual_tolerance
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.delta import load_delta, lora_delta, merge_delta
from freezeasguard.engine.service.joblog import read_entries
from freezeasguard.engine.service.plan import MANIFEST_FILE, plan_job
from freezeasguard.engine.service.policy import manifest_signature_problems
from freezeasguard.engine.service.run import DELTA_FILE, RECORD_FILE, run_job
from freezeasguard.engine.service.signing import load_key, sign_manifest
from freezeasguard.kernels.project import locked_energy, project_off_ref

STEPS = 2
CONV_TARGET = "up_blocks.1.resnets.0.conv1"  # a 3x3 conv (trainable under test_jobs' mask): A is [r, in, 3, 3]


def _residual(delta, lk):
    d = delta.detach().reshape(delta.shape[0], -1).double()
    return math.sqrt(float(locked_energy(d, *[None if b is None else b.double() for b in lk.bases()])))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded for the whole module (as the conftest's ``one_thread``): the jobs are tiny, and
    two threads on a shared 2-core host run them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    """test_jobs' publisher (tiny base, patterns mask, HMAC key, policy, digits folder), its manifest
    rebuilt with direction locks on every trainable matrix (output side, input side and both) and
    signed again."""
    root = tmp_path_factory.mktemp("publisher")
    pub = publish(root, n_images=4)  # one batch of 4: the smallest dataset a job accepts
    lock = mixed_lock(pub.base_state, skip=frozenset(pub.mask.frozen), seed=0)
    key = load_key(root / "keys" / "publisher.key", "hmac-sha256")
    man = sign_manifest(Manifest.build(pub.base_state, pub.mask, provenance={"method": "patterns"}, lock=lock), key)
    man.save(pub.manifest_path, lock=lock)
    pub = dataclasses.replace(pub, manifest=man)
    pub.lock = lock
    pub.write_policy()  # the policy accepts the locked manifest (and only it)
    return pub


def _plan(pub, where, spec_path, **kw):
    return plan_job(spec_path, pub.policy_path, manifest=kw.pop("manifest", pub.manifest_path), base=pub.base,
                    out=where / "out", log_path=where / "jobs.jsonl", **kw)


@pytest.fixture(scope="module")
def full_job(pub, tmp_path_factory):
    where = tmp_path_factory.mktemp("full")
    plan = _plan(pub, where, pub.spec(where / "job.yaml", name="locked-full", train={"steps": STEPS}))
    result = run_job(plan)
    delta, meta = load_delta(where / "out" / DELTA_FILE)
    return where, plan, result, delta, meta


# ------------------------------------------------------------------------------- 7. full job
def test_a_locked_full_job_runs_proves_its_locks_and_publishes_them(pub, full_job):
    where, plan, result, delta, meta = full_job
    lock = pub.lock
    assert plan.lock is not None and plan.lock.entries() == lock.entries()
    kinds = {(lk.out is not None, lk.inp is not None) for lk in lock.locks.values()}
    assert kinds == {(True, False), (False, True), (True, True)} and not set(lock.locks) & set(pub.mask.frozen)

    v = result.record["verify"]
    assert result.record["status"] == "completed" and v["ok"] and v["failures"] == []
    assert v["checked"] == len(pub.mask.frozen) and v["locks_checked"] == len(lock) > 0
    assert 0 < v["max_lock_residual"] <= 1.0
    assert f"all {len(lock)} locked tensors within tolerance" in v["summary"]

    out = where / "out"
    assert {p.name for p in out.iterdir()} >= {DELTA_FILE, RECORD_FILE, MANIFEST_FILE, pub.manifest.locks["file"]}
    published = Manifest.load(out / MANIFEST_FILE)
    assert published.digest() == pub.manifest.digest() and published.signature == pub.manifest.signature
    back = published.load_lock(out / MANIFEST_FILE)
    assert back.entries() == lock.entries()
    assert all(torch.equal(a, b) for n in lock.locks for a, b in zip(back.locks[n].bases(), lock.locks[n].bases())
               if a is not None)

    # the proof, redone here from the published delta and the base: every locked tensor trained,
    # and only off its locked directions
    assert meta["steps"] == str(STEPS) and set(lock.locks) <= set(delta)
    for n, lk in lock.locks.items():
        d = delta[n].double() - pub.base_state[n].double()
        dn = float(d.norm())
        assert dn > 0, n
        assert _residual(d, lk) <= residual_tolerance(STEPS, float(pub.base_state[n].double().norm()), dn), n
    assert audit_jobs(where / "jobs.jsonl", outputs=True).ok


# ------------------------------------------------------------------------------- 8. LoRA job
def test_a_lora_job_on_locked_modules_is_accepted_and_its_merge_respects_the_locks(pub, tmp_path):
    spec = pub.spec(tmp_path / "job.json", method="lora", train={"steps": STEPS},
                    lora={"rank": 2, "alpha": 2.0, "targets": [*LORA_TARGETS, CONV_TARGET]})
    plan = _plan(pub, tmp_path, spec)
    locked = [m for m in plan.lora_modules if f"{m}.weight" in pub.lock]
    assert len(plan.lora_modules) == 9 and CONV_TARGET in plan.lora_modules
    assert locked == plan.lora_modules  # every target is locked
    assert {(pub.lock.locks[f"{m}.weight"].out is not None, pub.lock.locks[f"{m}.weight"].inp is not None)
            for m in locked} == {(True, False), (False, True), (True, True)}
    result = run_job(plan)
    v = result.record["verify"]
    assert v["ok"] and v["locks_checked"] == len(locked), v

    delta, meta = load_delta(tmp_path / "out" / DELTA_FILE)
    scaling = float(meta["lora_alpha"]) / int(meta["lora_rank"])
    merged = merge_delta(pub.base_state, delta, pub.manifest, meta, lock=plan.lock)
    for m in locked:
        lk = pub.lock.locks[f"{m}.weight"]
        a, b = delta[f"{m}.lora_A.weight"], delta[f"{m}.lora_B.weight"]
        ba = torch.einsum("or,ri...->oi...", b.double().flatten(1), a.double()) * scaling  # float64 s B A
        torch.testing.assert_close(lora_delta(a, b, scaling).double(), ba, rtol=1e-5, atol=1e-7 * float(ba.abs().max()))
        assert float(ba.norm()) > 0, m  # the adapter trained
        assert _residual(ba, lk) <= 1e-5 * float(ba.norm()), m  # exact by construction (docstring)
        # and the merged weight: the delta's own exactness plus the rounding of W + s B A to fp32
        w0 = pub.base_state[f"{m}.weight"]
        d = merged[f"{m}.weight"].double() - w0.double()
        # (round to nearest: at most u |w| per element, so u ||W|| in all; doubled for ||W + s B A||)
        assert _residual(d, lk) <= 1e-5 * float(ba.norm()) + 2 * 2 ** -24 * float(w0.double().norm()), m
        torch.testing.assert_close(d, ba, rtol=0, atol=2 * 2 ** -24 * float(w0.abs().max()))


# ------------------------------------------------------------------------------- 9. merge_delta
def _smuggle(pub, delta, victim, size):
    """The delta with a change of ``size`` x ||W0|| added to ``victim``, a thousandth of whose
    energy lies along the locked directions."""
    lk = pub.lock.locks[victim]
    w0n = float(pub.base_state[victim].double().norm())
    g = torch.Generator().manual_seed(0)
    free = project_off_ref(torch.randn(lk.m, lk.n, generator=g, dtype=torch.float64),
                           *[None if b is None else b.double() for b in lk.bases()])
    side = lk.out if lk.out is not None else lk.inp
    along = side.double() @ torch.randn(side.shape[1], lk.n if lk.out is not None else lk.m, generator=g,
                                        dtype=torch.float64)
    along = along if lk.out is not None else along.mT
    free *= size * w0n / float(free.norm())
    along *= math.sqrt(1e-3) * float(free.norm()) / float(along.norm())
    change = (free + along).to(torch.float32).view(lk.shape)
    return {**delta, victim: delta[victim] + change}


def test_merge_delta_checks_full_deltas_against_the_locks(pub, full_job):
    _, plan, _, delta, meta = full_job
    merged = merge_delta(pub.base_state, delta, pub.manifest, meta, lock=plan.lock)  # the job's own delta
    assert all(torch.equal(merged[n], delta[n]) for n in delta)

    victim = next(n for n, lk in pub.lock.locks.items() if lk.out is not None and lk.inp is not None)
    bad = _smuggle(pub, delta, victim, 0.1)
    with pytest.raises(MergeError, match=f"'{victim}': locked-direction residual .* directions the manifest locks"):
        merge_delta(pub.base_state, bad, pub.manifest, meta, lock=plan.lock)
    in_only = next(n for n, lk in pub.lock.locks.items() if lk.out is None)
    with pytest.raises(MergeError, match=f"'{in_only}': locked-direction residual"):
        merge_delta(pub.base_state, _smuggle(pub, delta, in_only, 0.1), pub.manifest, meta, lock=plan.lock)

    with pytest.raises(MergeError, match="the manifest has direction locks: pass its lock"):
        merge_delta(pub.base_state, delta, pub.manifest, meta)
    other = mixed_lock(pub.base_state, skip=frozenset(pub.mask.frozen), seed=5)
    with pytest.raises(MergeError, match="pass its lock"):
        merge_delta(pub.base_state, delta, pub.manifest, meta, lock=other)  # not the manifest's lock


def test_merge_delta_with_the_jobs_steps_refuses_a_small_locked_direction_change(pub, full_job):
    _, plan, _, delta, meta = full_job
    bad = _smuggle(pub, delta, next(iter(pub.lock.locks)), 0.01)  # 1% of ||W0||, 1e-3 of it locked
    with pytest.raises(MergeError, match="locked-direction residual"):
        merge_delta(pub.base_state, bad, pub.manifest, meta, lock=plan.lock)


def test_merge_delta_refuses_the_same_change_when_the_metadata_omits_the_steps(pub, full_job):
    _, plan, _, delta, meta = full_job
    bad = _smuggle(pub, delta, next(iter(pub.lock.locks)), 0.01)
    no_steps = {k: v for k, v in meta.items() if k != "steps"}
    with pytest.raises(MergeError, match="no valid 'steps'"):
        merge_delta(pub.base_state, bad, pub.manifest, no_steps, lock=plan.lock)


# ------------------------------------------------------------------------------- 10. broken enforcement
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_job_whose_lock_enforcement_is_broken_fails_and_publishes_nothing(pub, tmp_path, monkeypatch, method):
    from freezeasguard.engine.optim import project

    # full: FlatAdamW.step -> LockGroups.project_chunk_ -> optim.project.project_off_; LoRA: the step
    # hooks of register_lock_hooks -> the same optim.project.project_off_ (the name both call)
    monkeypatch.setattr(project, "project_off_", lambda d, out=None, inp=None: d)
    extra = {} if method == "full" else {"method": "lora", "lora": {"rank": 2, "alpha": 2.0, "targets": LORA_TARGETS}}
    plan = _plan(pub, tmp_path, pub.spec(tmp_path / "job.yaml", name="broken", train={"steps": STEPS}, **extra))
    n_locks = len(pub.lock) if method == "full" else len(plan.lora_modules)
    with pytest.raises(JobError, match="the guard could not be proven") as err:
        run_job(plan)
    assert "moved along locked directions" in str(err.value) and "nothing was published" in str(err.value)
    assert not (tmp_path / "out").exists()
    entries = [e for _, e in read_entries(tmp_path / "jobs.jsonl")]
    assert [e["record"]["status"] for e in entries] == ["started", "failed"]
    rec = entries[1]["record"]
    assert rec["status"] == "failed" and rec["output"] is None and "guard could not be proven" in rec["error"]
    assert rec["verify"]["ok"] is False and rec["verify"]["locks_checked"] == n_locks
    assert rec["verify"]["failures"] and all("locked-direction residual" in f for f in rec["verify"]["failures"])
    assert audit_jobs(tmp_path / "jobs.jsonl").ok


# ------------------------------------------------------------------------------- 11. tampered locks
def test_a_locks_file_tampered_after_signing_is_refused_at_planning(pub, tmp_path):
    man_path = tmp_path / "manifest.json"
    man_path.write_text(pub.manifest_path.read_text())
    locks = pub.manifest.locks["file"]
    data = bytearray((pub.manifest_path.parent / locks).read_bytes())
    data[-1] ^= 0x01  # one byte of basis data
    (tmp_path / locks).write_bytes(bytes(data))
    with pytest.raises(PolicyViolation, match="manifest locks: locks file") as err:
        _plan(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), manifest=man_path)
    assert "sha256 mismatch" in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()

    # (the same checks without a plan each, which loads the base and the data:) a locks file swapped
    # for another self-consistent lock is refused by the signed hashes, and a manifest whose locks
    # were dropped no longer carries a valid signature
    other = mixed_lock(pub.base_state, skip=frozenset(pub.mask.frozen), seed=3)
    other.save(tmp_path / locks)
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        Manifest.load(man_path).load_lock(man_path)
    obj = json.loads(pub.manifest_path.read_text())
    obj.pop("locks")
    dropped = Manifest.from_dict(obj)
    key = load_key(pub.root / "keys" / "publisher.key", "hmac-sha256")
    assert manifest_signature_problems(pub.manifest, key) == []
    assert any("signature" in p for p in manifest_signature_problems(dropped, key))
