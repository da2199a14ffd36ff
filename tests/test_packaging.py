import subprocess
import sys

import pytest


def test_packages_import_through_freezeasguard():
    import freezeasguard.engine as engine
    import freezeasguard.kernels as kernels

    assert engine.__version__
    assert kernels.__name__ == "freezeasguard.kernels"


def test_no_bare_engine_package_installed():
    # engine/ and kernels/ must only be importable under the freezeasguard namespace
    code = "import importlib.util,sys; sys.path=[p for p in sys.path if p not in ('', '.')]; " \
           "print(importlib.util.find_spec('engine') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "True"


def test_backends_report_reason_when_unusable():
    from freezeasguard.engine.backends import all_backends

    for b in all_backends():
        assert b.name in ("triton", "xformers", "bitsandbytes", "nvml")
        assert b.reason, b
        assert ("usable" in str(b))


def test_nvml_unavailable_without_driver(monkeypatch):
    import torch

    from freezeasguard.engine.backends import nvml_backend

    if torch.cuda.is_available():
        pytest.skip("a driver is present")
    b = nvml_backend()
    assert not b.available and "nvml" in b.reason.lower() or "import" in b.reason


@pytest.mark.slow
def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "freezeasguard.engine.cli", "info"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "diffusers", "device", "triton", "xformers", "bitsandbytes", "nvml"):
        assert word in out.stdout
