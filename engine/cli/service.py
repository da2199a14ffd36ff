"""``job submit`` and ``policy init``: the publisher's guarded-job service on the command line
(the service modules, and torch under them, are imported when a command runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freezeasguard.engine.errors import (
    ConfigError,
    JobError,
    JobLogError,
    ManifestError,
    ModelError,
    PolicyViolation,
    SignatureError,
)


def cmd_job_submit(args: argparse.Namespace) -> int:
    from freezeasguard.engine.service.run import RECORD_FILE, submit

    try:
        result = submit(args.spec, args.policy, manifest=args.manifest, base=args.base, out=args.out,
                        log_path=args.log, progress=True)
    except (PolicyViolation, ConfigError) as exc:
        print(f"freezeasguard job submit: refused: {exc}", file=sys.stderr)
        return 2
    except (JobError, JobLogError) as exc:
        print(f"freezeasguard job submit: failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A full disk, a folder that cannot be written, ...: the job is already on the log as
        # failed and nothing was published; the user needs what failed, not a traceback.
        print(f"freezeasguard job submit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    r = result.record
    print(f"job {r['job_id']}: {r['verify']['summary']}\n"
          f"  delta  {r['output']['path']} (sha256 {r['output']['sha256']}, {r['output']['tensors']} tensors)\n"
          f"  record {(result.out / RECORD_FILE).absolute()}\n  logged as #{result.log_entry['seq']} "
          f"(hash {result.log_entry['hash']})")
    return 0


def cmd_policy_init(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"freezeasguard policy init: error: {args.out} exists; refusing to replace a policy", file=sys.stderr)
        return 2
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.model.components import load_components
    from freezeasguard.engine.service.policy import policy_for

    try:
        manifests = [Manifest.load(m) for m in args.manifest]
        base = load_components(args.base)
        for m in manifests:
            m.check_model(base.unet)  # every manifest must be for this very base
        caps = {k: getattr(args, k) for k in ("max_lr", "max_steps", "max_batch_size", "min_guard_share")
                if getattr(args, k) is not None}
        policy = policy_for(manifests, args.key_file, args.base, log_key_file=args.log_key,
                            text_encoder=base.text_encoders, **caps)
    except (ConfigError, ManifestError, SignatureError, ModelError) as exc:
        print(f"freezeasguard policy init: error: {exc}", file=sys.stderr)
        return 2
    policy.save(args.out)
    print(f"policy written to {args.out}: base folder {policy.model_fingerprint[:16]}... and denoiser "
          f"{policy.base_fingerprint[:16]}... pinned, {len(policy.manifests)} manifest(s) accepted, "
          f"max_lr {policy.max_lr:g}, max_steps {policy.max_steps}, max_batch_size {policy.max_batch_size}, "
          f"{policy.signature.algorithm} key {args.key_file}, log signed with {args.log_key}")
    return 0
