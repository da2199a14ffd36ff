"""The gate in front of a run's final model: which runs must prove their guard, and what is written.

A final model of a run that was given a manifest (``freeze.manifest``, or a wiring whose guard
carries one or direction locks) is written only with a proof that the guard held: a run whose
wiring left the guard behind, or whose mode enforces no manifest, is refused like a run that broke
its freeze, with nothing written. A run without a manifest has nothing to prove.
"""
from __future__ import annotations

from typing import Any

from freezeasguard.engine.config import FinetuneConfig
from freezeasguard.engine.guard.tensor import TensorGuard
from freezeasguard.engine.guard.verify import VerifyReport

PROOF_FILE = "verify.json"


def proof_required(cfg: FinetuneConfig, guard: TensorGuard | None) -> str | None:
    """Why a final model of this run needs a proof (None: it needs none)."""
    if cfg.freeze.manifest:
        return f"freeze.manifest={cfg.freeze.manifest} is configured"
    if guard is not None and guard.manifest is not None:
        return "the wiring's guard enforces a manifest"
    if guard is not None and guard.lock is not None:
        return "the wiring's guard holds direction locks"
    return None


def refusal(report: VerifyReport | None, required: str | None) -> str | None:
    """Why the final model may not be written (None: it may)."""
    if report is None:
        if required is None:
            return None
        return (f"{required}, but no guard proved it (the wiring returned no guard with a manifest: a custom "
                "wiring hands its TensorGuard back in Wired.guard; freeze.mode=full enforces no manifest)")
    if not report.ok:
        return f"{report.summary()}: " + "; ".join(report.details[n] for n in report.failures[:10])
    return None


def proof_files(report: VerifyReport | None, guard: TensorGuard | None) -> dict[str, Any]:
    """The JSON files that go into the final folder beside the model: the proof, when there is one."""
    if report is None or guard is None:
        return {}
    digest = guard.manifest.digest() if guard.manifest is not None else None
    return {PROOF_FILE: {"ok": report.ok, "summary": report.summary(), "manifest_digest": digest}}
