"""Planning a guarded job: review it against the policy before any work, and write nothing.

``plan_job`` loads the publisher's key, manifest and base model and the user's dataset, then checks
*everything* (policy caps and locks, signature, base pin, manifest fit, LoRA targets, dataset
readability, the resolved training config). Every problem found is collected into one
``PolicyViolation``; an accepted job comes back as a ``JobPlan`` that ``service.run.run_job`` runs.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from freezeasguard.engine.config import FinetuneConfig, from_dict
from freezeasguard.engine.errors import (
    ConfigError,
    ManifestError,
    ModelError,
    PolicyViolation,
    SignatureError,
)
from freezeasguard.engine.guard.hashing import model_folder_files
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import SubspaceLock
from freezeasguard.engine.model.components import Components, load_components
from freezeasguard.engine.model.data import ImageDataset
from freezeasguard.engine.service.caps import MAX_SEED
from freezeasguard.engine.service.intake import review_dataset
from freezeasguard.engine.service.joblog import tail_problem
from freezeasguard.engine.service.lora import resolve_lora_targets
from freezeasguard.engine.service.policy import (
    Policy,
    base_problems,
    folder_problems,
    manifest_signature_problems,
    spec_problems,
)
from freezeasguard.engine.service.publish import claim_alive, claim_path
from freezeasguard.engine.service.signing import Ed25519Key, Key, load_key
from freezeasguard.engine.service.spec import JobSpec

MANIFEST_FILE = "manifest.json"


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
    lora_skipped: list[str]  # matched modules left out because they hold frozen tensors (skip_frozen)
    out: Path
    log: Path
    sources: dict[str, str] = field(default_factory=dict)  # spec / policy / manifest / base paths
    lock: SubspaceLock | None = None  # the manifest's direction locks, bases checked against its hashes
    log_key: Key | None = None  # the service's key: signs every log entry of the job
    model_files: dict[str, str] = field(default_factory=dict)  # the base folder's files as reviewed


def _attempt(what: str, fn, problems: list[str]):
    """``fn()``, or None with the reason appended to ``problems``."""
    try:
        return fn()
    except (ManifestError, SignatureError, ModelError, ConfigError, OSError) as exc:
        problems.append(f"{what}: {exc}")
        return None


def _resolve_config(spec: JobSpec, base: str, resolution: int | None, out: Path, progress: bool) -> FinetuneConfig:
    """The Trainer config of a job: the user's hyperparameters, the service's freeze."""
    train = dict(spec.train.extra)
    # The service's own settings: a progress bar if its caller wants one; no resumable checkpoints
    # (a job is one run; the published folder holds the delta and its record, nothing else).
    train.update(lr=spec.train.lr, steps=spec.train.steps, batch_size=spec.train.batch_size,
                 seed=spec.train.seed, progress=progress, checkpoint_every=None)
    cfg = from_dict(FinetuneConfig, {
        "model": {"pretrained": str(base), "resolution": resolution},
        "data": {"path": spec.data.path, "caption_column": spec.data.caption_column,
                 "domains": spec.data.domains, "skip_bad": False},
        "train": train,
        "freeze": {"mode": "engine", "manifest": str(out / MANIFEST_FILE)},
        "out_dir": str(out)})
    return cfg.validate()


def _inside(path: str, root: str) -> bool:
    """Whether ``path``, every symlink resolved, lies inside ``root``: the answer is the same whether
    or not anything exists outside, so refusing on it reveals nothing."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _signing_key(path: str | None) -> Key:
    if not path:
        raise SignatureError("the policy names no log_key_file (the service's log signing key)")
    key = load_key(path)
    if isinstance(key, Ed25519Key) and key.private is None:
        raise SignatureError(f"{path} holds only a public key; the service signs its log with the private one")
    return key


