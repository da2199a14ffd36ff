"""Attacks on the guard. Each one is refused with a clear error and leaves nothing behind."""
import hashlib
import json
import shutil

import pytest
import torch
import yaml
from test_service_run import FROZEN_ATTN as ATTN
from test_service_run import LORA_TARGETS, publish

from freezeasguard.engine.errors import ConfigError, JobError, MergeError, PolicyViolation
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.io import save_safetensors_atomic
from freezeasguard.engine.model.components import load_components, save_components
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.delta import DELTA_FORMAT, load_delta, merge_delta
from freezeasguard.engine.service.joblog import read_entries
from freezeasguard.engine.service.run import submit
from freezeasguard.engine.service.signing import new_hmac_key, sign_manifest
from freezeasguard.engine.train import trainer as train_mod


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    return publish(tmp_path_factory.mktemp("publisher"))


def _snapshot(*roots):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


def _refused(pub, tmp_path, spec, *, manifest=None, base=None):
    """Submit a job that must be refused; check that nothing was written anywhere."""
    before = _snapshot(pub.root, tmp_path)
    with pytest.raises(PolicyViolation) as err:
        submit(spec, pub.policy_path, manifest=manifest or pub.manifest_path, base=base or pub.base,
               out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert _snapshot(pub.root, tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()
    return "\n".join(err.value.violations)


def test_lora_on_a_frozen_module(pub, tmp_path):
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", method="lora", lora={"targets": ["to_q"]}))
    assert f"lora target '{ATTN}.to_q' (pattern 'to_q') is a frozen module" in text
    assert "would undo the freeze" in text


def test_lora_skip_frozen_never_adapts_a_frozen_module(pub, tmp_path):
    from freezeasguard.engine.service.plan import plan_job
    from freezeasguard.engine.service.run import run_job

    ok = tmp_path / "accepted"
    ok.mkdir()
    spec = pub.spec(ok / "job.yaml", method="lora", lora={"targets": ["to_q"], "skip_frozen": True})
    plan = plan_job(spec, pub.policy_path, manifest=pub.manifest_path, base=pub.base, out=ok / "out",
                    log_path=ok / "jobs.jsonl")
    frozen_modules = {n.rsplit(".", 1)[0] for n in pub.mask.frozen}
    assert plan.lora_modules and not set(plan.lora_modules) & frozen_modules
    assert any(f"'{ATTN}.to_q'" in m for m in plan.lora_skipped)
    result = run_job(plan)
    assert result.record["method"]["skipped"] == plan.lora_skipped and result.record["verify"]["ok"]
    # only one module to adapt, and it is frozen: refused, even with skip_frozen
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job2.yaml", method="lora",
                                            lora={"targets": [f"{ATTN}.to_q"], "skip_frozen": True}))
    assert "nothing is left to adapt" in text


def test_config_that_unfreezes_a_frozen_tensor(pub, tmp_path):
    name = f"{ATTN}.to_k.weight"
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", unfreeze=[name],
                                            freeze={"mode": "full"}))
    assert f"unfreeze: '{name}' is frozen by the publisher's manifest and stays frozen" in text
    assert "freeze settings are fixed by the service" in text


def test_manifest_edited_after_signing(pub, tmp_path):
    # The real attack: release one frozen tensor and keep the publisher's signature.
    base = load_components(pub.base).unet
    released = FreezeMask.from_names(base, [n for n in pub.mask.frozen if n != f"{ATTN}.to_q.weight"])
    edited = Manifest.build(base, released, provenance=pub.manifest.provenance)
    edited.signature = pub.manifest.signature
    edited.save(tmp_path / "edited.json")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), manifest=tmp_path / "edited.json")
    assert "manifest signature: the manifest was edited after signing" in text


def test_manifest_signed_by_another_key(pub, tmp_path):
    own = new_hmac_key()  # the attacker signs their own, more permissive manifest
    base = load_components(pub.base).unet
    sign_manifest(Manifest.build(base, FreezeMask.from_names(base, [])), own).save(tmp_path / "mine.json")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), manifest=tmp_path / "mine.json")
    assert "manifest signature: signed by key" in text and "not by the publisher key" in text


