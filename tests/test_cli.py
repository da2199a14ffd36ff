import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "freezeasguard.engine.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_finetune_writes_a_model_that_reloads_and_generates(tmp_path):
    out = tmp_path / "ft"
    r = run("finetune", "--preset", "tiny", "--data", "digits", "--steps", "20", "--out", str(out),
            "--set", "train.progress=false", "--set", "data.domains=[one,seven]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final" / "unet").is_dir()
    r = run("generate", "--model", str(out / "final"), "--prompt", "a photo of the digit seven",
            "--num", "2", "--steps", "3", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (256, 128)  # 16 px samples, enlarged for viewing


def test_config_typo_is_a_clear_error(tmp_path):
    r = run("finetune", "--preset", "tiny", "--data", "digits", "--set", "train.lrr=1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "unknown config key 'train.lrr'; did you mean 'lr'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_folder_is_a_clear_error(tmp_path):
    r = run("finetune", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.slow
def test_keygen_and_sign_a_manifest(tmp_path):
    from freezeasguard.engine.errors import SignatureError
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.guard.mask import FreezeMask
    from freezeasguard.engine.model.components import build_components
    from freezeasguard.engine.service.signing import load_key, verify_manifest

    c = build_components("tiny", seed=0)
    Manifest.build(c.unet, FreezeMask.random(c.unet, 0.3)).save(tmp_path / "m.json")
    r = run("keygen", "--out", str(tmp_path / "k.key"), "--public", str(tmp_path / "k.pem"))
    assert r.returncode == 0, r.stderr
    assert run("keygen", "--out", str(tmp_path / "k.key")).returncode == 2  # never overwrites a key
    r = run("sign", "--manifest", str(tmp_path / "m.json"), "--key", str(tmp_path / "k.key"),
            "--out", str(tmp_path / "signed.json"))
    assert r.returncode == 0, r.stderr
    signed = Manifest.load(tmp_path / "signed.json")
    verify_manifest(signed, load_key(tmp_path / "k.pem"))  # the service needs only the public half
    signed.counts["frozen_tensors"] = 0  # edited after signing
    import pytest

    with pytest.raises(SignatureError):
        verify_manifest(signed, load_key(tmp_path / "k.pem"))