def plan_job(spec: JobSpec | str | os.PathLike, policy: Policy | str | os.PathLike, *,
             manifest: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike | None = None,
             log_path: str | os.PathLike | None = None, job_id: str | None = None,
             progress: bool = False) -> JobPlan:
    """Check a job against the policy before any work. Reads only; writes nothing.

    Args:
        spec: the user's job spec (object or YAML/JSON file).
        policy: the publisher's policy (object or file).
        manifest: the signed freeze manifest (JSON).
        base: the base model folder (Stable Diffusion layout).
        out: where the job folder will be published (default runs/jobs/<job_id>); must not exist.
        log_path: the job log (default: jobs.jsonl next to ``out``).
        progress: show a progress bar while the job trains (the command line does).
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
    if os.path.lexists(out):
        problems.append(f"output folder {str(out)!r} already exists; a job never overwrites results")
    elif os.path.lexists(claim_path(out)) and claim_alive(claim_path(out)):
        # A claim no live process holds is a killed job's: ``submit`` recovers it (frees the folder)
        # before this job claims it, so resubmitting to a killed job's folder works.
        problems.append(f"output folder {str(out)!r} is claimed by another job")
    # The keys come from the policy only: a job cannot bring its own.
    key = _attempt("publisher key", lambda: load_key(policy.signature.key_file, policy.signature.algorithm), problems)
    log_key = _attempt("service log key", lambda: _signing_key(policy.log_key_file), problems)
    if log_path.exists() and (bad := tail_problem(log_path, log_key)):
        problems.append(f"job log {str(log_path)!r}: {bad}")
    man = _attempt("manifest", lambda: Manifest.load(manifest), problems)
    lock = _attempt("manifest locks", lambda: man.load_lock(manifest), problems) if man is not None else None
    files = _attempt("base model folder", lambda: model_folder_files(base), problems)
    comps = _attempt("base model", lambda: load_components(base), problems) if files is not None else None
    if comps is not None:  # the files hashed are the files loaded: hash them again after reading
        after = _attempt("base model folder", lambda: model_folder_files(base), problems)
        if after is not None and after != files:
            problems.append("base model folder: files changed while being read")
        problems += folder_problems(policy, files)

    spec_found = spec_problems(spec, policy, man.mask() if man is not None else None)
    problems += spec_found
    if man is not None and key is not None:
        problems += manifest_signature_problems(man, key)
    fingerprint, lora_modules, lora_skipped = "", [], []
    if comps is not None:
        fingerprint, found = base_problems(policy, man, comps.unet, comps.text_encoders)
        problems += found
        # Module names resolve against the mask only when the manifest fits the model's tensors.
        if spec.method == "lora" and man is not None and not man.model_problems(comps.unet, fingerprint=False):
            targets = resolve_lora_targets(comps.unet, man.mask(comps.unet), spec.lora_settings.targets)
            lora_modules, lora_skipped = targets.modules, targets.frozen if spec.lora_settings.skip_frozen else []
            problems += targets.problems(skip_frozen=spec.lora_settings.skip_frozen)

    resolution = spec.train.resolution
    if comps is not None:
        if resolution is not None and resolution != comps.resolution:
            problems.append(f"train.resolution {resolution} differs from the base model's {comps.resolution}")
        elif resolution is None and comps.resolution > policy.max_resolution:
            problems.append(f"the base model's resolution {comps.resolution} exceeds the policy cap "
                            f"max_resolution {policy.max_resolution}")
        resolution = comps.resolution
    # The dataset is reviewed even when the spec is refused (every problem is named at once), with
    # a usable seed if the spec's is not (it is refused above either way).
    seed_ok = isinstance(spec.train.seed, int) and 0 <= spec.train.seed <= MAX_SEED
    review_spec = spec if seed_ok else dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=0))
    outside = policy.data_root is not None and not _inside(spec.data.path, policy.data_root)
    if outside:  # refused before anything there is looked at: the answer is the same for every path
        problems.append(f"dataset: data.path is outside the service's data root {policy.data_root!r}")
    dataset, data_files = review_dataset(review_spec, resolution, problems, policy) \
        if resolution and not outside else (None, {})

    cfg = None
    if not spec_found:  # a refused spec is not turned into a training config
        cfg = _attempt("training config", lambda: _resolve_config(spec, str(base), resolution, out, progress), problems)
    if problems:
        raise PolicyViolation(problems)
    return JobPlan(job_id=job_id, spec=spec, policy=policy, manifest=man, components=comps,
                   dataset=dataset, dataset_files=data_files, config=cfg, base_fingerprint=fingerprint,
                   lora_modules=lora_modules, lora_skipped=lora_skipped, out=out, log=log_path, sources=sources,
                   lock=lock, log_key=log_key, model_files=files or {})
