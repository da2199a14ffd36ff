"""``keygen``, ``sign``, ``learn-mask`` and ``mask-report``: the publisher's side of the guard."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freezeasguard.engine.config import from_dict, resolve
from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.learn.diagnostics import convergence, loss_summary
from freezeasguard.engine.learn.pipeline import baseline_path, learn_mask
from freezeasguard.engine.learn.report import format_report, jaccard, plot_masks
from freezeasguard.engine.service import signing
from freezeasguard.engine.service.signing import load_key, sign_manifest


def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"freezeasguard keygen: error: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    key = signing.new_hmac_key() if args.algorithm == signing.HMAC_SHA256 else signing.new_ed25519_key()
    signing.save_key(key, args.out, public_path=args.public)
    print(f"{args.algorithm} key {key.key_id} written to {args.out}" + (f" (public half: {args.public})" if args.public else ""))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    signed = sign_manifest(Manifest.load(args.manifest), load_key(args.key))
    out = args.out or args.manifest
    signed.save(out)
    print(f"signed manifest {signed.digest()[:16]}... with {signed.signature['alg']} key "
          f"{signed.signature['key_id']}: {out}")
    return 0


def _domains(text: str) -> tuple[list[str], list[float]]:
    """'a,b:2' -> (['a', 'b'], [1.0, 2.0]); a weight follows the last ':' of an item."""
    names, weights = [], []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, w = item.rpartition(":")
        if not sep:
            name, w = item, "1"
        try:
            weights.append(float(w))
        except ValueError:
            raise MaskLearnError(f"bad domain weight in {item!r} (expected NAME or NAME:WEIGHT)") from None
        names.append(name)
    if not names:
        raise MaskLearnError(f"no domain named in {text!r}")
    return names, weights


def resolve_learn_config(args: argparse.Namespace):
    """File, then --set overrides, then the explicit flags (which win)."""
    cfg = resolve(MaskLearnConfig, file=args.config, overrides=args.overrides, presets={})
    ill, w_ill = _domains(args.illegal)
    if any(x != 1.0 for x in w_ill):
        raise MaskLearnError(f"--illegal {args.illegal!r}: weights apply to innocent domains only")
    inn, w = _domains(args.innocent)
    flags: dict = {"base": args.base, "data": args.data, "illegal": ill, "innocent": inn,
                   "innocent_weights": w if any(x != 1.0 for x in w) else None,
                   "mask": {"budget": args.budget, "budget_by": args.budget_by}}
    for key in ("steps", "bootstrap_steps", "finetuned", "seed"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    flags["work_dir"] = args.work or cfg.work_dir or str(Path(args.out).with_suffix(".run"))
    return from_dict(MaskLearnConfig, flags, base=cfg).validate()


def cmd_learn_mask(args: argparse.Namespace) -> int:
    cfg = resolve_learn_config(args)
    res = learn_mask(cfg, args.out, resume=args.resume, baselines=args.baselines)
    if res.learner.dist.is_main:
        atomic_write_json(Path(cfg.work_dir) / "config.json", cfg.to_dict())
        s = loss_summary(res.learner)
        print(f"learned mask: {res.mask.summary()}")
        c = convergence(res.learner, res.mask)
        state = "converged" if c["converged"] else "NOT converged: the export ranks small logit differences"
        print(f"soft mask: {100 * c['agreement']:.0f}% of the frozen parameters have m > 1/2, logits spread over "
              f"{c['spread']:.3g} T ({state})")
        print(f"losses (first -> last {s['window']} steps): L_illegal {s['first']['L_illegal']:.4f} -> "
              f"{s['last']['L_illegal']:.4f}, L_innocent {s['first']['L_innocent']:.4f} -> "
              f"{s['last']['L_innocent']:.4f}")
        print(f"manifest written to {args.out} (log and checkpoints in {cfg.work_dir})")
        for name, m in res.baselines.items():
            print(f"baseline {name}: {m.mask().summary()} -> {baseline_path(args.out, name)}")
    return 0


def cmd_mask_report(args: argparse.Namespace) -> int:
    masks = {}
    for path in [args.manifest, *([args.other] if args.other else [])]:
        label = Path(path).stem if Path(path).stem not in masks else f"{Path(path).stem} (2)"
        manifest = Manifest.load(path)
        masks[label] = manifest.mask()
        prov = manifest.provenance
        print(format_report(masks[label], label))
        print(f"  made by: {prov.get('method')}, seed {prov.get('seed')}, budget {prov.get('budget', 'n/a')}")
    if len(masks) == 2:
        a, b = masks.values()
        j = jaccard(a, b)
        print(f"Jaccard overlap of frozen sets: {j['tensors']:.3f} by tensors, {j['params']:.3f} by params")
    if args.png:
        plot_masks(masks, args.png)
        print(f"plot written to {args.png}")
    return 0


def register(subparsers) -> None:
    sub = subparsers
    s = sub.add_parser("keygen", help="make a publisher key for signing manifests")
    s.add_argument("--out", required=True, help="key file to write (0600)")
    s.add_argument("--algorithm", choices=["hmac-sha256", "ed25519"], default="ed25519")
    s.add_argument("--public", help="ed25519: also write the public half here (what the service verifies with)")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("sign", help="sign a freeze manifest with a publisher key")
    s.add_argument("--manifest", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--out", help="signed manifest (default: in place, atomically)")
    s.set_defaults(func=cmd_sign)

    s = subparsers.add_parser("learn-mask", help="learn a FreezeAsGuard mask and write it as a freeze manifest")
    s.add_argument("--base", required=True, help="base model folder (Stable Diffusion layout)")
    s.add_argument("--data", required=True, help="'digits' or an image folder with a domain per image")
    s.add_argument("--illegal", required=True, metavar="D[,D..]", help="illegal domain(s)")
    s.add_argument("--innocent", required=True, metavar="D[:W][,D..]", help="innocent domain(s), optional weights")
    s.add_argument("--budget", type=float, required=True, help="freeze budget rho in [0, 1]")
    s.add_argument("--budget-by", choices=("params", "tensors"), default="params")
    s.add_argument("--out", required=True, help="manifest to write (JSON)")
    s.add_argument("--steps", type=int, help="total steps (user + mask)")
    s.add_argument("--bootstrap-steps", type=int, help="mixed fine-tuning steps giving theta_ft")
    s.add_argument("--finetuned", help="fine-tuned model folder to use as theta_ft (no bootstrap)")
    s.add_argument("--seed", type=int)
    s.add_argument("--work", help="folder for the log, checkpoints and bootstrap model (default: OUT.run)")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work folder")
    s.add_argument("--baselines", action="store_true",
                   help="also write random, magnitude and saliency masks at the same budget (OUT.<name>.json)")
    s.add_argument("--config", help="YAML or JSON file of mask-learning settings")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set mask.lr=0.1 (repeatable)")
    s.set_defaults(func=cmd_learn_mask)

    s = subparsers.add_parser("mask-report", help="where a mask's frozen tensors sit; overlap of two masks")
    s.add_argument("manifest", help="freeze manifest (JSON)")
    s.add_argument("other", nargs="?", help="a second manifest to compare against (Jaccard overlap)")
    s.add_argument("--png", help="also draw the report to this PNG")
    s.set_defaults(func=cmd_mask_report)
