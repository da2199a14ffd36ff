"""The subspace guard: locks on *directions* inside trainable tensors, and their proof.

A lock on a weight (a matrix ``m x n``; a conv kernel read as ``out x in*k*k``) holds an orthonormal
basis ``U`` (``m x r``: output directions) and/or ``V`` (``n x s``: input directions). Fine-tuning
may move the weight anywhere *except* along them: ``U^T (W - W0) = 0`` and ``(W - W0) V = 0``. The
optimizer enforces it by projecting every update (``optim.project``); for LoRA, ``U^T B = 0`` and
``A V = 0`` make every merged ``B A`` respect it exactly. A lock removes ``r n + s m - r s`` degrees
of freedom from its tensor (``dof``).

The bases live in a safetensors file beside the manifest (``manifest.locks.safetensors`` unless
built with another ``lock_file``; saving refuses to replace another manifest's bases); the
manifest records, under its signature, each lock's sides, ranks and the SHA-256 of each basis.
The proof after a job is the residual ``sqrt(||U^T D||^2 + ||D V||^2)`` of ``D = W - W0`` against
``residual_tolerance``: what fp32 rounding can add over the job's steps, nothing more.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from freezeasguard.engine.errors import ManifestError
from freezeasguard.engine.guard.hashing import NamedTensors, named_tensors, tensor_sha256
from freezeasguard.engine.io import save_safetensors_atomic
from freezeasguard.kernels.project import as_matrix, locked_energy

LOCKS_FORMAT = "freezeasguard.locks/1"
SIDES = ("out", "in")
ORTHONORMAL_TOL = 1e-4  # max |B^T B - I| a basis may show (fp32 QR gives ~1e-6)
UNIT_ROUNDOFF = 2.0 ** -24  # fp32


def residual_tolerance(steps: int, base_norm: float, delta_norm: float) -> float:
    """The largest residual fp32 training arithmetic can leave after ``steps`` projected updates.

    Each step stores ``old + P(d)`` rounded to fp32: at most ``u |w|`` per element (``u = 2^-24``),
    i.e. at most ``u ||W||`` of norm per step, all of which may land in locked directions; the check
    itself runs in float64 (its own rounding is negligible). Hence ``u (steps + 1) (||W0|| + ||D||)``,
    doubled as a margin: about ``1.2e-7 * steps`` of the weight's norm. The bound is worst-case and
    grows with the steps (typical rounding grows like ``sqrt(steps)`` and stays far below it), so a
    job's proof is as tight as its step count: at 100 steps a locked-direction change above ~1e-5
    of ``||W0||`` is caught, at the default merge cap of 1000 steps above ~1e-4.
    """
    return 2.0 * UNIT_ROUNDOFF * (steps + 1) * (base_norm + delta_norm)


@dataclass
class TensorLock:
    """The lock on one tensor: ``out`` (``m x r``) and/or ``inp`` (``n x s``), orthonormal columns."""

    shape: tuple[int, ...]
    out: torch.Tensor | None = None
    inp: torch.Tensor | None = None

    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def ranks(self) -> tuple[int, int]:
        return (0 if self.out is None else self.out.shape[1], 0 if self.inp is None else self.inp.shape[1])

    @property
    def dof(self) -> int:
        r, s = self.ranks
        return r * self.n + s * self.m - r * s

    def bases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.out, self.inp

    def energy(self, delta: torch.Tensor) -> float:
        """``||U^T D||^2 + ||D V||^2`` of a delta shaped like the tensor."""
        d = as_matrix(delta.detach().double())
        return float(locked_energy(d, *[None if b is None else b.to(d.device, torch.float64) for b in self.bases()]))

    def problems(self, name: str) -> list[str]:
        out = []
        if len(self.shape) < 2:
            out.append(f"lock {name!r}: only tensors with 2+ dimensions can be locked, shape {list(self.shape)}")
            return out
        if self.out is None and self.inp is None:
            out.append(f"lock {name!r}: no basis")
        for side, b, dim in (("out", self.out, self.m), ("in", self.inp, self.n)):
            if b is None:
                continue
            if b.dim() != 2 or b.shape[0] != dim or not 0 < b.shape[1] <= dim:
                out.append(f"lock {name!r}: {side} basis of shape {list(b.shape)} does not fit "
                           f"{self.m} x {self.n}")
            elif b.dtype != torch.float32 or not bool(torch.isfinite(b).all()):
                out.append(f"lock {name!r}: {side} basis must be finite float32")
            else:
                err = float((b.mT @ b - torch.eye(b.shape[1])).abs().max())
                if err > ORTHONORMAL_TOL:
                    out.append(f"lock {name!r}: {side} basis is not orthonormal (|B^T B - I| = {err:.2g})")
        return out


def _key(name: str, side: str) -> str:
    return f"{name}::{side}"


@dataclass
class SubspaceLock:
    """Locks by tensor name. ``locks[name]`` is a ``TensorLock``."""

    locks: dict[str, TensorLock] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.locks)

    def __contains__(self, name: str) -> bool:
        return name in self.locks

    def bases(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        return {n: lk.bases() for n, lk in self.locks.items()}

    @property
    def dof(self) -> int:
        return sum(lk.dof for lk in self.locks.values())

    def problems(self, model: NamedTensors | None = None) -> list[str]:
        out = [p for n, lk in self.locks.items() for p in lk.problems(n)]
        if model is not None:
            tensors = named_tensors(model)
            for n, lk in self.locks.items():
                t = tensors.get(n)
                if t is None:
                    out.append(f"lock {n!r}: not a tensor of the model")
                elif tuple(t.shape) != lk.shape:
                    out.append(f"lock {n!r}: shape {list(lk.shape)}, the model's tensor is {list(t.shape)}")
        return out

    def counts(self, model: NamedTensors) -> dict[str, Any]:
        """Locked degrees of freedom against the model's matrix parameters and all its parameters."""
        tensors = named_tensors(model)
        matrix = sum(t.numel() for t in tensors.values() if t.dim() >= 2)
        total = sum(t.numel() for t in tensors.values())
        return {"tensors": len(self.locks), "dof": self.dof, "matrix_params": matrix, "params": total,
                "matrix_ratio": self.dof / matrix if matrix else 0.0, "ratio": self.dof / total if total else 0.0}

    def entries(self) -> dict[str, dict[str, Any]]:
        """The manifest's record of each lock: shape, dof, and per side its rank and basis SHA-256."""
        out: dict[str, dict[str, Any]] = {}
        for n, lk in self.locks.items():
            e: dict[str, Any] = {"shape": list(lk.shape), "dof": lk.dof}
            for side, b in zip(SIDES, lk.bases()):
                if b is not None:
                    e[side] = {"rank": int(b.shape[1]), "sha256": tensor_sha256(b.contiguous())}
            out[n] = e
        return out

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {_key(n, s): b.contiguous() for n, lk in self.locks.items()
                   for s, b in zip(SIDES, lk.bases()) if b is not None}
        return save_safetensors_atomic(tensors, path, metadata={"format": LOCKS_FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike, entries: Mapping[str, Mapping[str, Any]]) -> "SubspaceLock":
        """Read a locks file and check every basis against the manifest's ``entries`` (SHA-256, rank,
        shape); a file with a basis the manifest does not list, or without one it lists, is refused."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"locks file {str(path)!r} does not exist (the manifest names it)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ManifestError(f"locks file {str(path)!r} cannot be read: {exc}") from None
        problems = []
        if meta.get("format") != LOCKS_FORMAT:
            problems.append(f"not a locks file (format {meta.get('format')!r})")
        want = {_key(n, s) for n, e in entries.items() for s in SIDES if s in e}
        problems += [f"basis {k!r} is in the file but not in the manifest" for k in sorted(set(tensors) - want)]
        problems += [f"basis {k!r} is in the manifest but not in the file" for k in sorted(want - set(tensors))]
        locks: dict[str, TensorLock] = {}
        for n, e in entries.items():
            sides = []
            for s in SIDES:
                b = tensors.get(_key(n, s)) if s in e else None
                if b is not None:
                    if tensor_sha256(b) != e[s]["sha256"]:
                        problems.append(f"lock {n!r}: {s} basis bytes differ from the manifest (sha256 mismatch)")
                    elif b.dim() != 2 or b.shape[1] != e[s]["rank"]:
                        problems.append(f"lock {n!r}: {s} basis of shape {list(b.shape)}, manifest says rank "
                                        f"{e[s]['rank']}")
                sides.append(b)
            lk = TensorLock(tuple(e["shape"]), sides[0], sides[1])
            locks[n] = lk
            if not problems:
                problems += lk.problems(n)
                if not lk.problems(n) and lk.dof != e["dof"]:
                    problems.append(f"lock {n!r}: dof {lk.dof}, manifest says {e['dof']}")
        if problems:
            raise ManifestError(f"locks file {str(path)!r} does not match the manifest:", problems)
        return cls(locks)


@dataclass
class LockResidual:
    name: str
    residual: float
    tolerance: float
    delta_norm: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.residual) and self.residual <= self.tolerance

    def describe(self) -> str:
        share = f" ({(self.residual / self.delta_norm) ** 2:.2e} of the update's energy)" \
            if math.isfinite(self.delta_norm) and self.delta_norm > 0 else ""
        return f"{self.name!r}: locked-direction residual {self.residual:.3g} > tolerance {self.tolerance:.3g}{share}"


def lock_residuals(lock: SubspaceLock, deltas: Mapping[str, torch.Tensor], base_norms: Mapping[str, float],
                   steps: int) -> list[LockResidual]:
    """The residual of every locked tensor's delta (a missing delta counts as unchanged)."""
    out = []
    for n, lk in lock.locks.items():
        d = deltas.get(n)
        if d is None:
            continue
        dn = float(d.detach().float().norm())
        res = math.sqrt(max(lk.energy(d), 0.0))
        out.append(LockResidual(n, res, residual_tolerance(steps, base_norms[n], dn), dn))
    return out


@dataclass
class LockAnchors:
    """What the proof of a job needs from the base, taken before training: each locked tensor's
    coordinates along its locked directions (``U^T W0``, ``W0 V``, float64 on the host: as many
    numbers as the lock's dof) and its norm. No copy of the base weights is kept."""

    coords: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    norms: dict[str, float]

    @classmethod
    @torch.no_grad()
    def of(cls, lock: SubspaceLock, model: NamedTensors) -> "LockAnchors":
        tensors = named_tensors(model)
        coords, norms = {}, {}
        for n, lk in lock.locks.items():
            coords[n] = _coords(lk, tensors[n])
            norms[n] = float(tensors[n].detach().double().norm())
        return cls(coords, norms)

    @torch.no_grad()
    def residuals(self, lock: SubspaceLock, model: NamedTensors, steps: int) -> list[LockResidual]:
        tensors = named_tensors(model)
        out = []
        for n, lk in lock.locks.items():
            now = _coords(lk, tensors[n])
            e = sum(float((a - b).square().sum()) for a, b in zip(now, self.coords[n]) if a is not None)
            wn = float(tensors[n].detach().double().norm())
            # ||D|| <= ||W|| + ||W0|| bounds the delta term of the tolerance without the base
            out.append(LockResidual(n, math.sqrt(e), residual_tolerance(steps, self.norms[n], wn + self.norms[n]),
                                    float("nan")))
        return out


def _coords(lk: TensorLock, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = as_matrix(t.detach().double())
    u, v = (None if b is None else b.to(w.device, torch.float64) for b in lk.bases())
    return (None if u is None else (u.mT @ w).cpu(), None if v is None else (w @ v).cpu())


def random_lock(model: NamedTensors, ratio: float, *, side: str = "out", seed: int = 0,
                skip: frozenset[str] = frozenset()) -> SubspaceLock:
    """A seeded random lock of ``ratio`` of each matrix's side (the control of a learned lock)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    g = torch.Generator().manual_seed(seed)
    locks = {}
    for n, t in named_tensors(model).items():
        if t.dim() < 2 or n in skip:
            continue
        m, k = t.shape[0], t.numel() // t.shape[0]
        dim = m if side == "out" else k
        r = int(round(ratio * dim))
        if r <= 0:
            continue
        q = torch.linalg.qr(torch.randn(dim, r, generator=g))[0].contiguous()
        locks[n] = TensorLock(tuple(t.shape), q if side == "out" else None, q if side == "in" else None)
    return SubspaceLock(locks)
