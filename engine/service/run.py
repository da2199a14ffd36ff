"""Running an accepted job: train, prove, publish, record.

``run_job`` trains with the engine's freeze (``freeze.mode='engine'``) in a staging folder, writes
the *delta* (only the trainable tensors; for LoRA only the adapter tensors), proves that every
frozen tensor is bit-identical to the signed manifest, appends the job record (dataset file hashes,
resolved config, manifest digest, base fingerprint, output hash, verify result) to the signed,
hash-chained job log (``service.joblog``), and only then publishes the folder in one rename
(``service.publish`` has the whole protocol);
``service.audit.audit_jobs`` checks a log and, optionally, every published output.

``freezeasguard.engine.service.delta.merge_delta`` is the other end: it applies a delta to the base
and refuses one that would change a frozen tensor or names a tensor the base does not have.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeasguard.engine.errors import JobError, JobLogError
from freezeasguard.engine.guard.hashing import model_folder_files
from freezeasguard.engine.guard.verify import VerifyReport
from freezeasguard.engine.io import atomic_write_json, file_sha256, save_safetensors_atomic
from freezeasguard.engine.service.audit import RECORD_SCHEMA
from freezeasguard.engine.service.delta import DELTA_FORMAT
from freezeasguard.engine.service.joblog import append_record, encodable
from freezeasguard.engine.service.lora import LoraWiring
from freezeasguard.engine.service.plan import MANIFEST_FILE, JobPlan, plan_job
from freezeasguard.engine.service.policy import Policy, folder_problems
from freezeasguard.engine.service.publish import claim_output, failpoint, publish_stage, recover_jobs, stage_path
from freezeasguard.engine.service.records import utc_now
from freezeasguard.engine.service.spec import JobSpec
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.engine.version import __version__

log = logging.getLogger("freezeasguard")

DELTA_FILE, RECORD_FILE = "delta.safetensors", "record.json"


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
    """Train an accepted job, prove the guard held, record it, then publish the delta.

    The publish protocol (``service.publish``): claim the output folder, append a ``started``
    record, train in a stage beside it, append the ``completed`` record, and only then rename
    the stage into place. Any failure after the claim appends a ``failed`` record and publishes
    nothing.

    Raises:
        JobError when the guard cannot be proven, the output folder is taken, or training fails;
        JobLogError when the log cannot be written (then nothing is trained or published).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would publish and log the same job; jobs are one process (or one GPU).
        raise JobError("guarded jobs run in a single process; launch them without torchrun")
    claim = claim_output(plan.out, plan.job_id)
    stage = stage_path(plan.out, plan.job_id)
    record = _base_record(plan, utc_now())
    record["publish"] = {"out": str(plan.out.absolute()), "stage": str(stage.absolute()),
                         "claim": str(claim.path.absolute())}
    try:
        append_record(plan.log, {**record, "status": "started"}, plan.log_key)
    except BaseException:
        claim.release()
        raise
    failpoint("after-intent")
    try:
        return _run(plan, record, stage)
    except Exception as exc:
        if record.get("status") != "completed":
            # An accepted job that failed (a broken proof, a non-finite loss, a log that cannot be
            # written, ...) is on the record as failed, and its stage is gone: nothing unproven is
            # ever published.
            shutil.rmtree(stage, ignore_errors=True)
            record.update(status="failed", finished=utc_now(), output=None, error=f"{type(exc).__name__}: {exc}")
            record.setdefault("verify", _verify_dict(None, "the job did not finish"))
            if not isinstance(exc, JobLogError):
                append_record(plan.log, record, plan.log_key)
        raise
    finally:
        claim.release()


def _run(plan: JobPlan, record: dict[str, Any], stage: Path) -> JobResult:
    # The model folder is checked again right before training: the files the job was reviewed
    # against must be the ones it trains from.
    now = model_folder_files(plan.sources["base"])
    if now != plan.model_files:
        raise JobError("the base model folder changed after review: " + "; ".join(
            folder_problems(plan.policy, now) or ["its files differ from the reviewed ones"]))
    stage.mkdir(parents=False, exist_ok=False)
    # The trainer reads the manifest it enforces from this copy: the exact object that was
    # reviewed and signature-checked, not a path the user could swap after review.
    plan.manifest.save(stage / MANIFEST_FILE, lock=plan.lock)
    cfg = dataclasses.replace(plan.config, out_dir=str(stage),
                              freeze=dataclasses.replace(plan.config.freeze, manifest=str(stage / MANIFEST_FILE)))
    wiring = None
    if plan.spec.method == "lora":
        wiring = LoraWiring(plan.lora_modules, plan.spec.lora_settings, cfg.train, manifest=plan.manifest,
                            frozen_conv=cfg.freeze.frozen_conv, lock=plan.lock)
    trainer = Trainer(cfg, components=plan.components, dataset=plan.dataset, wiring=wiring)
    failpoint("training")
    history = trainer.fit()
    # The trainer recorded the staging paths; the published folder names its final ones.
    run_cfg = json.loads((stage / "config.json").read_text())
    atomic_write_json(stage / "config.json", {**run_cfg, "config": plan.config.to_dict()})
    record["train"] = {"steps": trainer.step, "losses": [s.loss for s in history]}
    guard = trainer.guard  # the one the wiring froze the tensors with
    lock_held = plan.lock is None or (guard is not None and (guard.lock_check is not None or (
        guard.lock is not None and guard.lock.entries() == plan.lock.entries())))
    if guard is None or guard.manifest is None or guard.manifest.digest() != plan.manifest.digest() or not lock_held:
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
    final = encodable({**record, "status": "completed", "finished": utc_now()})
    atomic_write_json(stage / RECORD_FILE, final)
    failpoint("before-record")
    entry = append_record(plan.log, final, plan.log_key)  # durable (fsync) before anything is published
    record.update(status="completed")
    failpoint("after-record")
    try:
        publish_stage(stage, plan.out)
    except JobError as exc:  # the folder appeared despite the claim: keep the stage, say so on the record
        append_record(plan.log, {**final, "status": "failed", "output": None,
                                 "error": f"JobError: {exc}"}, plan.log_key)
        raise
    log.info("job %s completed: %s; delta %s (%d tensors); logged as #%d", plan.job_id,
             record["verify"]["summary"], plan.out / DELTA_FILE, len(delta), entry["seq"])
    return JobResult(plan.out, final, entry)


def submit(spec: JobSpec | str | os.PathLike, policy: Policy | str | os.PathLike, **kw) -> JobResult:
    """``plan_job`` then ``run_job`` (keyword arguments as in ``plan_job``); interrupted jobs of the
    same log are recovered first (``service.publish.recover_jobs``)."""
    plan = plan_job(spec, policy, **kw)
    for line in recover_jobs(plan.log, plan.log_key):
        log.warning("recovered %s", line)
    return run_job(plan)
