"""Availability of optional backends, probed once, with the reason when one is unusable.

Every optional dependency (triton, xformers, bitsandbytes, NVML) is looked up here and only
here, so the rest of the package imports cleanly on a CPU machine that lacks any of them and
asks one place which backend to use.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from dataclasses import dataclass

import torch


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


def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"import failed: {type(exc).__name__}: {exc}".splitlines()[0]


@functools.lru_cache(maxsize=None)
def triton_backend() -> Backend:
    """Triton runs on CUDA, or on CPU through its interpreter (TRITON_INTERPRET=1)."""
    mod, err = _import("triton")
    if mod is None:
        return Backend("triton", False, None, err)
    ver = getattr(mod, "__version__", None)
    if torch.cuda.is_available():
        return Backend("triton", True, ver, "CUDA device present")
    if triton_interpreting():
        return Backend("triton", True, ver, "CPU interpreter (TRITON_INTERPRET=1): correct but slow")
    return Backend("triton", False, ver, "no CUDA device and TRITON_INTERPRET is not 1")


def triton_interpreting() -> bool:
    """Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_blocker(device: torch.device, tb: Backend) -> str | None:
    """Why Triton kernels cannot run on buffers on ``device`` (None when they can)."""
    if not tb.available:
        return tb.reason
    if device.type != "cuda" and not triton_interpreting():
        return f"tensors are on {device} and TRITON_INTERPRET is not 1"
    return None


def triton_requested_error(what: str, why: str) -> RuntimeError:
    """The error of a kernel whose 'triton' backend was asked for but cannot run."""
    return RuntimeError(
        f"{what} backend 'triton' requested but it cannot run: {why}. Move the buffers to a CUDA "
        "device, set TRITON_INTERPRET=1 before importing triton (slow, CPU testing only), or use "
        "backend='auto'/'torch'.")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes."""
    return 1 << max(0, n - 1).bit_length()


def triton_importable() -> bool:
    """Triton imports (it may still be unable to run here: no CUDA and no interpreter), so kernel
    modules can define their ``@triton.jit`` functions."""
    tb = triton_backend()
    return tb.available or tb.version is not None


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
    import logging

    # bitsandbytes logs a warning about optional kernel hubs on import; it is not an error here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
