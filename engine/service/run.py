"""Running an accepted job: train, prove, publish, record.

``run_job`` trains with the engine's freeze (``freeze.mode='engine'``) in a staging folder, writes
the *delta* (only the trainable tensors; for LoRA only the adapter tensors), proves that every
frozen tensor is bit-identical to the signed manifest, publishes the folder in one rename, and
appends the job record (dataset file hashes, resolved config, manifest digest, base fingerprint,
output hash, verify result) to the hash-chained job log (``service.joblog``);
``service.audit.audit_jobs`` checks a log and, optionally, every published output.

``freezeasguard.engine.service.delta.merge_delta`` is the other end: it applies a delta to the base
and refuses one that would change a frozen tensor or names a tensor the base does not have.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeasguard.engine import __version__
from freezeasguard.engine.errors import JobError, JobLogError
from freezeasguard.engine.guard.verify import VerifyReport
from freezeasguard.engine.io import atomic_dir, atomic_write_json, file_sha256, save_safetensors_atomic
from freezeasguard.engine.service.audit import RECORD_SCHEMA
from freezeasguard.engine.service.delta import DELTA_FORMAT
from freezeasguard.engine.service.joblog import append_record
from freezeasguard.engine.service.lora import LoraWiring
from freezeasguard.engine.service.plan import MANIFEST_FILE, JobPlan, plan_job
from freezeasguard.engine.service.policy import Policy
from freezeasguard.engine.service.spec import JobSpec
from freezeasguard.engine.train.trainer import Trainer

log = logging.getLogger("freezeasguard")

DELTA_FILE, RECORD_FILE = "delta.safetensors", "record.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobResult:
    out: Path
    record: dict[str, Any]
    log_entry: dict[str, Any]


def _verify_dict(report: VerifyReport | None, why_none: str = "") -> dict[str, Any]:
    if report is None:
        return {"ok": False, "checked": 0, "summary": f"not verified: {why_none}", "failures": []}
    out = {"ok": report.ok, "checked": report.checked, "summary": report.summary(),
           "failures": [report.details[n] for n in report.failures]}
    if report.locks_checked or report.lock_violation:
        out.update(locks_checked=report.locks_checked, max_lock_residual=report.max_lock_residual)
    return out


def _base_record(plan: JobPlan, started: str) -> dict[str, Any]:
    spec = plan.spec
    cfg = plan.config.to_dict()
    method: dict[str, Any] = {"name": spec.method}
    if spec.method == "lora":
        method.update(dataclasses.asdict(spec.lora_settings), modules=plan.lora_modules, skipped=plan.lora_skipped)
    return {
        "schema": RECORD_SCHEMA, "job_id": plan.job_id, "name": spec.name, "version": __version__,
        "started": started, "sources": plan.sources, "spec": spec.to_dict(),
        "policy_digest": plan.policy.digest(), "config": cfg, "method": method,
        "dataset": {"path": spec.data.path, "images": len(plan.dataset), "files": plan.dataset_files},
        "manifest": {"digest": plan.manifest.digest(), "counts": plan.manifest.counts,
                     "signature": {k: (plan.manifest.signature or {}).get(k) for k in ("alg", "key_id")}},
        "base": {"fingerprint": plan.base_fingerprint},
    }


def run_job(plan: JobPlan) -> JobResult:
    """Train an accepted job, prove the freeze held, publish the delta and log the record.

    Raises:
        JobError when the proof fails. Any failure after acceptance is logged as a "failed"
        record, and no output is published.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would publish and log the same job; jobs are one process (or one GPU).
        raise JobError("guarded jobs run in a single process; launch them without torchrun")
    record = _base_record(plan, _now())
    try:
        return _run(plan, record)
    except JobLogError:
        raise
    except Exception as exc:
        # An accepted job that failed (a broken proof, a non-finite loss, ...) is still on the
        # record; its staging folder is gone, so nothing unproven is ever published.
        record.update(status="failed", finished=_now(), output=None, error=f"{type(exc).__name__}: {exc}")
        record.setdefault("verify", _verify_dict(None, "the job did not finish"))
        append_record(plan.log, record)
        raise


