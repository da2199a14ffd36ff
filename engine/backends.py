"""Availability of optional backends, probed once, with the reason when one is unusable.

Every optional dependency (triton, xformers, bitsandbytes, NVML) is looked up here and only
here, so the rest of the package imports cleanly on a CPU machine that lacks any of them and
asks one place which backend to use.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass

import torch

from freezeasguard.kernels._triton import status as triton_status


@dataclass(frozen=True)
class Backend:
    """One optional backend: whether it can run here, and why not when it cannot."""

    name: str
    available: bool
    version: str | None
    reason: str

    def __str__(self) -> str:
        state = "usable" if self.available else "unusable"
        ver = f" {self.version}" if self.version else ""
        return f"{self.name}{ver}: {state} ({self.reason})"


def quiet_import_warnings() -> None:
    """Silence what xformers and bitsandbytes log when diffusers imports them where they cannot run.

    diffusers imports both whenever they are installed; without CUDA extensions for this torch
    (xformers) or 4-bit CPU kernels (bitsandbytes) they log warnings on every model load.
    ``freezeasguard info`` says what each backend can do here, and the engine logs which attention
    and optimizer run, and why, when it runs. bitsandbytes' CPU backend also asks the Hugging Face
    kernels hub for a 4-bit GEMM kernel the engine never uses, which offline (HF_HUB_OFFLINE=1) logs
    a trust-check warning on every model load. Called by the subpackages that import diffusers."""
    for name in ("xformers", "bitsandbytes", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"import failed: {type(exc).__name__}: {exc}".splitlines()[0]


def triton_backend() -> Backend:
    """Triton runs on CUDA, or on CPU through its interpreter (TRITON_INTERPRET=1); the kernels
    package probes it (``freezeasguard.kernels._triton``)."""
    st = triton_status()
    return Backend("triton", st.available, st.version, st.reason)


@functools.lru_cache(maxsize=None)
def xformers_backend() -> Backend:
    """xformers' memory-efficient attention only has CUDA kernels."""
    try:
        ver = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return Backend("xformers", False, None, "not installed (pip install xformers)")
    if not torch.cuda.is_available():
        # Importing it here only prints a warning about missing CUDA extensions.
        return Backend("xformers", False, ver, "installed, but its attention kernels need CUDA")
    ops, err = _import("xformers.ops")
    if ops is None:
        return Backend("xformers", False, ver, err)
    try:  # a wheel built for another torch/CUDA imports but fails at the first call
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        ops.memory_efficient_attention(q, q, q)
    except Exception as exc:
        return Backend("xformers", False, ver, f"kernel test failed: {type(exc).__name__}: {exc}"[:200])
    return Backend("xformers", True, ver, "CUDA kernels load and run")


@functools.lru_cache(maxsize=None)
def bitsandbytes_backend() -> Backend:
    """bitsandbytes 8-bit optimizers (it has a CPU backend since 0.45)."""
    mod, err = _import("bitsandbytes")
    if mod is None:
        return Backend("bitsandbytes", False, None, err)
    ver = getattr(mod, "__version__", None)
    if not hasattr(getattr(mod, "optim", None), "AdamW8bit"):
        return Backend("bitsandbytes", False, ver, "bitsandbytes.optim.AdamW8bit missing")
    where = "CUDA" if torch.cuda.is_available() else "CPU backend"
    return Backend("bitsandbytes", True, ver, f"AdamW8bit present ({where})")


@functools.lru_cache(maxsize=None)
def nvml_backend() -> Backend:
    """NVML (nvidia-ml-py) for device memory, utilisation, power and energy counters."""
    mod, err = _import("pynvml")
    if mod is None:
        return Backend("nvml", False, None, err)
    try:
        mod.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound without a driver
        return Backend("nvml", False, None, f"nvmlInit failed: {type(exc).__name__}: {exc}")
    try:
        ver = mod.nvmlSystemGetDriverVersion()
        ver = ver.decode() if isinstance(ver, bytes) else str(ver)
        n = mod.nvmlDeviceGetCount()
    finally:
        mod.nvmlShutdown()
    return Backend("nvml", True, f"driver {ver}", f"{n} device(s)")


def all_backends() -> list[Backend]:
    return [triton_backend(), xformers_backend(), bitsandbytes_backend(), nvml_backend()]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
