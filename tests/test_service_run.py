"""Guarded jobs end to end on the tiny preset: accepted, trained, proven, recorded, merged."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from freezeasguard.engine.cli.main import main as cli_main
from freezeasguard.engine.guard.hashing import model_fingerprint, model_folder_files, model_folder_fingerprint
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.io import file_sha256
from freezeasguard.engine.model.components import build_components, load_components, save_components
from freezeasguard.engine.model.data import digits_dataset, write_image_folder
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.delta import load_delta, merge_delta
from freezeasguard.engine.service.joblog import read_entries
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.policy import Policy
from freezeasguard.engine.service.run import DELTA_FILE, RECORD_FILE, run_job
from freezeasguard.engine.service.signing import load_key, new_ed25519_key, new_hmac_key, save_key, sign_manifest

# The publisher's mask for these tests: the first down block's and the mid block's attention.
FROZEN = ["down_blocks.0.attentions.*", "mid_block.attentions.*", "conv_in.*"]
LORA_TARGETS = ["up_blocks.1.*.to_q", "up_blocks.1.*.to_v"]  # all trainable under FROZEN
FROZEN_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@dataclass
class Publisher:
    root: Path
    base: Path
    data: Path
    manifest_path: Path
    policy_path: Path
    manifest: Manifest
    mask: FreezeMask
    base_state: dict

    def write_policy(self, path: Path | None = None, **over) -> Path:
        """The policy pinning this base folder and accepting this publisher's manifest (with overrides)."""
        policy = {"base_fingerprint": self.manifest.base_fingerprint,
                  "model_fingerprint": model_folder_fingerprint(model_folder_files(self.base)),
                  "manifests": [self.manifest.digest()],
                  "max_lr": 1e-3, "max_steps": 50, "max_batch_size": 8, "max_resolution": 64,
                  "log_key_file": str(self.root / "keys" / "service.key"),
                  "signature": {"algorithm": "hmac-sha256", "key_file": str(self.root / "keys" / "publisher.key")},
                  **over}
        path = path or self.policy_path
        path.write_text(yaml.safe_dump(policy))
        return path

    def spec(self, path: Path, **overrides) -> Path:
        """Write a job spec (3 full fine-tuning steps on the digits folder) with overrides."""
        spec = {"data": {"path": str(self.data)}, "train": {"lr": 1e-3, "steps": 3, "batch_size": 4}}
        for k, v in overrides.items():
            spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
        path.write_text(json.dumps(spec) if path.suffix == ".json" else yaml.safe_dump(spec))
        return path


def publish(root: Path, n_images: int = 8) -> Publisher:
    """A base model folder, a signed manifest, an HMAC key, a policy and an image folder."""
    write_image_folder(digits_dataset(16, classes=(0, 1)).subset(range(n_images)), root / "data")
    c = build_components("tiny", seed=0)
    save_components(c, root / "base")
    mask = FreezeMask.from_patterns(c.unet, FROZEN)
    key = new_hmac_key()
    save_key(key, root / "keys" / "publisher.key")
    manifest = sign_manifest(Manifest.build(c.unet, mask, provenance={"method": "patterns"}), key)
    manifest.save(root / "manifest.json")
    save_key(new_hmac_key(), root / "keys" / "service.key")  # the service's log signing key
    pub = Publisher(root, root / "base", root / "data", root / "manifest.json", root / "policy.yaml",
                    manifest, mask, {n: p.detach().clone() for n, p in c.unet.named_parameters()})
    pub.write_policy()
    return pub


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    return publish(tmp_path_factory.mktemp("publisher"))


