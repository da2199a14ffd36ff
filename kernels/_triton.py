"""Whether Triton can run here, probed once, for the kernels of this package.

Triton runs on CUDA, or on the CPU through its interpreter (``TRITON_INTERPRET=1``, set before any
``@triton.jit`` function is defined). A kernel module defines its ``@triton.jit`` functions only
when ``HAS_TRITON`` (the package imports), and launches them only where ``blocker`` says nothing
stands in the way; everywhere else its pure-torch reference runs. Every launcher reads its
``backend`` argument through ``resolve_backend``, so 'auto' means the same for every kernel.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

from freezeasguard.kernels.choices import BACKENDS


@dataclass(frozen=True)
class TritonStatus:
    """Whether Triton kernels can run here, its version if it imports, and why (not)."""

    available: bool
    version: str | None
    reason: str


def interpreting() -> bool:
    """Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def status() -> TritonStatus:
    try:
        mod = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return TritonStatus(False, None, f"import failed: {type(exc).__name__}: {exc}".splitlines()[0])
    ver = getattr(mod, "__version__", None)
    if torch.cuda.is_available():
        return TritonStatus(True, ver, "CUDA device present")
    if interpreting():
        return TritonStatus(True, ver, "CPU interpreter (TRITON_INTERPRET=1): correct but slow")
    return TritonStatus(False, ver, "no CUDA device and TRITON_INTERPRET is not 1")


# The kernel modules define their @triton.jit functions under this flag.
HAS_TRITON = status().version is not None


def blocker(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on buffers on ``device`` (None when they can)."""
    st = status()
    if not st.available:
        return st.reason
    if device.type != "cuda" and not interpreting():
        return f"tensors are on {device} and TRITON_INTERPRET is not 1"
    return None


def resolve_backend(backend: str, device: torch.device, what: str, *, choices: tuple[str, ...] = BACKENDS,
                    eager: str = "torch") -> tuple[str, str]:
    """The implementation a launcher runs on buffers on ``device``, and why; every kernel's and
    the engine's optimizer's one reading of the backend names.

    'auto' is the Triton kernel for CUDA tensors where Triton runs, and ``eager`` (the caller's
    eager form) everywhere else: never the CPU interpreter, which is correct but far too slow to
    train with (tests name 'triton' to run it there). 'triton' runs wherever Triton can and raises
    the reason where it cannot; any other name in ``choices`` is kept as given.
    """
    if backend not in choices:
        raise ValueError(f"{what} backend must be one of {choices}, got {backend!r}")
    if backend == "triton":
        why = blocker(device)
        if why is not None:
            raise requested_error(what, why)
        return "triton", "requested"
    if backend != "auto":
        return backend, "requested"
    if device.type != "cuda":
        return eager, device.type
    why = blocker(device)
    if why is None:
        return "triton", "CUDA: one Triton launch"
    return eager, f"CUDA without Triton ({why})"


def requested_error(what: str, why: str) -> RuntimeError:
    """The error of a kernel whose 'triton' backend was asked for but cannot run."""
    return RuntimeError(
        f"{what} backend 'triton' requested but it cannot run: {why}. Move the buffers to a CUDA "
        "device, set TRITON_INTERPRET=1 before importing triton (slow, CPU testing only), or use "
        "backend='auto'/'torch'.")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes."""
    return 1 << max(0, n - 1).bit_length()


def flat_buffer_problem(name: str, t: object) -> str | None:
    """Why ``t`` cannot be one of a kernel's flat buffers (a 1-D contiguous tensor), or None. Each
    launcher raises its own error class with it, then checks dtypes and sizes its op needs."""
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if t.dim() != 1:
        return f"{name} must be a flat 1-D buffer, got shape {tuple(t.shape)}"
    if not t.is_contiguous():
        return f"{name} must be contiguous (stride {t.stride()})"
    return None
