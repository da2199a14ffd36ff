"""Guarded fine-tuning jobs: review against the policy, run, prove, record.

A job goes through three stages, and nothing is written before the first one passes:

1. ``plan_job``: load the publisher's key, manifest and base model and the user's dataset, then
   check *everything* (policy caps and locks, signature, base pin, manifest fit, LoRA targets,
   dataset readability, the resolved training config). Every problem found is collected into one
   ``PolicyViolation``.
2. ``run_job``: train with the engine's freeze (``freeze.mode='engine'``) in a staging folder,
   write the *delta* (only the trainable tensors; for LoRA only the adapter tensors), prove that
   every frozen tensor is bit-identical to the signed manifest, and publish the folder in one
   rename.
3. Append the job record (dataset file hashes, resolved config, manifest digest, base
   fingerprint, output hash, verify result) to the hash-chained job log (``joblog``).

``freezeasguard.engine.delta.merge_delta`` is the other end: it applies a delta to the base and
refuses one that would change a frozen tensor or names a tensor the base does not have.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from freezeasguard.engine import __version__
from freezeasguard.engine.config import ConfigError, FinetuneConfig, from_dict
from freezeasguard.engine.data import DatasetError, ImageDataset, load_image_folder
from freezeasguard.engine.delta import DELTA_FORMAT
from freezeasguard.engine.io import atomic_dir, atomic_write_json, save_safetensors_atomic
from freezeasguard.engine.joblog import AuditReport, JobLogError, append_record, audit, tail_problem
from freezeasguard.engine.manifest import Manifest, ManifestError, VerifyReport
from freezeasguard.engine.models import Components, ModelError, load_components
from freezeasguard.engine.policy import (JobSpec, Policy, PolicyViolation, base_problems, extra_problems,
                                         manifest_signature_problems, resolve_lora_targets, spec_problems)
from freezeasguard.engine.signing import SignatureError, load_key

log = logging.getLogger("freezeasguard")

RECORD_SCHEMA = "freezeasguard.job/1"
DELTA_FILE, RECORD_FILE, MANIFEST_FILE = "delta.safetensors", "record.json", "manifest.json"


class JobError(RuntimeError):
    """An accepted job that could not be completed or proven (nothing was published)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ planning
@dataclass
class JobPlan:
    """An accepted job: everything ``run_job`` needs, already checked."""

    job_id: str
    spec: JobSpec
    policy: Policy
    manifest: Manifest
    components: Components
    dataset: ImageDataset
    dataset_files: dict[str, str]
    config: FinetuneConfig
    base_fingerprint: str
    lora_modules: list[str]
    out: Path
    log: Path
    sources: dict[str, str] = field(default_factory=dict)  # spec / policy / manifest / base paths


def _attempt(what: str, fn, problems: list[str]):
    """``fn()``, or None with the reason appended to ``problems``."""
    try:
        return fn()
    except (ManifestError, SignatureError, ModelError, ConfigError, OSError) as exc:
        problems.append(f"{what}: {exc}")
        return None


def _listed_files(root: Path) -> list[str]:
    """Image files metadata.jsonl names (bad lines are left to the loader to report)."""
    names = []
    try:
        lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and (root / row["file_name"]).is_file():
            names.append(row["file_name"])
    return names


def _hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {n: file_sha256(root / n) for n in ["metadata.jsonl", *dict.fromkeys(names)]}


def _review_dataset(spec: JobSpec, resolution: int,
                    problems: list[str]) -> tuple[ImageDataset | None, dict[str, str]]:
    """Load the dataset, report every unreadable image/line, and hash the files it was built from.

    Files are hashed before and after decoding: a file swapped while the job was being reviewed
    would make the record's hashes describe data that was not trained on.
    """
    root = Path(spec.data.path)
    try:
        before = _hash_files(root, _listed_files(root)) if (root / "metadata.jsonl").is_file() else {}
        ds = load_image_folder(root, resolution, caption_column=spec.data.caption_column,
                               domains=spec.data.domains, skip_bad=True, seed=spec.train.seed)
    except (DatasetError, OSError) as exc:
        problems.append(f"dataset: {exc}")
        return None, {}
    if ds.skipped:
        problems += [f"dataset: {msg}" for _, _, msg in ds.skipped]
        return None, {}
    inside = root.resolve()
    escaped = [r.file_name for r in ds.records if not (root / r.file_name).resolve().is_relative_to(inside)]
    if escaped:  # '../x' or a symlink out: the service must not read files the user cannot see
        problems.append(f"dataset: file(s) outside the dataset folder: {escaped[:5]}")
    if len(ds) < spec.train.batch_size:
        problems.append(f"dataset: {len(ds)} image(s), fewer than train.batch_size {spec.train.batch_size}")
    after = _hash_files(root, [r.file_name for r in ds.records])
    changed = sorted(f for f, h in after.items() if before.get(f) != h)
    if changed:
        problems.append(f"dataset: file(s) changed while being read: {changed}")
    return ds, after


