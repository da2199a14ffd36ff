"""File modes: results follow the umask like any new file; keys are 0600 from their first byte."""
import os
import stat
import subprocess
import sys

import pytest

from freezeasguard.engine.io import atomic_dir, atomic_write_bytes, atomic_write_json, current_umask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def test_current_umask_reads_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_results_get_the_mode_the_umask_gives(tmp_path, umask, mask):
    umask(mask)
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"x")) == 0o666 & ~mask
    assert _mode(atomic_write_json(tmp_path / "m.json", {"a": 1})) == 0o666 & ~mask
    with atomic_dir(tmp_path / "model") as d:
        (d / "w").write_bytes(b"w")
    assert _mode(tmp_path / "model") == 0o777 & ~mask
    # a rewrite gets the umask's mode too, not the old file's
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"y")) == 0o666 & ~mask


def test_private_writes_are_0600_whatever_the_umask(tmp_path, umask):
    umask(0o000)
    assert _mode(atomic_write_bytes(tmp_path / "k", b"secret", private=True)) == 0o600


def test_keygen_writes_the_key_0600_and_its_public_half_as_the_umask_says(tmp_path):
    r = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m freezeasguard.engine.cli keygen --out "$1" --public "$2"',
                        sys.executable, str(tmp_path / "k.key"), str(tmp_path / "k.pem")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _mode(tmp_path / "k.key") == 0o600
    assert _mode(tmp_path / "k.pem") == 0o644
    r = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m freezeasguard.engine.cli keygen --algorithm hmac-sha256 '
                        '--out "$1"', sys.executable, str(tmp_path / "h.key")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert _mode(tmp_path / "h.key") == 0o600
