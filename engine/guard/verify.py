"""The proof of a guard: every frozen tensor of a model is bit-identical to its manifest, and every
locked tensor moved only outside its locked directions (``add_lock_residuals``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from freezeasguard.engine.errors import ManifestError
from freezeasguard.engine.guard.hashing import NamedTensors, dtype_name, named_tensors, tensor_sha256
from freezeasguard.engine.guard.manifest import Manifest


@dataclass
class VerifyReport:
    """Outcome of ``verify_frozen``: which frozen tensors are not bit-identical to the base."""

    checked: int
    hash_mismatch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    locks_checked: int = 0
    lock_violation: list[str] = field(default_factory=list)
    max_lock_residual: float = 0.0  # largest residual / tolerance seen

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[str]:
        return self.missing + self.shape_mismatch + self.dtype_mismatch + self.hash_mismatch + self.lock_violation

    def summary(self) -> str:
        locks = "" if not self.locks_checked else (
            f"; all {self.locks_checked} locked tensors within tolerance of their locked directions "
            f"(worst {self.max_lock_residual:.2g} of it)" if not self.lock_violation else
            f"; {len(self.lock_violation)} of {self.locks_checked} locked tensors moved along locked directions")
        frozen = self.missing + self.shape_mismatch + self.dtype_mismatch + self.hash_mismatch
        if not frozen and not self.checked and self.locks_checked:
            return f"no tensor is frozen by this manifest{locks}"  # a lock-only manifest: say what was proven
        if not frozen:
            head = f"all {self.checked} frozen tensors are bit-identical to the manifest"
        else:
            head = (f"{len(frozen)} of {self.checked} frozen tensors fail: "
                    f"{len(self.missing)} missing, {len(self.shape_mismatch)} shape, "
                    f"{len(self.dtype_mismatch)} dtype, {len(self.hash_mismatch)} changed bytes")
        return head + locks

    def add_lock_residuals(self, residuals) -> "VerifyReport":
        """Record ``guard.subspace.LockResidual`` results (every one over its tolerance fails)."""
        self.locks_checked += len(residuals)
        for r in residuals:
            if r.tolerance > 0:
                self.max_lock_residual = max(self.max_lock_residual, r.residual / r.tolerance)
            if not r.ok:
                self.lock_violation.append(r.name)
                self.details[r.name] = r.describe()
        return self

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise ManifestError(self.summary() + ":", [self.details[n] for n in self.failures])


def verify_frozen(manifest: Manifest, state_dict: NamedTensors) -> VerifyReport:
    """Check that every frozen tensor of ``state_dict`` has the manifest's exact bytes.

    A frozen tensor stored in another dtype (say bf16 instead of the base's fp32) fails as a dtype
    mismatch: its bytes cannot be identical, and a silent cast could hide a change.
    """
    tensors = named_tensors(state_dict)
    report = VerifyReport(checked=len(manifest.frozen_names))
    for n in manifest.frozen_names:
        e, t = manifest.tensors[n], tensors.get(n)
        if t is None:
            report.missing.append(n)
            report.details[n] = f"{n!r}: missing"
        elif list(t.shape) != e["shape"]:
            report.shape_mismatch.append(n)
            report.details[n] = f"{n!r}: shape {list(t.shape)}, manifest has {e['shape']}"
        elif dtype_name(t.dtype) != e["dtype"]:
            report.dtype_mismatch.append(n)
            report.details[n] = f"{n!r}: dtype {dtype_name(t.dtype)}, manifest has {e['dtype']}"
        elif tensor_sha256(t) != e["sha256"]:
            report.hash_mismatch.append(n)
            report.details[n] = f"{n!r}: bytes differ from the base (sha256 mismatch)"
    return report