def _resolve_config(spec: JobSpec, base: str, resolution: int | None, out: Path) -> FinetuneConfig:
    """The Trainer config of a job: the user's hyperparameters, the service's freeze."""
    train = dict(spec.train.extra)
    train.update(lr=spec.train.lr, steps=spec.train.steps, batch_size=spec.train.batch_size,
                 seed=spec.train.seed, progress=False)
    cfg = from_dict(FinetuneConfig, {
        "model": {"pretrained": str(base), "resolution": resolution},
        "data": {"path": spec.data.path, "caption_column": spec.data.caption_column,
                 "domains": spec.data.domains, "skip_bad": False},
        "train": train,
        "freeze": {"mode": "engine", "manifest": str(out / MANIFEST_FILE)},
        "out_dir": str(out)})
    return cfg.validate()


def plan_job(spec: JobSpec | str | os.PathLike, policy: Policy | str | os.PathLike, *,
             manifest: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike | None = None,
             log_path: str | os.PathLike | None = None, key_file: str | os.PathLike | None = None,
             job_id: str | None = None) -> JobPlan:
    """Check a job against the policy before any work. Reads only; writes nothing.

    Args:
        spec: the user's job spec (object or YAML/JSON file).
        policy: the publisher's policy (object or file).
        manifest: the signed freeze manifest (JSON).
        base: the base model folder (Stable Diffusion layout).
        out: where the job folder will be published (default runs/jobs/<job_id>); must not exist.
        log_path: the job log (default: jobs.jsonl next to ``out``).
        key_file: verification key; overrides the policy's ``signature.key_file``.
    Raises:
        PolicyViolation listing every problem found; ConfigError for an unparsable spec/policy.
    """
    sources: dict[str, str] = {}
    if not isinstance(spec, JobSpec):
        sources["spec"] = str(spec)
        spec = JobSpec.load(spec)
    if not isinstance(policy, Policy):
        sources["policy"] = str(policy)
        policy = Policy.load(policy)
    sources.update(manifest=str(manifest), base=str(base))
    job_id = job_id or f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    out = Path(out) if out is not None else Path("runs/jobs") / job_id
    log_path = Path(log_path) if log_path is not None else out.parent / "jobs.jsonl"

    problems: list[str] = []
    if out.exists():
        problems.append(f"output folder {str(out)!r} already exists; a job never overwrites results")
    if log_path.exists() and (bad := tail_problem(log_path)):
        problems.append(f"job log {str(log_path)!r}: {bad}")
    key_path = key_file or policy.signature.key_file
    key = None
    if key_path is None:
        problems.append("publisher key: none given (set signature.key_file in the policy or pass --key-file)")
    else:
        key = _attempt("publisher key", lambda: load_key(key_path, policy.signature.algorithm), problems)
    man = _attempt("manifest", lambda: Manifest.load(manifest), problems)
    comps = _attempt("base model", lambda: load_components(base), problems)

    problems += spec_problems(spec, policy, man.mask() if man is not None else None)
    if man is not None and key is not None:
        problems += manifest_signature_problems(man, key)
    fingerprint, lora_modules = "", []
    if comps is not None:
        fingerprint, found = base_problems(policy, man, comps.unet, comps.text_encoder)
        problems += found
        # Module names resolve against the mask only when the manifest fits the model's tensors.
        if spec.method == "lora" and man is not None and not man.model_problems(comps.unet, fingerprint=False):
            lora_modules, found = resolve_lora_targets(comps.unet, man.mask(comps.unet),
                                                       spec.lora_settings.targets)
            problems += found

    resolution = spec.train.resolution
    if comps is not None:
        if resolution is not None and resolution != comps.resolution:
            problems.append(f"train.resolution {resolution} differs from the base model's {comps.resolution}")
        elif resolution is None and comps.resolution > policy.max_resolution:
            problems.append(f"the base model's resolution {comps.resolution} exceeds the policy cap "
                            f"max_resolution {policy.max_resolution}")
        resolution = comps.resolution
    dataset, files = _review_dataset(spec, resolution, problems) if resolution else (None, {})

    cfg = None
    if not extra_problems(spec.train.extra, policy):  # else reported by spec_problems already
        cfg = _attempt("training config", lambda: _resolve_config(spec, str(base), resolution, out), problems)
    if problems:
        raise PolicyViolation(problems)
    return JobPlan(job_id=job_id, spec=spec, policy=policy, manifest=man, components=comps,
                   dataset=dataset, dataset_files=files, config=cfg, base_fingerprint=fingerprint,
                   lora_modules=lora_modules, out=out, log=log_path, sources=sources)