def test_base_model_with_one_tensor_changed(pub, tmp_path):
    c = load_components(pub.base)
    name = "up_blocks.1.resnets.0.conv1.weight"  # a trainable tensor: only the pin can catch it
    with torch.no_grad():
        dict(c.unet.named_parameters())[name].view(-1)[0] += 1e-3
    save_components(c, tmp_path / "swapped")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), base=tmp_path / "swapped")
    assert "base UNet fingerprint" in text and "modified or replaced" in text


def test_text_encoder_and_embedding_training(pub, tmp_path):
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", train_text_encoder=True,
                                            train_embeddings=True))
    assert "the text encoder is locked" in text and "token embeddings are locked" in text
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "ti.yaml", method="textual_inversion"))
    assert "method 'textual_inversion' is not available: trains token embeddings" in text


def test_learning_rate_and_steps_over_the_caps(pub, tmp_path):
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", train={"lr": 1e-2, "steps": 5000}))
    assert "train.lr 0.01 exceeds the policy cap max_lr 0.001" in text
    assert "train.steps 5000 exceeds the policy cap max_steps 50" in text


def test_dataset_with_a_corrupt_image(pub, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pub.data, data)
    bad = json.loads((data / "metadata.jsonl").read_text().splitlines()[2])["file_name"]
    (data / bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", data={"path": str(data)}))
    assert f"metadata.jsonl:3: cannot decode image {bad!r}" in text


def test_dataset_reaching_outside_its_folder(pub, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pub.data, data)
    shutil.copy(data / "digit_0000.png", tmp_path / "elsewhere.png")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "../elsewhere.png", "text": "a photo of the digit zero"}) + "\n")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml", data={"path": str(data)}))
    assert "outside the dataset folder: ['../elsewhere.png']" in text