def _plan(pub, tmp_path, spec_path, **kw):
    return plan_job(spec_path, pub.policy_path, manifest=pub.manifest_path, base=pub.base,
                    out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl", **kw)


def test_full_job_runs_proves_and_records(pub, tmp_path):
    plan = _plan(pub, tmp_path, pub.spec(tmp_path / "job.yaml", name="digits-full"))
    result = run_job(plan)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {DELTA_FILE, RECORD_FILE, "manifest.json", "config.json"}

    # The delta holds exactly the trainable tensors, and training moved them.
    delta, meta = load_delta(out / DELTA_FILE)
    assert set(delta) == set(pub.mask.trainable)
    assert meta["method"] == "full" and meta["manifest_digest"] == pub.manifest.digest()
    assert any(not torch.equal(delta[n], pub.base_state[n]) for n in delta)
    # Every frozen tensor of the trained model is bit-identical to the base.
    live = dict(plan.components.unet.named_parameters())
    assert all(torch.equal(live[n], pub.base_state[n]) for n in pub.mask.frozen)

    r = result.record
    assert r["status"] == "completed" and r["name"] == "digits-full"
    assert r["verify"] == {"ok": True, "checked": len(pub.mask.frozen), "failures": [],
                           "summary": f"all {len(pub.mask.frozen)} frozen tensors are bit-identical to the manifest"}
    files = sorted(p.name for p in pub.data.iterdir())
    assert r["dataset"]["files"] == {f: file_sha256(pub.data / f) for f in files}
    assert r["output"]["sha256"] == file_sha256(out / DELTA_FILE) and r["output"]["tensors"] == len(delta)
    assert r["manifest"]["digest"] == pub.manifest.digest()
    assert r["base"]["fingerprint"] == yaml.safe_load(pub.policy_path.read_text())["base_fingerprint"]
    assert r["config"]["freeze"]["mode"] == "engine" and r["config"]["train"]["lr"] == 1e-3
    assert len(r["train"]["losses"]) == 3
    assert json.loads((out / RECORD_FILE).read_text()) == r == result.log_entry["record"]
    assert json.loads((out / "config.json").read_text())["config"] == r["config"]  # final paths
    report = audit_jobs(tmp_path / "jobs.jsonl", outputs=True)
    # Two records: the intent ("started", before training) and the completion.
    assert report.ok and report.records == 2 and report.head == result.log_entry["hash"]
    assert [e["record"]["status"] for _, e in read_entries(tmp_path / "jobs.jsonl")] == ["started", "completed"]
    signed = audit_jobs(tmp_path / "jobs.jsonl", outputs=True, key=load_key(pub.root / "keys" / "service.key"),
                        manifest_key_id=pub.manifest.signature["key_id"])
    assert signed.ok and signed.signatures_checked

    # Merging the delta reproduces the trained model; the base's frozen tensors stay.
    merged = merge_delta(pub.base_state, delta, pub.manifest, meta)
    assert all(torch.equal(merged[n], live[n]) for n in live)


def test_lora_job_trains_adapters_only_and_merges_exactly(pub, tmp_path):
    spec = pub.spec(tmp_path / "job.json", method="lora",
                    lora={"rank": 2, "alpha": 4.0, "targets": LORA_TARGETS}, train={"lr": 5e-4})
    plan = _plan(pub, tmp_path, spec)
    assert len(plan.lora_modules) == 8  # to_q and to_v of attn1/attn2 in both up attentions
    result = run_job(plan)
    delta, meta = load_delta(tmp_path / "out" / DELTA_FILE)
    assert set(delta) == {f"{m}.lora_{ab}.weight" for m in plan.lora_modules for ab in "AB"}
    assert result.record["method"]["modules"] == plan.lora_modules and result.record["verify"]["ok"]

    unet = plan.components.unet.eval()
    # LoRA changes no base tensor at all, frozen or not.
    base_now = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if ".lora_" not in n}
    assert base_now.keys() == pub.base_state.keys()
    assert all(torch.equal(base_now[n], pub.base_state[n]) for n in base_now)

    # W + (alpha/r) B A merged into a fresh base gives the trained adapter model's outputs.
    merged = merge_delta(pub.base_state, delta, pub.manifest, meta)
    changed = [n for n in merged if not torch.equal(merged[n], pub.base_state[n])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in plan.lora_modules)
    fresh = load_components(pub.base).unet.eval()
    fresh.load_state_dict(merged, strict=False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500])
    cond = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=cond).sample
        got = fresh(x, t, encoder_hidden_states=cond).sample
        before = load_components(pub.base).unet.eval()(x, t, encoder_hidden_states=cond).sample
    # fp32: (W + s BA) x vs W x + s B (A x) differ only by rounding order (~1e-7 here), while
    # the adapters move the output by ~3e-3: a wrong scaling or a missed module cannot pass.
    assert (want - before).abs().max() > 100 * 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert audit_jobs(tmp_path / "jobs.jsonl", outputs=True).ok


