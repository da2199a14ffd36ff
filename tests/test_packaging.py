"""How the package installs and imports: the wheel holds every module, every entry point imports
from any working directory (the repository root included), and the top-level ``engine/`` and
``kernels/`` folders never shadow an installed distribution of the same name."""
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"freezeasguard/engine": ROOT / "engine", "freezeasguard/kernels": ROOT / "kernels"}


def _run(args, cwd, env=None, timeout=180):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_packages_import_through_freezeasguard():
    import freezeasguard.kernels.adamw as adamw
    from freezeasguard.engine.version import __version__

    assert __version__ == importlib.metadata.version("freezeasguard")
    assert adamw.__name__ == "freezeasguard.kernels.adamw"


def test_no_bare_engine_package_installed():
    # engine/ and kernels/ are importable only under the freezeasguard namespace
    code = "import importlib.util,sys; sys.path=[p for p in sys.path if p not in ('', '.')]; " \
           "print(importlib.util.find_spec('engine') is None, importlib.util.find_spec('bench') is None)"
    out = _run([sys.executable, "-c", code], cwd="/")
    assert out.stdout.strip() == "True True", out.stderr


@pytest.mark.parametrize("name", ["kernels", "engine"])
def test_top_level_folders_never_shadow_an_installed_package(tmp_path, name):
    # As it happened: Hugging Face's `kernels` installed, Python run from the repository root (so
    # the root is sys.path[0]); the project's own kernels/ was found first and transformers failed
    # with "cannot import name 'CUDAProperties' from 'kernels' (<repo>/kernels/__init__.py)". The
    # stand-in below is a regular package of that name on PYTHONPATH, behind the root on sys.path.
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("CUDAProperties = 'the installed one'\n")
    env = {"PYTHONPATH": str(site)}
    code = f"import {name}; print({name}.CUDAProperties)"
    out = _run([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "the installed one", out.stderr[-2000:]
    out = _run([sys.executable, "-m", "freezeasguard.engine.cli", "--version"], cwd=ROOT, env=env)
    assert out.returncode == 0 and "freezeasguard" in out.stdout, out.stderr[-2000:]


def test_transformers_imports_from_the_repository_root_beside_hugging_faces_kernels():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here (transformers did not pull it in)")
    code = ("import transformers.integrations.hub_kernels, kernels, freezeasguard.kernels.adamw; "
            "from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel; "
            "assert 'site-packages' in kernels.__file__, kernels.__file__; print('ok')")
    out = _run([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _source_modules() -> set[str]:
    return {f"{pkg}/{p.relative_to(folder).as_posix()}" for pkg, folder in SOURCES.items()
            for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.mark.slow
def test_the_wheel_holds_and_imports_every_module(tmp_path):
    # built from a copy of the tracked files: a build in place would leave build/ in the checkout
    src = tmp_path / "src"
    listed = _run(["git", "ls-files", "-z"], cwd=ROOT)
    tracked = [f for f in listed.stdout.split("\0") if f] if listed.returncode == 0 else None
    if tracked is None:  # not a git checkout (an sdist): the folders the build reads
        tracked = [str(p.relative_to(ROOT)) for d in ("engine", "kernels") for p in (ROOT / d).rglob("*.py")]
        tracked += ["pyproject.toml", "setup.py", "README.md"]
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((ROOT / rel).read_bytes())
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                str(tmp_path), str(src)], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("freezeasguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "unpacked")
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules left out of the wheel: {missing}"
    modules = sorted(n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in _source_modules()
                     if not n.endswith("__main__.py"))  # runs the CLI
    # -S: no site hooks, so the editable install's finder cannot serve these from the source tree
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import importlib, sys; sys.path[:0] = sys.argv[1:3]; "
            f"mods = {modules!r}; files = [importlib.import_module(m).__file__ for m in mods]; "
            "bad = [f for f in files if not f.startswith(sys.argv[1])]; print(len(files), bad)")
    out = _run([sys.executable, "-S", "-c", code, str(tmp_path / "unpacked"), site_dirs[0]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"{len(modules)} []", out.stdout


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
    out = _run([sys.executable, "-m", "freezeasguard.engine.cli", "info"], cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "diffusers", "device", "triton", "xformers", "bitsandbytes", "nvml"):
        assert word in out.stdout