def _run(plan: JobPlan, record: dict[str, Any]) -> JobResult:
    with atomic_dir(plan.out) as stage:
        # The trainer reads the manifest it enforces from this copy: the exact object that was
        # reviewed and signature-checked, not a path the user could swap after review.
        plan.manifest.save(stage / MANIFEST_FILE, lock=plan.lock)
        cfg = dataclasses.replace(plan.config, out_dir=str(stage),
                                  freeze=dataclasses.replace(plan.config.freeze,
                                                             manifest=str(stage / MANIFEST_FILE)))
        wiring = None
        if plan.spec.method == "lora":
            wiring = LoraWiring(plan.lora_modules, plan.spec.lora_settings, cfg.train, manifest=plan.manifest,
                                frozen_conv=cfg.freeze.frozen_conv, lock=plan.lock)
        trainer = Trainer(cfg, components=plan.components, dataset=plan.dataset, wiring=wiring)
        if wiring is not None:
            trainer.guard = wiring.guard
        history = trainer.fit()
        # The trainer recorded the staging paths; the published folder names its final ones.
        run_cfg = json.loads((stage / "config.json").read_text())
        atomic_write_json(stage / "config.json", {**run_cfg, "config": plan.config.to_dict()})
        record["train"] = {"steps": trainer.step, "losses": [s.loss for s in history]}
        enforced = getattr(trainer.guard, "manifest", None)
        lock_held = plan.lock is None or getattr(trainer.guard, "lock_check", None) is not None or (
            getattr(trainer.guard, "lock", None) is not None and trainer.guard.lock.entries() == plan.lock.entries())
        if enforced is None or enforced.digest() != plan.manifest.digest() or not lock_held:
            record["verify"] = _verify_dict(None, "the trainer did not enforce the reviewed manifest and its locks")
        else:
            record["verify"] = _verify_dict(trainer.verify_frozen())
        if not record["verify"]["ok"]:
            raise JobError(f"job {plan.job_id}: the guard could not be proven: "
                           f"{record['verify']['summary']}; nothing was published")

        delta = trainer.trainable_state()
        if wiring is not None:
            delta = {wiring.delta_name(n): t for n, t in delta.items()}
        leaked = sorted(set(delta) & set(plan.manifest.frozen_names))
        if leaked:  # cannot happen with the engine's wiring; the delta must never carry them
            raise JobError(f"job {plan.job_id}: the delta would contain frozen tensors {leaked[:5]}")
        meta = {"format": DELTA_FORMAT, "job_id": plan.job_id, "method": plan.spec.method, "steps": str(trainer.step),
                "base_fingerprint": plan.base_fingerprint, "manifest_digest": plan.manifest.digest()}
        if wiring is not None:
            lo = plan.spec.lora_settings
            meta.update(lora_rank=str(lo.rank), lora_alpha=repr(float(lo.alpha)))
        save_safetensors_atomic(delta, stage / DELTA_FILE, metadata=meta)
        record["output"] = {"path": str((plan.out / DELTA_FILE).absolute()), "file": DELTA_FILE,
                            "sha256": file_sha256(stage / DELTA_FILE),
                            "bytes": (stage / DELTA_FILE).stat().st_size, "tensors": len(delta),
                            "params": sum(t.numel() for t in delta.values())}
        record.update(status="completed", finished=_now())
        atomic_write_json(stage / RECORD_FILE, record)
    entry = append_record(plan.log, record)
    log.info("job %s completed: %s; delta %s (%d tensors); logged as #%d", plan.job_id,
             record["verify"]["summary"], plan.out / DELTA_FILE, len(delta), entry["seq"])
    return JobResult(plan.out, record, entry)


def submit(spec: JobSpec | str | os.PathLike, policy: Policy | str | os.PathLike, **kw) -> JobResult:
    """``plan_job`` then ``run_job`` (keyword arguments as in ``plan_job``)."""
    return run_job(plan_job(spec, policy, **kw))
