"""``info``, ``finetune``, ``generate``, ``verify`` and ``export-data``: the engine's own jobs."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file

from freezeasguard.engine import __version__
from freezeasguard.engine.backends import all_backends
from freezeasguard.engine.config import resolve
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.verify import verify_frozen
from freezeasguard.engine.model.components import load_components
from freezeasguard.engine.model.sampling import generate, save_grid
from freezeasguard.engine.train.trainer import Trainer


def cmd_info(args: argparse.Namespace) -> int:
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
    return 0


# finetune --------------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named config preset (tiny, small, sd15, sd21)")
    p.add_argument("--config", help="YAML or JSON config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def cmd_finetune(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for key, val in (("data.path", args.data), ("train.steps", args.steps), ("out_dir", args.out),
                     ("model.pretrained", args.model), ("train.seed", args.seed)):
        if val is not None:
            overrides.append(f"{key}={val}")
    cfg = resolve(preset=args.preset, file=args.config, overrides=overrides)
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
    c = load_components(args.model)
    prompts = args.prompt * args.num
    imgs = generate(c, prompts, steps=args.steps, guidance=args.guidance, seed=args.seed, progress=True)
    save_grid(imgs, args.out, nrow=min(8, len(prompts)))
    print(f"{len(prompts)} image(s) written to {args.out}")
    return 0


# verify ----------------------------------------------------------------------------------------
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
    state = load_unet_state(args.model)
    problems = manifest.model_problems(state, dtypes=False, fingerprint=False)
    report = verify_frozen(manifest, state)
    for p in problems:
        print(f"layout: {p}")
    for n in report.failures:
        print(f"FAIL {report.details[n]}")
    print(report.summary())
    return 0 if report.ok and not problems else 1


def register(sub) -> None:
    s = sub.add_parser("info", help="versions, device, and which optional backends are usable")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("finetune", help="fine-tune a model (full, or guarded by a freeze manifest)")
    _add_config_args(s)
    s.add_argument("--data", help="'digits' or an image folder with metadata.jsonl")
    s.add_argument("--model", help="model folder in Stable Diffusion layout (default: preset weights)")
    s.add_argument("--steps", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--out", help="output folder (logs, checkpoints, final/)")
    s.add_argument("--resume", nargs="?", const="latest", help="resume from the latest (or a given) checkpoint")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("generate", help="sample images from a model folder")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", action="append", required=True, help="repeatable")
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("verify", help="prove every frozen tensor of a model is bit-identical to the manifest")
    s.add_argument("--manifest", required=True)
    s.add_argument("--model", required=True, help="model folder, unet/ folder or .safetensors file")
    s.set_defaults(func=cmd_verify)
