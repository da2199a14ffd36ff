"""The ``freezeasguard`` command line.

Each subcommand is a function taking parsed arguments and returning an exit code; errors the user
can fix (bad config, bad data, a refused job, a failed proof) print one clear message and exit 2
(1 for a failed proof), never a traceback. Nothing imports this package: it sits on top.
"""
from __future__ import annotations

import argparse
import logging
import sys

from freezeasguard.engine import __version__
from freezeasguard.engine.cli import guard, service, train
from freezeasguard.engine.errors import FreezeAsGuardError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freezeasguard",
                                description="Guarded fine-tuning of text-to-image diffusion models.")
    p.add_argument("--version", action="version", version=f"freezeasguard {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    train.register(sub)  # info, finetune, generate, verify
    guard.register(sub)  # keygen, sign, learn-mask, mask-report
    service.register(sub)  # job submit, audit
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FreezeAsGuardError, FileNotFoundError) as e:
        print(f"freezeasguard {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
