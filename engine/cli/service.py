"""``job submit`` and ``audit``: the publisher's guarded-job service on the command line."""
from __future__ import annotations

import argparse
import sys

from freezeasguard.engine.errors import ConfigError, JobError, JobLogError, PolicyViolation
from freezeasguard.engine.service.run import RECORD_FILE, audit_jobs, submit


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


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        report = audit_jobs(args.log, outputs=args.outputs, expect_head=args.head)
    except JobLogError as exc:
        print(f"freezeasguard audit: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def register(subparsers) -> None:
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
