"""Signatures, job specs, policies and the rules between them (no training here)."""
import dataclasses
import hmac

import pytest
import torch

from freezeasguard.engine.errors import ConfigError, PolicyViolation, SignatureError
from freezeasguard.engine.guard.hashing import model_fingerprint
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.lora import resolve_lora_targets
from freezeasguard.engine.service.policy import Policy, base_problems, spec_problems
from freezeasguard.engine.service.signing import (
    load_key,
    new_ed25519_key,
    new_hmac_key,
    save_key,
    sign_manifest,
    signature_problem,
    verify_manifest,
)
from freezeasguard.engine.service.spec import JobSpec

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("tiny")


@pytest.fixture(scope="module")
def mask(unet):
    # Freezes the first down block's attention and, separately, one lone bias in the up block.
    return FreezeMask.from_patterns(unet, ["down_blocks.0.attentions.*",
                                           "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"])


@pytest.fixture(scope="module")
def manifest(unet, mask):
    return Manifest.build(unet, mask, provenance={"method": "patterns"})


def _policy(unet, **kw):
    data = {"base_fingerprint": model_fingerprint(unet), "model_fingerprint": "1" * 64, "manifests": ["2" * 64],
            "log_key_file": "service.key", "signature": {"key_file": "k.pem"}}
    data.update(kw)
    return Policy.from_dict(data)


def _spec(**kw):
    data = {"data": {"path": "imgs"}}
    data.update(kw)
    return JobSpec.from_dict(data)


# ------------------------------------------------------------------------------------ signing
@pytest.mark.parametrize("make", [new_hmac_key, new_ed25519_key], ids=["hmac", "ed25519"])
def test_sign_verify_roundtrip_and_tamper(manifest, make):
    key = make()
    signed = sign_manifest(manifest, key)
    assert manifest.signature is None and signed.signature["alg"] == key.alg
    assert signed.digest() == manifest.digest()  # the signature is outside the digest
    verify_manifest(signed, key)

    edited = dataclasses.replace(signed, provenance={**signed.provenance, "method": "other"})
    with pytest.raises(SignatureError, match="edited after signing"):
        verify_manifest(edited, key)
    forged = dataclasses.replace(signed, signature={**signed.signature, "value": "00" * 64})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(forged, key)
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(manifest, key)
    other = make()
    with pytest.raises(SignatureError, match="not by the publisher key"):
        verify_manifest(signed, other)


def test_algorithm_mismatch_is_refused(manifest):
    signed = sign_manifest(manifest, new_hmac_key())
    assert "requires 'ed25519'" in signature_problem(signed.digest(), signed.signature, new_ed25519_key())


