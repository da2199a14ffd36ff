"""``mask-report``: where a mask's frozen tensors sit, and how much two masks overlap (torch and the
report's plotting are imported when the command runs: ``--help`` and a wrong flag stay instant)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_mask_report(args: argparse.Namespace) -> int:
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.learn.report import format_report, jaccard, plot_masks

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
