"""``verify``: the proof anyone can rerun on a model folder, against a manifest (and the base, for locks).

The manifest pins the denoiser's *parameters*. A denoiser's weights file can also hold persistent
buffers (SD3's sin-cos position table ``pos_embed.pos_embed``), which no training step changes:
they are told apart by the denoiser class its ``config.json`` names (built on the meta device, so
nothing is allocated), left out of the manifest's check, and compared bit for bit with the base's
when ``--base`` is given (without it they are listed as not covered).

torch, safetensors and the model families are imported inside the functions that use them, so a
wrong flag is reported before seconds of imports.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from freezeasguard.engine.errors import ManifestError

_SHOWN = 20  # detail lines printed per kind; the counts say how many there are


def denoiser_folder(path: Path) -> Path:
    """The folder holding a model folder's denoiser weights: the one ``load_components`` loads
    (``detect_family``: the pipeline index, else the folders' configs), or ``path`` itself when it
    is a denoiser folder."""
    if (path / "unet").is_dir() or (path / "transformer").is_dir():
        from freezeasguard.engine.model.families import detect_family

        return path / detect_family(path).denoiser_dir
    return path


def load_unet_state(path: str | Path) -> dict:
    """Denoiser tensors of a model folder (``unet/`` or ``transformer/`` ``*.safetensors``), of a
    denoiser folder itself, or of a .safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(path)
    folder = denoiser_folder(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {folder} (a model folder holds them in unet/ "
                                "or transformer/)")
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    return state


def buffer_names(path: str | Path) -> set[str]:
    """Names of the persistent buffers of the denoiser a model folder (or denoiser folder) holds;
    empty for a bare weights file or a folder whose config names no supported denoiser class."""
    import torch

    from freezeasguard.engine.model.families import FAMILIES

    path = Path(path)
    if path.is_file():
        return set()
    folder = denoiser_folder(path)
    classes = {f.denoiser_class.__name__: f.denoiser_class for f in FAMILIES.values()}
    try:
        cls = classes.get(str(json.loads((folder / "config.json").read_text()).get("_class_name")))
    except (OSError, ValueError, AttributeError):
        return set()
    if cls is None:
        return set()
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    kept = set(model.state_dict())
    return {n for n, _ in model.named_buffers() if n in kept}


def _split(path: str | Path, buffers: set[str]) -> tuple[dict, dict]:
    """(parameters, persistent buffers) of a model folder's denoiser weights."""
    state = load_unet_state(path)
    return ({n: t for n, t in state.items() if n not in buffers},
            {n: t for n, t in state.items() if n in buffers})


def _buffer_problems(model: dict, base: dict) -> list[str]:
    import torch

    out = []
    for n in sorted(set(model) | set(base)):
        a, b = model.get(n), base.get(n)
        if a is None or b is None:
            out.append(f"buffer {n!r}: {'missing from the model' if a is None else 'not in the base'}")
        elif a.dtype != b.dtype or a.shape != b.shape or not torch.equal(
                a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            out.append(f"buffer {n!r}: differs from the base's")
    return out


def _check_base(manifest, base: dict, args: argparse.Namespace) -> None:
    """The lock is measured from the manifest's own base only. A wrong ``--base`` is named as the
    folder at fault: ``--model`` was already checked against the manifest and fits it."""
    problems = manifest.model_problems(base)
    if problems:
        raise ManifestError(f"--base {args.base} does not match {args.manifest} ({len(problems)} problem(s); "
                            f"--model {args.model} fits the manifest, so --base is not the base it was made "
                            "for):", problems[:_SHOWN]
                            + ([f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else []))


def cmd_verify(args: argparse.Namespace) -> int:
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.guard.subspace import lock_residuals
    from freezeasguard.engine.guard.verify import verify_frozen

    manifest = Manifest.load(args.manifest)
    lock = manifest.load_lock(args.manifest)
    if lock is not None and not args.base:
        raise ManifestError(f"{args.manifest} locks directions of {len(lock)} tensors: pass --base (the base "
                            "model folder) so their movement can be measured")
    # a bare weights file says nothing of its class: the base folder's (the manifest's model) does
    names = buffer_names(args.model) | (buffer_names(args.base) if args.base else set())
    state, buffers = _split(args.model, names)
    other = manifest.fit_summary(state)
    report = verify_frozen(manifest, state)
    bad_buffers: list[str] = []
    if args.base:
        base, base_buffers = _split(args.base, names)
        bad_buffers = _buffer_problems(buffers, base_buffers)
        if lock is not None and other is None:
            _check_base(manifest, base, args)
            deltas = {n: state[n].float() - base[n].float() for n in lock.locks}
            norms = {n: float(base[n].double().norm()) for n in lock.locks}
            report.add_lock_residuals(lock_residuals(lock, deltas, norms, args.steps))
    elif buffers:
        print(f"buffers: {len(buffers)} not covered by the manifest ({', '.join(sorted(buffers)[:_SHOWN])}); pass "
              "--base to compare them with the base's")
    if other is not None:  # the headline first; the details would otherwise bury it
        print(f"manifest is for another model: {other}")
        problems = manifest.model_problems(state, dtypes=False, fingerprint=False)
        for p in problems[:_SHOWN]:
            print(f"layout: {p}")
        if len(problems) > _SHOWN:
            print(f"layout: ... and {len(problems) - _SHOWN} more")
    for line in bad_buffers[:_SHOWN]:
        print(f"FAIL {line}")
    for n in report.failures[:_SHOWN]:
        print(f"FAIL {report.details[n]}")
    if len(report.failures) > _SHOWN:
        print(f"FAIL ... and {len(report.failures) - _SHOWN} more")
    print(report.summary() + (f"; {len(bad_buffers)} buffer(s) differ from the base" if bad_buffers else ""))
    return 0 if report.ok and other is None and not bad_buffers else 1