def test_ed25519_signed_manifest_is_accepted_with_the_public_key(pub, tmp_path):
    key = new_ed25519_key()
    save_key(key, tmp_path / "pub.key.pem", public_path=tmp_path / "public.pem")
    signed = sign_manifest(pub.manifest, key)
    signed.save(tmp_path / "m.json")
    policy = Policy.load(pub.policy_path)
    policy.signature.algorithm, policy.signature.key_file = "ed25519", str(tmp_path / "public.pem")
    policy.manifests = [signed.digest()]
    plan = plan_job(pub.spec(tmp_path / "job.yaml"), policy, manifest=tmp_path / "m.json", base=pub.base,
                    out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert plan.config.freeze.mode == "engine" and len(plan.dataset) == 8
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()  # plans write nothing


def _call(argv):
    return cli_main([str(a) for a in argv])


def test_cli_submit_and_audit(pub, tmp_path, capsys):
    common = ["--policy", pub.policy_path, "--manifest", pub.manifest_path, "--base", pub.base,
              "--log", tmp_path / "jobs.jsonl"]
    spec = pub.spec(tmp_path / "job.yaml", train={"steps": 1})
    assert _call(["job", "submit", spec, *common, "--out", tmp_path / "a"]) == 0
    assert f"all {len(pub.mask.frozen)} frozen tensors are bit-identical" in capsys.readouterr().out
    assert _call(["audit", tmp_path / "jobs.jsonl", "--outputs", "--policy", pub.policy_path]) == 0
    assert "2 record(s), chain intact" in capsys.readouterr().out

    over = pub.spec(tmp_path / "over.yaml", train={"lr": 0.1})
    assert _call(["job", "submit", over, *common, "--out", tmp_path / "b"]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "b").exists()

    (tmp_path / "a" / DELTA_FILE).write_bytes(b"swapped")
    assert _call(["audit", tmp_path / "jobs.jsonl", "--outputs"]) == 1
    assert "does not match its recorded sha256" in capsys.readouterr().err


def test_bf16_job_stores_frozen_in_bf16_yet_proves_the_fp32_base(pub, tmp_path):
    spec = pub.spec(tmp_path / "job.yaml", train={"steps": 2, "extra": {"mixed_precision": "bf16"}})
    plan = _plan(pub, tmp_path, spec)
    result = run_job(plan)
    live = dict(plan.components.unet.named_parameters())
    assert live[f"{FROZEN_ATTN}.to_q.weight"].dtype == torch.bfloat16  # held in bf16 while training
    assert result.record["verify"]["ok"] and result.record["verify"]["checked"] == len(pub.mask.frozen)
    delta, _ = load_delta(tmp_path / "out" / DELTA_FILE)
    assert {t.dtype for t in delta.values()} == {torch.float32}  # trainable master weights stay fp32


def test_policy_init_pins_the_base_and_refuses_the_wrong_key(tmp_path):
    import subprocess
    import sys

    from freezeasguard.engine.service.policy import policy_for

    c = build_components("tiny", seed=0)
    save_components(c, tmp_path / "base")
    key = new_ed25519_key()
    save_key(key, tmp_path / "keys" / "k.key", public_path=tmp_path / "keys" / "k.pem")
    manifest = sign_manifest(Manifest.build(c.unet, FreezeMask.from_patterns(c.unet, FROZEN),
                                            provenance={"method": "patterns"}), key)
    manifest.save(tmp_path / "m.json")
    save_key(new_hmac_key(), tmp_path / "keys" / "service.key")
    cli = [sys.executable, "-m", "freezeasguard.engine.cli", "policy", "init", "--manifest", str(tmp_path / "m.json"),
           "--base", str(tmp_path / "base"), "--out", str(tmp_path / "pol" / "policy.yaml"),
           "--log-key", str(tmp_path / "keys" / "service.key")]
    ok = subprocess.run([*cli, "--key-file", str(tmp_path / "keys" / "k.pem")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    policy = Policy.load(tmp_path / "pol" / "policy.yaml")
    assert policy.base_fingerprint == model_fingerprint(c.unet) and policy.text_encoder_fingerprint
    assert policy.model_fingerprint == model_folder_fingerprint(model_folder_files(tmp_path / "base"))
    assert policy.manifests == [manifest.digest()]
    assert Path(policy.signature.key_file).resolve() == (tmp_path / "keys" / "k.pem").resolve()  # relative, reloads
    assert yaml.safe_load((tmp_path / "pol" / "policy.yaml").read_text())["signature"]["key_file"] == "../keys/k.pem"
    again = subprocess.run([*cli, "--key-file", str(tmp_path / "keys" / "k.pem")], capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to replace a policy" in again.stderr
    from freezeasguard.engine.errors import SignatureError

    kw = {"log_key_file": tmp_path / "keys" / "service.key"}
    with pytest.raises(SignatureError, match="private Ed25519 key"):
        policy_for(manifest, tmp_path / "keys" / "k.key", tmp_path / "base", **kw)
    other = new_ed25519_key()
    save_key(other, tmp_path / "o.key", public_path=tmp_path / "o.pem")
    with pytest.raises(SignatureError, match="does not verify"):
        policy_for(manifest, tmp_path / "o.pem", tmp_path / "base", **kw)
    with pytest.raises(SignatureError, match="only a public key"):
        policy_for(manifest, tmp_path / "keys" / "k.pem", tmp_path / "base", log_key_file=tmp_path / "o.pem")
