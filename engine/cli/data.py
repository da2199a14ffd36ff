"""``export-digits``: the built-in digits as an image folder a newcomer can point every command at
(the data module, and torch under it, is imported after the arguments are checked)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_export_digits(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        print(f"freezeasguard export-digits: error: {out} exists; refusing to replace it", file=sys.stderr)
        return 2
    from freezeasguard.engine.model.data import DIGIT_WORDS, digits_dataset, write_image_folder

    classes = None
    if args.classes:
        words = [w.strip() for w in args.classes.split(",") if w.strip()]
        bad = [w for w in words if w not in DIGIT_WORDS and not (w.isdigit() and int(w) < 10)]
        if bad:
            print(f"freezeasguard export-digits: error: unknown digit class(es) {bad}; use 0-9 or {list(DIGIT_WORDS)}",
                  file=sys.stderr)
            return 2
        classes = sorted({int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in words})
    ds = digits_dataset(args.resolution, classes=classes)
    write_image_folder(ds, out)
    counts = {d: sum(1 for x in ds.domains if x == d) for d in ds.domain_names()}
    print(f"{len(ds)} images ({args.resolution} px) with metadata.jsonl written to {out}; domains: "
          + ", ".join(f"{d} {n}" for d, n in counts.items()))
    return 0