# ------------------------------------------------------------------------------------- running
class LoraWiring:
    """Trainer wiring for LoRA jobs: every base tensor fixed, adapters on the approved modules.

    The approved modules were resolved and checked by ``plan_job`` (all their tensors trainable
    under the mask); here they are passed to peft as one exact regex, so peft's own name
    matching cannot widen the set. ``guard`` is the freeze in force, for ``Trainer.verify_frozen``.
    """

    adapter = "default"

    def __init__(self, plan: JobPlan, cfg: FinetuneConfig):
        self.plan, self.cfg = plan, cfg
        self.guard = None

    def __call__(self, unet: nn.Module):
        from peft import LoraConfig, inject_adapter_in_model

        from freezeasguard.engine.freeze import Guard
        from freezeasguard.engine.frozen_ops import install_frozen_convs
        from freezeasguard.engine.train import make_optimizer, param_groups

        mask = self.plan.manifest.mask(unet)
        self.guard = Guard("engine", mask, self.plan.manifest)
        unet.requires_grad_(False)  # LoRA trains adapters only, whatever the mask allows
        if self.cfg.freeze.frozen_conv:
            self.guard.frozen_convs = install_frozen_convs(unet, mask.frozen)
        lo = self.plan.spec.lora_settings
        pattern = "^(?:" + "|".join(re.escape(m) for m in self.plan.lora_modules) + ")$"
        torch.manual_seed(self.cfg.train.seed)  # adapter init (kaiming A, zero B) is seeded
        inject_adapter_in_model(LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                           target_modules=pattern), unet, adapter_name=self.adapter)
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        stray = [n for n, _ in named if ".lora_" not in n]
        if stray or not named:
            raise JobError(f"LoRA wiring left non-adapter tensors trainable: {stray[:5]}" if stray
                           else "LoRA wiring found no adapter tensors")
        device = next(unet.parameters()).device
        return named, make_optimizer(param_groups(named, self.cfg.train.weight_decay), self.cfg, device)

    def delta_name(self, name: str) -> str:
        """peft's 'm.lora_A.default.weight' -> 'm.lora_A.weight' (the delta file's naming)."""
        return name.replace(f".{self.adapter}.", ".")


@dataclass
class JobResult:
    out: Path
    record: dict[str, Any]
    log_entry: dict[str, Any]


def _verify_dict(report: VerifyReport | None, why_none: str = "") -> dict[str, Any]:
    if report is None:
        return {"ok": False, "checked": 0, "summary": f"not verified: {why_none}", "failures": []}
    return {"ok": report.ok, "checked": report.checked, "summary": report.summary(),
            "failures": [report.details[n] for n in report.failures]}


