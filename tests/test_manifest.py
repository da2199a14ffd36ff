import hashlib
import json

import pytest
import torch

from freezeasguard.engine.errors import ManifestError, MaskError
from freezeasguard.engine.guard.hashing import model_fingerprint, tensor_sha256
from freezeasguard.engine.guard.manifest import SCHEMA, Manifest, load_mask
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.verify import verify_frozen
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.version import __version__


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_unet("tiny")


@pytest.fixture(scope="module")
def mask(tiny):
    return FreezeMask.random(tiny, 0.4, by="tensors", seed=7)


@pytest.fixture(scope="module")
def manifest(tiny, mask):
    return Manifest.build(tiny, mask, provenance={"method": "random", "config": {"ratio": 0.4}, "seed": 7})


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bump(t):
    """The same tensor with its first element moved by one ulp."""
    t = t.clone()
    flat = t.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=t.dtype))
    return t


# ------------------------------------------------------------------------------------- hashing
def test_tensor_sha256_matches_raw_bytes():
    x = torch.randn(5, 7)
    assert tensor_sha256(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    b = x.bfloat16()
    assert tensor_sha256(b) == hashlib.sha256(b.view(torch.int16).numpy().tobytes()).hexdigest()
    assert tensor_sha256(x.t()) == tensor_sha256(x.t().contiguous())  # row-major of the view
    assert tensor_sha256(torch.tensor(3.0)) == hashlib.sha256(torch.tensor(3.0).numpy().tobytes()).hexdigest()
    assert tensor_sha256(x) != tensor_sha256(_bump(x))
    with pytest.raises(ManifestError, match="meta"):
        tensor_sha256(torch.empty(3, device="meta"))


def test_fingerprint_is_order_independent_and_framed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(3, generator=g)
    fp = model_fingerprint({"a": a, "b": b})
    assert fp == model_fingerprint({"b": b, "a": a})
    assert fp == model_fingerprint([("b", b), ("a", a)])
    assert fp != model_fingerprint({"a": _bump(a), "b": b})  # bytes
    assert fp != model_fingerprint({"a": a.reshape(6, 4), "b": b})  # shape, same bytes
    assert fp != model_fingerprint({"a": a.view(torch.int32), "b": b})  # dtype, same bytes
    assert fp != model_fingerprint({"a": a, "c": b})  # name
    # Length-prefixed names: moving a character from one name to the next changes the hash.
    assert model_fingerprint({"ab": a, "c": b}) != model_fingerprint({"a": a, "bc": b})


# ------------------------------------------------------------------------------------- build / io
def test_build_records_every_tensor(tiny, mask, manifest):
    params = dict(tiny.named_parameters())
    assert list(manifest.tensors) == list(params)  # model order
    for n, p in params.items():
        e = manifest.tensors[n]
        assert e["shape"] == list(p.shape) and e["dtype"] == "float32" and e["numel"] == p.numel()
        assert e["frozen"] == mask.is_frozen(n)
        assert ("sha256" in e) == e["frozen"]
        if e["frozen"]:
            assert e["sha256"] == tensor_sha256(p)
    assert manifest.counts == mask.stats().to_dict()
    assert manifest.base_fingerprint == model_fingerprint(tiny)
    prov = manifest.provenance
    assert prov["method"] == "random" and prov["seed"] == 7 and prov["config"] == {"ratio": 0.4}
    assert prov["version"] == __version__ and prov["created"]
    assert manifest.schema == SCHEMA and manifest.signature is None


def test_build_rejects_a_mask_of_another_model(tiny):
    other = FreezeMask.random(build_unet("small", device="meta"), 0.2)
    with pytest.raises(ManifestError, match="not made for this model") as err:
        Manifest.build(tiny, other)
    assert len(err.value.problems) > 100


def test_save_load_round_trip_and_digest(manifest, tmp_path):
    path = manifest.save(tmp_path / "m.json")
    loaded = Manifest.load(path)
    assert loaded == manifest
    assert loaded.digest() == manifest.digest()
    body = json.loads(path.read_text())
    body.pop("signature")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert manifest.digest() == hashlib.sha256(canonical).hexdigest()

    signed = Manifest.load(path)
    signed.signature = {"alg": "test", "value": "abc"}
    assert signed.digest() == manifest.digest()  # signature is not part of what it signs
    Manifest.load(signed.save(tmp_path / "signed.json"))  # and it survives a round trip
    signed.provenance = {**signed.provenance, "seed": 8}
    assert signed.digest() != manifest.digest()


def _write(tmp_path, obj, name="x.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_load_errors(manifest, tmp_path):
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(_write(tmp_path, '{"schema": '))
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.load(tmp_path / "absent.json")
    good = manifest.to_dict()
    with pytest.raises(ManifestError, match="unsupported manifest schema 'freezeasguard.manifest/0'"):
        Manifest.load(_write(tmp_path, {**good, "schema": "freezeasguard.manifest/0"}))
    partial = {k: v for k, v in good.items() if k not in ("counts", "tensors")}
    with pytest.raises(ManifestError) as err:
        Manifest.load(_write(tmp_path, {**partial, "extra": 1}))
    assert {"missing key 'counts'", "missing key 'tensors'", "unknown key 'extra'"} <= set(err.value.problems)

    tampered = json.loads(json.dumps(good))
    tampered["counts"]["tensors"]["frozen"] -= 1
    with pytest.raises(ManifestError, match="disagree"):
        Manifest.load(_write(tmp_path, tampered))

    broken = json.loads(json.dumps(good))
    first_frozen = manifest.frozen_names[0]
    first_free = next(n for n, e in good["tensors"].items() if not e["frozen"])
    del broken["tensors"][first_frozen]["sha256"]
    broken["tensors"][first_free]["shape"] = [-1]
    with pytest.raises(ManifestError) as err:
        Manifest.load(_write(tmp_path, broken))
    text = "\n".join(err.value.problems)
    assert first_frozen in text and first_free in text  # both reported at once


# ------------------------------------------------------------------------------------- use
def test_mask_from_manifest(tiny, mask, manifest, tmp_path):
    assert manifest.mask() == mask
    assert manifest.mask(build_unet("tiny", device="meta")) == mask  # names/shapes only
    assert load_mask(manifest.save(tmp_path / "m.json"), tiny) == mask
    with pytest.raises(MaskError, match="is a manifest"):  # a plain-mask reader says what to use
        FreezeMask.from_file(tmp_path / "m.json", tiny)


def test_mask_accepts_pairs_and_reports_mismatch_as_mask_error(tiny, mask, manifest, tmp_path):
    assert manifest.mask(iter(list(tiny.named_parameters()))) == mask  # an iterator, read once
    path = manifest.save(tmp_path / "m.json")
    with pytest.raises(MaskError, match="missing tensor"):
        load_mask(path, {n: p for n, p in list(tiny.named_parameters())[1:]})


def test_provenance_must_be_json(tiny, mask):
    with pytest.raises(ManifestError, match="JSON"):
        Manifest.build(tiny, mask, provenance={"method": "random", "config": {"lr": float("nan")}})
    m = Manifest.build(tiny, mask, provenance={"method": "patterns", "config": {"p": ("a*", "b*")}})
    assert m.provenance["config"] == {"p": ["a*", "b*"]}  # as it will read back from disk


def test_check_model_accepts_the_base_model(tiny, manifest):
    manifest.check_model(tiny)
    manifest.check_model(_state(tiny))


def test_check_model_lists_every_problem(tiny, manifest):
    sd = _state(tiny)
    names = list(sd)
    sd["extra.weight"] = torch.zeros(2)
    del sd[names[0]]
    sd[names[1]] = sd[names[1]].reshape(-1)[:-1].clone()
    sd[names[2]] = sd[names[2]].double()
    with pytest.raises(ManifestError) as err:
        manifest.check_model(sd)
    problems = err.value.problems
    assert len(problems) == 5
    text = "\n".join(problems)
    for needle in ("unknown tensor 'extra.weight'", f"missing tensor '{names[0]}'",
                   f"'{names[1]}': shape", f"'{names[2]}': dtype float64", "fingerprint"):
        assert needle in text

    only_values = _state(tiny)
    only_values[names[5]] = _bump(only_values[names[5]])
    with pytest.raises(ManifestError, match="not the same base weights"):
        manifest.check_model(only_values)
    manifest.check_model(only_values, fingerprint=False)
    with pytest.raises(ManifestError, match="meta device"):
        manifest.check_model(build_unet("tiny", device="meta"))


def test_verify_frozen_after_real_fine_tuning(manifest, mask):
    torch.manual_seed(0)
    model = build_unet("tiny")  # same seed as the fixture: the same base weights
    manifest.check_model(model)
    for n, p in model.named_parameters():
        p.requires_grad_(not mask.is_frozen(n))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 32)
    for _ in range(2):
        loss = model(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    report = verify_frozen(manifest, sd)
    assert report.ok and report.checked == len(mask.frozen)
    report.raise_if_failed()
    assert "bit-identical" in report.summary()
    # The fine-tune did change the model: the fingerprint no longer matches the base.
    with pytest.raises(ManifestError, match="fingerprint"):
        manifest.check_model(sd)


def test_verify_frozen_names_each_failure(tiny, manifest):
    frozen = manifest.frozen_names
    sd = _state(tiny)
    sd[frozen[0]] = _bump(sd[frozen[0]])  # one ulp is enough
    del sd[frozen[1]]
    sd[frozen[2]] = sd[frozen[2]].bfloat16()
    sd[frozen[3]] = sd[frozen[3]].reshape(1, -1)
    free = next(n for n in sd if n not in frozen)
    sd[free] = sd[free] + 1  # trainable tensors may change
    report = verify_frozen(manifest, sd)
    assert not report.ok
    assert report.hash_mismatch == [frozen[0]]
    assert report.missing == [frozen[1]]
    assert report.dtype_mismatch == [frozen[2]]
    assert report.shape_mismatch == [frozen[3]]
    assert "dtype bfloat16, manifest has float32" in report.details[frozen[2]]
    with pytest.raises(ManifestError, match="4 of"):
        report.raise_if_failed()