def test_hmac_uses_constant_time_comparison(monkeypatch, manifest):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(signing.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    key = new_hmac_key()
    verify_manifest(sign_manifest(manifest, key), key)
    assert calls


def test_key_files_roundtrip(tmp_path, manifest):
    hk = new_hmac_key()
    save_key(hk, tmp_path / "h.key")
    assert (tmp_path / "h.key").stat().st_mode & 0o077 == 0  # a secret is readable by its owner only
    assert load_key(tmp_path / "h.key").secret == hk.secret

    ek = new_ed25519_key()
    save_key(ek, tmp_path / "e.pem", public_path=tmp_path / "e.pub")
    priv, pub = load_key(tmp_path / "e.pem"), load_key(tmp_path / "e.pub", "ed25519")
    assert priv.key_id == pub.key_id == ek.key_id
    signed = sign_manifest(manifest, priv)
    verify_manifest(signed, pub)  # the service needs only the public half
    with pytest.raises(SignatureError, match="public half"):
        sign_manifest(manifest, pub)
    with pytest.raises(SignatureError, match="hmac-sha256 key, but ed25519 is required"):
        load_key(tmp_path / "h.key", "ed25519")


@pytest.mark.parametrize("content, msg", [(b"abcd", "at least 32"), (b"not hex at all", "expected an HMAC"),
                                          (b"-----BEGIN PUBLIC KEY-----\ngarbage\n", "not a readable PEM")])
def test_bad_key_files_are_named(tmp_path, content, msg):
    (tmp_path / "bad.key").write_bytes(content)
    with pytest.raises(SignatureError, match=msg) as e:
        load_key(tmp_path / "bad.key")
    assert "bad.key" in str(e.value)
    with pytest.raises(SignatureError, match="does not exist"):
        load_key(tmp_path / "missing.key")


# ---------------------------------------------------------------------------- spec and policy
def test_spec_unknown_key_names_closest_but_bypass_fields_parse():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        _spec(train={"step": 3})
    with pytest.raises(ConfigError, match="did you mean 'train_text_encoder'"):
        _spec(train_text_encodr=True)
    with pytest.raises(ConfigError, match="data.path"):
        JobSpec.from_dict({"method": "full"})
    spec = _spec(train_text_encoder=True, train_embeddings=True, unfreeze=["a"], freeze={"mode": "full"})
    assert spec.train_text_encoder and spec.unfreeze == ["a"] and spec.freeze == {"mode": "full"}


def test_spec_and_policy_files(tmp_path, unet):
    (tmp_path / "job.yaml").write_text("data: {path: imgs}\nmethod: lora\nlora: {rank: 8}\n"
                                       "train: {lr: 1.0e-5, steps: 10, extra: {warmup_steps: 2}}\n")
    spec = JobSpec.load(tmp_path / "job.yaml")
    assert spec.lora.rank == 8 and spec.train.extra == {"warmup_steps": 2}
    assert spec.data.path == str(tmp_path / "imgs")  # relative to the spec file
    (tmp_path / "policy.yaml").write_text(f"base_fingerprint: {model_fingerprint(unet)}\n"
                                          f"model_fingerprint: '{'1' * 64}'\nmanifests: ['{'2' * 64}']\n"
                                          "log_key_file: keys/service.key\n"
                                          "signature: {algorithm: hmac-sha256, key_file: keys/p.key}\n")
    pol = Policy.load(tmp_path / "policy.yaml")
    assert pol.signature.key_file == str(tmp_path / "keys/p.key")
    assert pol.log_key_file == str(tmp_path / "keys/service.key")
    assert len(pol.digest()) == 64
    with pytest.raises(ConfigError, match="base_fingerprint"):
        Policy.from_dict({"signature": {"key_file": "k"}})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        Policy.from_dict({"base_fingerprint": model_fingerprint(unet), "max_step": 3})


def test_every_violation_is_named_at_once(unet, mask):
    policy = _policy(unet, max_lr=1e-4, max_steps=100, max_batch_size=8, max_resolution=256)
    frozen = mask.frozen[0]
    spec = _spec(method="textual_inversion", train={
        "lr": 1e-2, "steps": 1000, "batch_size": 64, "resolution": 1024,
        "extra": {"optimizer": "adamw8bit", "device": "cuda", "warmup_step": 3}},
        train_text_encoder=True, train_embeddings=True, train_vae=True,
        unfreeze=[frozen, mask.trainable[0], "nope"], freeze={"mode": "full"})
    problems = spec_problems(spec, policy, mask)
    expected = ["method 'textual_inversion'", "token embeddings, which are locked", "train.lr 0.01 exceeds",
                "train.steps 1000 exceeds", "train.batch_size 64 exceeds", "train.resolution 1024 exceeds",
                "'adamw8bit' is not allowed", "['device'], which the service controls",
                "did you mean 'warmup_steps'", "text encoder is locked", "token embeddings are locked",
                "VAE is locked", "freeze settings are fixed", f"{frozen!r} is frozen by the publisher",
                "already trainable", "'nope' is not a tensor"]
    text = "\n".join(problems)
    for e in expected:
        assert e in text, e
    assert len(problems) == len(expected) - 1  # two expectations are about the method's one line
    err = PolicyViolation(problems)
    assert err.violations == problems and f"({len(problems)} violation(s))" in str(err)


def test_allowed_job_has_no_problems(unet, mask):
    assert spec_problems(_spec(train={"lr": 1e-5, "steps": 10}), _policy(unet), mask) == []
    assert spec_problems(_spec(method="lora", train={"lr": 1e-5}), _policy(unet), mask) == []
    assert "not allowed by the policy" in spec_problems(_spec(method="lora"), _policy(unet, methods=["full"]))[0]


# ------------------------------------------------------------------------------- LoRA targets
def test_lora_targets_resolve_by_module_name(unet, mask):
    t = resolve_lora_targets(unet, mask, ["up_blocks.1.*.attn2.to_q", "time_emb_proj"])
    mods, problems = t.modules, t.problems()
    assert problems == []
    assert mods == [n for n, _ in unet.named_modules()
                    if n.endswith("time_emb_proj") or (n.startswith("up_blocks.1.") and n.endswith("attn2.to_q"))]
    assert len(mods) == 2 + 8  # two attention blocks in up_blocks.1; resnets: 1 + 1 down, 2 mid, 2 + 2 up


def test_lora_on_frozen_module_is_refused(unet, mask):
    t = resolve_lora_targets(unet, mask, ["to_q", "up_blocks.1.*.to_out.0", "norm1", "text_model.*"])
    mods, problems = t.modules, t.problems()
    text = "\n".join(problems)
    assert f"'{ATTN}.to_q' (pattern 'to_q') is a frozen module" in text
    # one frozen bias is enough to refuse the module
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias frozen" in text
    assert "'norm1' matches no Linear or Conv2d" in text and "'text_model.*' matches no" in text
    assert not any(m.startswith("down_blocks.0.attentions") for m in mods)
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in mods
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0" not in mods
    # skip_frozen leaves the frozen modules out instead of refusing; unmatched patterns still refuse
    assert t.problems(skip_frozen=True) == t.unmatched and len(t.frozen) > 0
    only_frozen = resolve_lora_targets(unet, mask, [f"{ATTN}.to_q"])
    assert only_frozen.modules == [] and "nothing is left to adapt" in only_frozen.problems(skip_frozen=True)[0]


# ------------------------------------------------------------------------------- base pinning
def test_base_pin_and_manifest_binding(unet, manifest):
    policy = _policy(unet, manifests=[manifest.digest()])
    fp, problems = base_problems(policy, manifest, unet)
    assert fp == policy.base_fingerprint and problems == []
    changed = {n: p.detach().clone() for n, p in unet.named_parameters()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1.0
    _, problems = base_problems(policy, manifest, changed)
    assert len(problems) == 1 and "modified or replaced" in problems[0]
    other = _policy(unet, base_fingerprint="0" * 64, manifests=[manifest.digest()])
    _, problems = base_problems(other, manifest, unet)
    assert len(problems) == 2 and "the manifest was made for base" in problems[1]
    _, problems = base_problems(_policy(unet), manifest, unet)
    assert problems == [f"manifest {manifest.digest()[:16]}... is not one the policy accepts (policy manifests): "
                        "a job runs only under a manifest the policy lists"]


def test_text_encoder_can_be_pinned_too(unet, manifest):
    text_encoder = torch.nn.Linear(3, 3)
    policy = _policy(unet, text_encoder_fingerprint=model_fingerprint(text_encoder), manifests=[manifest.digest()])
    assert base_problems(policy, manifest, unet, text_encoder)[1] == []
    with torch.no_grad():
        text_encoder.weight[0, 0] += 1.0
    (problem,) = base_problems(policy, manifest, unet, text_encoder)[1]
    assert "text encoder fingerprint is not the pinned one" in problem


def test_policy_init_refuses_an_unmeetable_share_and_the_publishers_key_as_log_key(tmp_path, capsys):
    """A min_guard_share no listed manifest meets refuses every job; a log signed with the
    publisher's key (its private half, or the same HMAC secret) can be forged by the publisher's
    side and proves nothing about the service."""
    from freezeasguard.engine.cli.main import main
    from freezeasguard.engine.model.components import build_components, save_components
    from freezeasguard.engine.service.policy import guard_share, policy_for

    c = build_components("tiny", seed=0)
    save_components(c, tmp_path / "base")
    mask = FreezeMask.from_patterns(c.unet, ["down_blocks.0.attentions.*"])
    ed, hm = new_ed25519_key(), new_hmac_key()
    save_key(ed, tmp_path / "pub.key", public_path=tmp_path / "pub.pem")
    save_key(hm, tmp_path / "hmac.key")
    save_key(new_hmac_key(), tmp_path / "service.key")
    for key, name in ((ed, "m_ed.json"), (hm, "m_hmac.json")):
        sign_manifest(Manifest.build(c.unet, mask, provenance={"method": "patterns"}), key).save(tmp_path / name)
    m_ed, m_hmac = Manifest.load(tmp_path / "m_ed.json"), Manifest.load(tmp_path / "m_hmac.json")
    share = guard_share(m_ed)
    assert 0 < share < 0.5
    base = tmp_path / "base"
    assert policy_for(m_ed, tmp_path / "pub.pem", base, log_key_file=tmp_path / "service.key",
                      min_guard_share=share).min_guard_share == share
    with pytest.raises(ConfigError, match=r"min_guard_share 50\.0% is met by none of the manifests \(they guard "
                                          rf"{share:.1%} of the UNet's parameters\): every job would be refused"):
        policy_for(m_ed, tmp_path / "pub.pem", base, log_key_file=tmp_path / "service.key", min_guard_share=0.5)
    for key_file, log_key, m in (("pub.pem", "pub.key", m_ed), ("hmac.key", "hmac.key", m_hmac)):
        with pytest.raises(SignatureError, match=f"{log_key} is the publisher's key"):
            policy_for(m, tmp_path / key_file, base, log_key_file=tmp_path / log_key)
    # The command line: one line on stderr, exit 2, nothing written.
    argv = ["policy", "init", "--manifest", str(tmp_path / "m_ed.json"), "--key-file", str(tmp_path / "pub.pem"),
            "--base", str(base), "--out", str(tmp_path / "policy.yaml")]
    for extra, said in ((["--log-key", str(tmp_path / "service.key"), "--min-guard-share", "0.5"],
                         "min_guard_share 50.0% is met by none of the manifests"),
                        (["--log-key", str(tmp_path / "pub.key")], "pub.key is the publisher's key")):
        capsys.readouterr()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("freezeasguard policy init: error: ") and said in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "policy.yaml").exists()
