"""``keygen``, ``sign`` and ``audit``: keys, signatures and the log proof anyone can rerun.

The service modules (torch and the manifest code under them) are imported when a command runs,
after its arguments are checked.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from freezeasguard.engine.errors import ConfigError, JobLogError, SignatureError


def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"freezeasguard keygen: error: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    from freezeasguard.engine.service import signing

    key = signing.new_hmac_key() if args.algorithm == signing.HMAC_SHA256 else signing.new_ed25519_key()
    if args.public and isinstance(key, signing.HmacKey):
        raise SignatureError("an HMAC key has no public half: --public applies to ed25519 keys only")
    # The secret is created under a umask that keeps it 0600 from its first byte; the public half
    # is a result to hand out, written with the user's umask.
    mask = os.umask(0o077)
    try:
        signing.save_key(key, args.out)
    finally:
        os.umask(mask)
    if args.public:
        signing.save_key(signing.Ed25519Key(public=key.public), args.public)
    print(f"{args.algorithm} key {key.key_id} written to {args.out}" + (f" (public half: {args.public})" if args.public else ""))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.service.signing import load_key, sign_manifest

    manifest = Manifest.load(args.manifest)
    lock = manifest.load_lock(args.manifest)  # checked against the manifest before it is signed
    signed = sign_manifest(manifest, load_key(args.key))
    out = args.out or args.manifest
    signed.save(out, lock=lock)
    print(f"signed manifest {signed.digest()[:16]}... with {signed.signature['alg']} key "
          f"{signed.signature['key_id']}: {out}")
    return 0


def _audit_keys(args: argparse.Namespace) -> tuple[object | None, str | None, list[str]]:
    """(log verification key, expected manifest key id, notes) from ``--key`` or ``--policy``."""
    from freezeasguard.engine.service.policy import Policy
    from freezeasguard.engine.service.signing import load_key

    if getattr(args, "policy", None):
        policy = Policy.load(args.policy)
        if not policy.log_key_file:
            raise ConfigError(f"policy {args.policy!r} names no log_key_file: its service does not sign the job "
                              "log, so no signature can be checked (pass --key, or set log_key_file)")
        notes = []
        kid = None
        if policy.signature.key_file:
            kid = load_key(policy.signature.key_file, policy.signature.algorithm).key_id
        else:
            notes.append("manifest key ids NOT checked: the policy names no signature.key_file")
        return load_key(policy.log_key_file), kid, notes
    if getattr(args, "key", None):
        return load_key(args.key), None, []
    return None, None, []


def _checked_outputs(log: str) -> list[str]:
    """One line per output ``--outputs`` re-hashed: every job whose final record is "completed"."""
    from freezeasguard.engine.service.audit import JobStates
    from freezeasguard.engine.service.joblog import read_entries

    jobs = JobStates()
    for _, entry in read_entries(log):
        if isinstance(entry, dict) and isinstance(entry.get("record"), dict):
            jobs.see(entry.get("seq", 0), entry["record"])
    return [f"output of job {r['job_id']}: {r['output']['path']} matches its recorded sha256 "
            f"{r['output']['sha256'][:16]}..." for _, r in jobs.completed()]


def cmd_audit(args: argparse.Namespace) -> int:
    from freezeasguard.engine.service.audit import audit_jobs

    try:
        key, manifest_kid, notes = _audit_keys(args)
        report = audit_jobs(args.log, outputs=args.outputs, expect_head=args.head, key=key,
                            manifest_key_id=manifest_kid)
    except (JobLogError, SignatureError, ConfigError) as exc:
        print(f"freezeasguard audit: error: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout if report.ok else sys.stderr
    if manifest_kid is not None:
        notes.append(f"every job's manifest must be signed by the publisher key {manifest_kid}")
    for note in notes:
        print(note, file=out)
    print(report.summary(), file=out)
    if report.ok and args.outputs:
        checked = _checked_outputs(args.log)
        for line in checked:
            print(line)
        print(f"outputs: {len(checked)} completed job output(s) re-hashed, all present and matching")
    return 0 if report.ok else 1
