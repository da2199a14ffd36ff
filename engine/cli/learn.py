"""``learn-mask`` and ``learn-lock``: learning a guard from a base model and a labelled image folder.

The learners (and diffusers under them) are imported after the settings are checked, so a typo
is reported before seconds of imports.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from freezeasguard.engine.config import from_dict, resolve
from freezeasguard.engine.errors import MaskLearnError


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
    from freezeasguard.engine.learn.config import MaskLearnConfig

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
    from freezeasguard.engine.io import atomic_write_json
    from freezeasguard.engine.learn.diagnostics import convergence, loss_summary
    from freezeasguard.engine.learn.pipeline import baseline_path, learn_mask

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


def cmd_learn_lock(args: argparse.Namespace) -> int:
    from freezeasguard.engine.learn.lock_config import LockLearnConfig

    cfg = resolve(LockLearnConfig, file=args.config, overrides=args.overrides, presets={})
    flags: dict = {"base": args.base, "data": args.data, "illegal": _domains(args.illegal)[0],
                   "innocent": _domains(args.innocent)[0] if args.innocent else list(cfg.innocent)}
    for key in ("budget", "side", "rounds", "select", "steps", "mask", "seed"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    user = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    if user:
        flags["user"] = user
    cfg = from_dict(LockLearnConfig, flags, base=cfg).validate()
    from freezeasguard.engine.learn.lock_report import format_lock_report
    from freezeasguard.engine.learn.subspace import REPORT, learn_lock

    res = learn_lock(cfg, args.out, resume=args.resume)
    out = Path(args.out)
    print(format_lock_report(res.report))
    print(f"manifest written to {out / 'manifest.json'} with its locks file; report in {out / REPORT} and "
          f"{out / 'report.png'}; sign it with `freezeasguard sign --manifest {out / 'manifest.json'} --key KEY`")
    return 0