def _base_record(plan: JobPlan, started: str) -> dict[str, Any]:
    spec = plan.spec
    cfg = plan.config.to_dict()
    method: dict[str, Any] = {"name": spec.method}
    if spec.method == "lora":
        method.update(dataclasses.asdict(spec.lora_settings), modules=plan.lora_modules)
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
    from freezeasguard.engine.train import Trainer

    with atomic_dir(plan.out) as stage:
        # The trainer reads the manifest it enforces from this copy: the exact object that was
        # reviewed and signature-checked, not a path the user could swap after review.
        plan.manifest.save(stage / MANIFEST_FILE)
        cfg = dataclasses.replace(plan.config, out_dir=str(stage),
                                  freeze=dataclasses.replace(plan.config.freeze,
                                                             manifest=str(stage / MANIFEST_FILE)))
        wiring = LoraWiring(plan, cfg) if plan.spec.method == "lora" else None
        trainer = Trainer(cfg, components=plan.components, dataset=plan.dataset, wiring=wiring)
        if wiring is not None:
            trainer.guard = wiring.guard
        history = trainer.fit()
        # The trainer recorded the staging paths; the published folder names its final ones.
        run_cfg = json.loads((stage / "config.json").read_text())
        atomic_write_json(stage / "config.json", {**run_cfg, "config": plan.config.to_dict()})
        record["train"] = {"steps": trainer.step, "losses": [s.loss for s in history]}
        enforced = getattr(trainer.guard, "manifest", None)
        if enforced is None or enforced.digest() != plan.manifest.digest():
            record["verify"] = _verify_dict(None, "the trainer did not enforce the reviewed manifest")
        else:
            record["verify"] = _verify_dict(trainer.verify_frozen())
        if not record["verify"]["ok"]:
            raise JobError(f"job {plan.job_id}: the freeze could not be proven: "
                           f"{record['verify']['summary']}; nothing was published")

        delta = trainer.trainable_state()
        if wiring is not None:
            delta = {wiring.delta_name(n): t for n, t in delta.items()}
        leaked = sorted(set(delta) & set(plan.manifest.frozen_names))
        if leaked:  # cannot happen with the engine's wiring; the delta must never carry them
            raise JobError(f"job {plan.job_id}: the delta would contain frozen tensors {leaked[:5]}")
        meta = {"format": DELTA_FORMAT, "job_id": plan.job_id, "method": plan.spec.method,
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


# --------------------------------------------------------------------------------------- audit
_RECORD_KEYS = ("schema", "job_id", "status", "spec", "config", "dataset", "manifest", "base",
                "verify", "output")


def record_problems(record: Mapping[str, Any], *, outputs: bool = False) -> list[str]:
    """What is wrong with one job record; with ``outputs``, also re-hash its delta file."""
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        return [f"job record lacks {missing}"]
    if record["schema"] != RECORD_SCHEMA:
        return [f"unknown job record schema {record['schema']!r}"]
    out: list[str] = []
    if record["status"] == "completed":
        if not (isinstance(record["verify"], dict) and record["verify"].get("ok") is True):
            out.append(f"job {record['job_id']}: completed without a passing freeze verification")
        o = record["output"]
        if not isinstance(o, dict) or not isinstance(o.get("sha256"), str):
            out.append(f"job {record['job_id']}: completed without an output hash")
        elif outputs:
            path = Path(o.get("path", ""))
            if not path.is_file():
                out.append(f"job {record['job_id']}: output {str(path)!r} is missing")
            elif file_sha256(path) != o["sha256"]:
                out.append(f"job {record['job_id']}: output {str(path)!r} does not match its recorded sha256")
    elif record["status"] != "failed":
        out.append(f"job {record['job_id']}: unknown status {record['status']!r}")
    return out


def audit_jobs(path: str | os.PathLike, *, outputs: bool = False,
               expect_head: str | None = None) -> AuditReport:
    """Verify a job log's hash chain and every record in it (see ``joblog.audit``)."""
    return audit(path, check_record=lambda r: record_problems(r, outputs=outputs), expect_head=expect_head)


# ----------------------------------------------------------------------------------------- CLI
def cmd_job_submit(args: argparse.Namespace) -> int:
    try:
        result = submit(args.spec, args.policy, manifest=args.manifest, base=args.base, out=args.out,
                        log_path=args.log, key_file=args.key_file)
    except (PolicyViolation, ConfigError) as exc:
        print(f"freezeasguard job submit: refused: {exc}", file=sys.stderr)
        return 2
    except (JobError, JobLogError) as exc:
        print(f"freezeasguard job submit: failed: {exc}", file=sys.stderr)
        return 1
    r = result.record
    print(f"job {r['job_id']}: {r['verify']['summary']}\n"
          f"  delta  {r['output']['path']} (sha256 {r['output']['sha256']}, {r['output']['tensors']} tensors)\n"
          f"  record {result.out / RECORD_FILE}\n  logged as #{result.log_entry['seq']} "
          f"(hash {result.log_entry['hash']})")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        report = audit_jobs(args.log, outputs=args.outputs, expect_head=args.head)
    except JobLogError as exc:
        print(f"freezeasguard audit: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def register_cli(subparsers) -> None:
    """Add ``job submit`` and ``audit`` to the ``freezeasguard`` command line."""
    job = subparsers.add_parser("job", help="guarded fine-tuning jobs (policy-checked, proven, logged)")
    jsub = job.add_subparsers(dest="job_command", required=True)
    s = jsub.add_parser("submit", help="review a job against the policy, run it, prove the freeze held")
    s.add_argument("spec", help="job spec (YAML or JSON)")
    s.add_argument("--policy", required=True, help="publisher policy (YAML or JSON)")
    s.add_argument("--manifest", required=True, help="signed freeze manifest (JSON)")
    s.add_argument("--base", required=True, help="base model folder (Stable Diffusion layout)")
    s.add_argument("--out", help="job output folder (default runs/jobs/<job id>; must not exist)")
    s.add_argument("--log", help="hash-chained job log (default: jobs.jsonl next to the output folder)")
    s.add_argument("--key-file", help="manifest verification key (overrides the policy's)")
    s.set_defaults(func=cmd_job_submit)
    a = subparsers.add_parser("audit", help="verify a job log's hash chain and records")
    a.add_argument("log", help="job log (JSONL)")
    a.add_argument("--outputs", action="store_true", help="also re-hash every recorded delta file")
    a.add_argument("--head", help="expected hash of the newest record (anchors the tail)")
    a.set_defaults(func=cmd_audit)
