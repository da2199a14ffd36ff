"""``job submit`` and ``policy init``: the publisher's guarded-job service on the command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freezeasguard.engine.errors import ConfigError, JobError, JobLogError, PolicyViolation
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.model.components import load_components
from freezeasguard.engine.service.policy import policy_for
from freezeasguard.engine.service.run import RECORD_FILE, submit


def cmd_job_submit(args: argparse.Namespace) -> int:
    try:
        result = submit(args.spec, args.policy, manifest=args.manifest, base=args.base, out=args.out,
                        log_path=args.log, key_file=args.key_file, progress=True)
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


def cmd_policy_init(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"freezeasguard policy init: error: {args.out} exists; refusing to replace a policy", file=sys.stderr)
        return 2
    manifest = Manifest.load(args.manifest)
    te = None
    if args.base:
        base = load_components(args.base)
        manifest.check_model(base.unet)  # the manifest must be for this very base
        te = base.text_encoder
    caps = {k: getattr(args, k) for k in ("max_lr", "max_steps", "max_batch_size") if getattr(args, k) is not None}
    policy = policy_for(manifest, args.key_file, te, **caps)
    policy.save(args.out)
    print(f"policy written to {args.out}: base {policy.base_fingerprint[:16]}...,"
          f"{' text encoder pinned,' if te is not None else ''} max_lr {policy.max_lr:g}, max_steps {policy.max_steps}, "
          f"max_batch_size {policy.max_batch_size}, {policy.signature.algorithm} key {args.key_file}")
    return 0
