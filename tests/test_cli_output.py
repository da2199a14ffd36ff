"""What the commands print and write: which folder a failed proof blames, what a lock-only proof
claims, the outputs an audit re-hashed, the paths a job prints, and a grid big enough to see."""
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from freezeasguard.engine.cli.main import main as cli_main
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.model.components import build_components, save_components
from freezeasguard.engine.service import run as service_run
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.joblog import append_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = build_components("tiny", seed=0)
    save_components(base, root / "base")
    save_components(build_components("tiny", seed=1), root / "other")
    lock = random_lock(base.unet, 0.25, seed=0)
    Manifest.build(base.unet, FreezeMask.from_names(base.unet, []), provenance={"method": "random"},
                   lock=lock).save(root / "lock.json", lock=lock)
    return root


def test_verify_with_the_wrong_base_names_that_folder_and_why(capsys, models):
    rc, out, err = _run(capsys, "verify", "--manifest", models / "lock.json", "--model", models / "base",
                        "--base", models / "other")
    assert rc == 2
    head = err.splitlines()[0]
    assert f"--base {models / 'other'} does not match {models / 'lock.json'}" in head
    assert f"--model {models / 'base'} fits the manifest" in head
    assert "not the same base weights" in err  # how: the fingerprint of other weights


def test_a_lock_only_proof_says_what_it_proved(capsys, models):
    rc, out, err = _run(capsys, "verify", "--manifest", models / "lock.json", "--model", models / "base",
                        "--base", models / "base", "--steps", 1)
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("no tensor is frozen by this manifest; all ")
    assert "locked tensors within tolerance of their locked directions" in last
    assert "all 0 frozen" not in out


def test_generate_enlarges_the_grid_for_viewing_and_keeps_the_raw_samples(capsys, models, tmp_path):
    common = ("generate", "--model", models / "base", "--prompt", "a photo of the digit seven", "--num", 2,
              "--steps", 1)
    rc, out, err = _run(capsys, *common, "--out", tmp_path / "big.png", "--raw", tmp_path / "raw")
    assert rc == 0, err
    assert Image.open(tmp_path / "big.png").size == (2 * 128, 128)  # 16 px samples, 8x by nearest neighbour
    raw = sorted((tmp_path / "raw").glob("*.png"))
    assert [p.name for p in raw] == ["000.png", "001.png"]
    assert all(Image.open(p).size == (16, 16) for p in raw)
    assert "enlarged 8x" in out
    rc, out, err = _run(capsys, *common, "--out", tmp_path / "small.png", "--cell", 0)
    assert rc == 0, err
    assert Image.open(tmp_path / "small.png").size == (32, 16)
    # the enlargement is nearest neighbour: every 8x8 block of the big grid is one raw pixel
    big = Image.open(tmp_path / "big.png").convert("RGB")
    small = Image.open(tmp_path / "small.png").convert("RGB")
    assert big.resize(small.size, Image.NEAREST).tobytes() == small.tobytes()
    assert all(big.getpixel((8 * x + dx, 8 * y + dy)) == small.getpixel((x, y))
               for x in range(32) for y in range(16) for dx in (0, 7) for dy in (0, 7))


def test_audit_outputs_lists_the_outputs_it_rehashed(capsys, tmp_path):
    key = signing.new_hmac_key()
    signing.save_key(key, tmp_path / "log.key")
    delta = tmp_path / "job" / "delta.safetensors"
    delta.parent.mkdir()
    delta.write_bytes(b"delta bytes")
    record = {"schema": "freezeasguard.job/1", "job_id": "j1", "status": "completed", "spec": {}, "config": {},
              "dataset": {}, "manifest": {}, "base": {}, "verify": {"ok": True},
              "output": {"path": str(delta), "sha256": hashlib.sha256(b"delta bytes").hexdigest()}}
    append_record(tmp_path / "jobs.jsonl", record, key)
    rc, plain, err = _run(capsys, "audit", tmp_path / "jobs.jsonl", "--key", tmp_path / "log.key")
    assert rc == 0, err
    rc, checked, err = _run(capsys, "audit", tmp_path / "jobs.jsonl", "--outputs", "--key", tmp_path / "log.key")
    assert rc == 0, err
    assert checked.startswith(plain) and checked != plain
    assert f"output of job j1: {delta} matches its recorded sha256" in checked
    assert "outputs: 1 completed job output(s) re-hashed" in checked
    assert "output of job" not in plain


def test_job_submit_prints_every_path_absolute(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("runs/jobs/j1")  # the service hands back the folder as the user named it
    record = {"job_id": "j1", "verify": {"summary": "no tensor is frozen by this manifest; "
                                                    "all 3 locked tensors within tolerance"},
              "output": {"path": str((out / "delta.safetensors").absolute()), "sha256": "ab" * 32, "tensors": 3}}
    fake = SimpleNamespace(record=record, out=out, log_entry={"seq": 0, "hash": "cd" * 32})
    monkeypatch.setattr(service_run, "submit", lambda *a, **k: fake)
    rc, stdout, err = _run(capsys, "job", "submit", "job.yaml", "--policy", "p.yaml", "--manifest", "m.json",
                           "--base", "base")
    assert rc == 0, err
    lines = {ln.split()[0]: ln.split()[1] for ln in stdout.splitlines()[1:3]}
    assert lines["delta"] == str(tmp_path / out / "delta.safetensors")
    assert lines["record"] == str(tmp_path / out / "record.json")
    assert stdout.startswith("job j1: no tensor is frozen by this manifest; all 3 locked tensors")
