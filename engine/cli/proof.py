"""``keygen``, ``sign``, ``verify`` and ``audit``: keys, signatures and the proofs anyone can rerun."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from freezeasguard.engine.errors import JobLogError, ManifestError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import lock_residuals
from freezeasguard.engine.guard.verify import verify_frozen
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.signing import load_key, sign_manifest

_SHOWN = 20  # detail lines printed per kind; the counts say how many there are


def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"freezeasguard keygen: error: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    key = signing.new_hmac_key() if args.algorithm == signing.HMAC_SHA256 else signing.new_ed25519_key()
    signing.save_key(key, args.out, public_path=args.public)
    print(f"{args.algorithm} key {key.key_id} written to {args.out}" + (f" (public half: {args.public})" if args.public else ""))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    manifest = Manifest.load(args.manifest)
    lock = manifest.load_lock(args.manifest)  # checked against the manifest before it is signed
    signed = sign_manifest(manifest, load_key(args.key))
    out = args.out or args.manifest
    signed.save(out, lock=lock)
    print(f"signed manifest {signed.digest()[:16]}... with {signed.signature['alg']} key "
          f"{signed.signature['key_id']}: {out}")
    return 0


def load_unet_state(path: str | Path) -> dict:
    """UNet tensors of a model folder (unet/*.safetensors), a unet/ folder, or a .safetensors file."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    folder = path / "unet" if (path / "unet").is_dir() else path
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {folder}")
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    return state


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = Manifest.load(args.manifest)
    lock = manifest.load_lock(args.manifest)
    if lock is not None and not args.base:
        raise ManifestError(f"{args.manifest} locks directions of {len(lock)} tensors: pass --base (the base "
                            "model folder) so their movement can be measured")
    state = load_unet_state(args.model)
    other = manifest.fit_summary(state)
    report = verify_frozen(manifest, state)
    if lock is not None and other is None:
        base = load_unet_state(args.base)
        manifest.check_model(base)  # the lock is measured from the manifest's own base only
        deltas = {n: state[n].float() - base[n].float() for n in lock.locks}
        norms = {n: float(base[n].double().norm()) for n in lock.locks}
        report.add_lock_residuals(lock_residuals(lock, deltas, norms, args.steps))
    if other is not None:  # the headline first; the details would otherwise bury it
        print(f"manifest is for another model: {other}")
        problems = manifest.model_problems(state, dtypes=False, fingerprint=False)
        for p in problems[:_SHOWN]:
            print(f"layout: {p}")
        if len(problems) > _SHOWN:
            print(f"layout: ... and {len(problems) - _SHOWN} more")
    for n in report.failures[:_SHOWN]:
        print(f"FAIL {report.details[n]}")
    if len(report.failures) > _SHOWN:
        print(f"FAIL ... and {len(report.failures) - _SHOWN} more")
    print(report.summary())
    return 0 if report.ok and other is None else 1


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        report = audit_jobs(args.log, outputs=args.outputs, expect_head=args.head)
    except JobLogError as exc:
        print(f"freezeasguard audit: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