def test_no_publisher_key(pub, tmp_path):
    policy = yaml.safe_load(pub.policy_path.read_text())
    del policy["signature"]["key_file"]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    with pytest.raises(ConfigError, match="signature.key_file must name the publisher's verification key"):
        submit(pub.spec(tmp_path / "job.yaml"), tmp_path / "policy.yaml", manifest=pub.manifest_path,
               base=pub.base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()


def test_every_violation_is_named_at_once(pub, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pub.data, data)
    (data / "digit_0000.png").write_bytes(b"junk")
    doc = json.loads(pub.manifest_path.read_text())
    doc["provenance"]["method"] = "edited"
    (tmp_path / "m.json").write_text(json.dumps(doc))
    spec = pub.spec(tmp_path / "job.yaml", method="lora", lora={"targets": ["to_q", *LORA_TARGETS]},
                    train={"lr": 1.0}, data={"path": str(data)}, train_text_encoder=True)
    text = _refused(pub, tmp_path, spec, manifest=tmp_path / "m.json")
    for part in ("is a frozen module", "train.lr 1 exceeds", "text encoder is locked",
                 "edited after signing", "cannot decode image 'digit_0000.png'"):
        assert part in text, part


def _delta(pub, tmp_path, tensors, **meta):
    path = tmp_path / "delta.safetensors"
    provenance = {"job_id": "redteam", "base_fingerprint": pub.manifest.base_fingerprint,
                  "manifest_digest": pub.manifest.digest()}
    save_safetensors_atomic(tensors, path, metadata={"format": DELTA_FORMAT, **provenance, **meta})
    return load_delta(path)


def test_delta_that_would_change_a_frozen_tensor_is_not_merged(pub, tmp_path):
    base = pub.base_state
    frozen, free = f"{ATTN}.to_q.weight", "up_blocks.1.resnets.0.conv1.weight"
    keep = {n: t.clone() for n, t in base.items()}

    delta, meta = _delta(pub, tmp_path, {free: base[free] + 0.1, frozen: base[frozen] + 0.1,
                                         "text_model.embeddings.token_embedding.weight": torch.zeros(3, 3)},
                              method="full")
    with pytest.raises(MergeError) as err:
        merge_delta(base, delta, pub.manifest, meta)
    assert f"'{frozen}' is frozen by the manifest; the delta would change it" in str(err.value)
    assert "'text_model.embeddings.token_embedding.weight' is not a tensor of the base" in str(err.value)

    w = base[frozen]
    delta, meta = _delta(pub, tmp_path, {f"{ATTN}.to_q.lora_A.weight": torch.ones(2, w.shape[1]),
                                         f"{ATTN}.to_q.lora_B.weight": torch.ones(w.shape[0], 2)},
                              method="lora", lora_rank="2", lora_alpha="2.0")
    with pytest.raises(MergeError, match=f"module '{ATTN}.to_q' has frozen tensor"):
        merge_delta(base, delta, pub.manifest, meta)
    assert all(torch.equal(base[n], keep[n]) for n in base)  # refusals leave the base as it was

    delta, meta = _delta(pub, tmp_path, {free: base[free] + 0.1}, method="full", manifest_digest="0" * 64)
    with pytest.raises(MergeError, match="trained under a different manifest"):
        merge_delta(base, delta, pub.manifest, meta)

    # An unchanged copy of a frozen tensor is not a change; the free tensor merges.
    delta, meta = _delta(pub, tmp_path, {free: base[free] + 0.1, frozen: base[frozen].clone()}, method="full")
    merged = merge_delta(base, delta, pub.manifest, meta)
    assert torch.equal(merged[free], base[free] + 0.1) and torch.equal(merged[frozen], base[frozen])


@pytest.fixture(scope="module")
def one_job(pub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    submit(pub.spec(tmp / "job.yaml", train={"steps": 1}), pub.policy_path, manifest=pub.manifest_path,
           base=pub.base, out=tmp / "out", log_path=tmp / "jobs.jsonl")
    submit(pub.spec(tmp / "job2.yaml", train={"steps": 1, "seed": 1}), pub.policy_path,
           manifest=pub.manifest_path, base=pub.base, out=tmp / "out2", log_path=tmp / "jobs.jsonl")
    return tmp


def test_job_log_with_one_record_edited(one_job, tmp_path):
    log = tmp_path / "jobs.jsonl"
    shutil.copy(one_job / "jobs.jsonl", log)
    assert audit_jobs(log).ok and audit_jobs(log).records == 4  # started + completed, twice
    entries = [e for _, e in read_entries(log)]
    # Claim different training data for the first job.
    files = entries[0]["record"]["dataset"]["files"]
    files[next(iter(files))] = "0" * 64
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = audit_jobs(log)
    assert not report.ok and report.bad_line == 1 and report.bad_seq == 0
    assert "line 1 (seq 0) is the first bad record" in report.summary() and "edited" in report.reason


def test_training_that_changed_a_frozen_tensor_is_not_published(pub, tmp_path, monkeypatch):
    fit = train_mod.Trainer.fit

    def tampering_fit(self, *a, **k):
        history = fit(self, *a, **k)
        with torch.no_grad():  # what a bypass inside the training loop would leave behind
            dict(self.c.unet.named_parameters())[f"{ATTN}.to_v.weight"].view(-1)[0] += 1.0
        return history

    monkeypatch.setattr(train_mod.Trainer, "fit", tampering_fit)
    with pytest.raises(JobError, match="could not be proven"):
        submit(pub.spec(tmp_path / "job.yaml", train={"steps": 1}), pub.policy_path,
               manifest=pub.manifest_path, base=pub.base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "jobs.jsonl"]  # no staging left over
    # The failure itself is on the record.
    started, entry = [e for _, e in read_entries(tmp_path / "jobs.jsonl")]
    assert started["record"]["status"] == "started"
    assert entry["record"]["status"] == "failed" and entry["record"]["output"] is None
    assert entry["record"]["error"].startswith("JobError: job ")
    assert f"'{ATTN}.to_v.weight': bytes differ" in entry["record"]["verify"]["failures"][0]
    assert audit_jobs(tmp_path / "jobs.jsonl").ok
