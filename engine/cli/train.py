"""``info``, ``finetune`` and ``generate``: the engine's own jobs.

torch, diffusers and the engine's training stack are imported inside each command, after the
arguments and the config are checked: importing them takes seconds, and a typo should not wait.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform

from freezeasguard.engine.config import resolve
from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.version import __version__


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from freezeasguard.engine.backends import all_backends
    from freezeasguard.engine.model.tokenizer import clip_bpe_path

    rows = [("freezeasguard", __version__), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    for mod in ("diffusers", "transformers", "safetensors", "numpy"):
        try:
            rows.append((mod, importlib.metadata.version(mod)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((mod, "missing"))
    if torch.cuda.is_available():
        dev = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    else:
        dev = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    rows.append(("device", dev))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("optional backends:")
    for b in all_backends():
        print(f"  {b}")
    bpe = clip_bpe_path()
    print("  tokenizer for preset models: " + (f"CLIP BPE (merges from {bpe})" if bpe is not None else
          "word-level fallback (CLIP's BPE merges not found: pip install --no-deps open-clip-torch)"))
    return 0


# finetune --------------------------------------------------------------------------------------


def cmd_finetune(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for key, val in (("data.path", args.data), ("train.steps", args.steps), ("out_dir", args.out),
                     ("model.pretrained", args.model), ("train.seed", args.seed)):
        if val is not None:
            overrides.append(f"{key}={val}")
    cfg = resolve(preset=args.preset, file=args.config, overrides=overrides)
    from freezeasguard.engine.train.trainer import Trainer

    trainer = Trainer(cfg)
    if args.resume:
        step = trainer.resume(None if args.resume == "latest" else args.resume)
        print(f"resumed from step {step}")
    hist = trainer.fit()
    final = trainer.save_final()
    if trainer.dist.is_main:
        last = hist[-1] if hist else None
        msg = f"final loss {last.loss:.4f} after {last.step} steps; " if last else ""
        print(f"{msg}model written to {final}")
    return 0


# generate --------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    if args.cell < 0:
        raise ConfigError(f"--cell {args.cell}: must be >= 0 (0 keeps the model's resolution)")
    from freezeasguard.engine.model.components import load_components
    from freezeasguard.engine.model.sampling import generate, save_grid, save_samples

    c = load_components(args.model)
    prompts = args.prompt * args.num
    imgs = generate(c, prompts, steps=args.steps, guidance=args.guidance, seed=args.seed, progress=True,
                    sampler=args.sampler)
    scale = save_grid(imgs, args.out, nrow=min(8, len(prompts)), min_cell=args.cell)
    side = f"{imgs.shape[-1]} x {imgs.shape[-2]} px"
    print(f"{len(prompts)} image(s) of {side} written to {args.out}"
          + (f" (enlarged {scale}x for viewing; --cell 0 keeps the model's resolution)" if scale > 1 else ""))
    if args.raw:
        files = save_samples(imgs, args.raw)
        print(f"{len(files)} sample(s) at {side} written to {args.raw}/")
    return 0
