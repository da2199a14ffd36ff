import subprocess
import sys

CLI = [sys.executable, "-m", "freezeasguard.engine.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, **kw)


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

    assert Image.open(tmp_path / "s.png").size == (32, 16)


def test_config_typo_is_a_clear_error(tmp_path):
    r = run("finetune", "--preset", "tiny", "--set", "train.lrr=1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "unknown config key 'train.lrr'; did you mean 'lr'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_folder_is_a_clear_error(tmp_path):
    r = run("finetune", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
