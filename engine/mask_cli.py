"""``learn-mask`` and ``mask-report`` subcommands (added to the main parser by ``register``).

Errors a user can fix (bad domain, budget out of range, missing folder, bad manifest) print one
line ``freezeasguard <command>: error: ...`` on stderr and return exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from freezeasguard.engine.config import ConfigError
    from freezeasguard.engine.data import DatasetError
    from freezeasguard.engine.manifest import ManifestError
    from freezeasguard.engine.mask import MaskError
    from freezeasguard.engine.masklearn import MaskLearnError
    from freezeasguard.engine.models import ModelError
    from freezeasguard.engine.train import TrainingError

    return (ConfigError, DatasetError, ManifestError, MaskError, MaskLearnError, ModelError, TrainingError,
            FileNotFoundError)


def _guarded(name: str, fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except _user_errors() as e:
            print(f"freezeasguard {name}: error: {e}", file=sys.stderr)
            return 2

    return run


def _domains(text: str) -> tuple[list[str], list[float]]:
    """'a,b:2' -> (['a', 'b'], [1.0, 2.0]); a weight follows the last ':' of an item."""
    from freezeasguard.engine.masklearn import MaskLearnError

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
    from freezeasguard.engine.config import from_dict, resolve
    from freezeasguard.engine.masklearn import MaskLearnConfig

    cfg = resolve(MaskLearnConfig, file=args.config, overrides=args.overrides, presets={})
    ill, w_ill = _domains(args.illegal)
    if any(x != 1.0 for x in w_ill):
        from freezeasguard.engine.masklearn import MaskLearnError

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
    from freezeasguard.engine.io import atomic_write_json
    from freezeasguard.engine.mask_pipeline import baseline_path, learn_mask

    cfg = resolve_learn_config(args)
    res = learn_mask(cfg, args.out, resume=args.resume, baselines=args.baselines)
    if res.learner.dist.is_main:
        atomic_write_json(Path(cfg.work_dir) / "config.json", cfg.to_dict())
        s = res.learner.loss_summary()
        print(f"learned mask: {res.mask.summary()}")
        c = res.learner.convergence(res.mask)
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
    from freezeasguard.engine.manifest import Manifest
    from freezeasguard.engine.mask_report import format_report, jaccard, plot_masks

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
    s.set_defaults(func=_guarded("learn-mask", cmd_learn_mask))

    s = subparsers.add_parser("mask-report", help="where a mask's frozen tensors sit; overlap of two masks")
    s.add_argument("manifest", help="freeze manifest (JSON)")
    s.add_argument("other", nargs="?", help="a second manifest to compare against (Jaccard overlap)")
    s.add_argument("--png", help="also draw the report to this PNG")
    s.set_defaults(func=_guarded("mask-report", cmd_mask_report))
