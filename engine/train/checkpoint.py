"""Resumable checkpoints, shared by the trainer and the mask learner.

A checkpoint is one folder ``<root>/step-NNNNNN`` that appears in one rename (``io.atomic_dir``):
tensor files (safetensors, one file per group so at most one group is staged in host memory at a
time, each fsynced), optional torch-serialised optimizer states, and ``state.json`` (the step, the
resolved config and whatever the owner needs to refuse a checkpoint that is not its own). A folder
without ``state.json`` is never read. Only the main process writes; the caller puts barriers
around it (``DistInfo.barrier``).

Resuming also trims the owner's JSONL step log to the checkpoint's step, so that the steps the
resumed run repeats are logged once.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from freezeasguard.engine.io import atomic_dir, atomic_write_text
from freezeasguard.engine.train.distributed import DistInfo

STATE_FILE = "state.json"


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none)."""
    root = Path(root)
    found = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_on_main(dist: DistInfo, device: torch.device | str, write: Callable[[], Any], failure: Exception) -> None:
    """Run ``write`` on the main process after a barrier, then have every process agree that it
    worked: none runs ahead while it writes or reads a checkpoint before it is complete, and a
    failed write stops every process (the main one with the write's own error, the others with
    ``failure``) instead of leaving them waiting on a collective."""
    dist.barrier()
    error = None
    if dist.is_main:
        try:
            write()
        except Exception as exc:  # re-raised below, after every process has heard of it
            error = exc
    if not dist.all_ok(error is None, device):
        raise error if error is not None else failure


def write_checkpoint(root: str | os.PathLike, step: int, *, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                     state: Mapping[str, Any], objects: Mapping[str, Any] | None = None,
                     keep: int | None = None) -> Path:
    """Write ``<root>/step-<step>`` atomically.

    Args:
        tensors: file stem -> named tensors, one safetensors file each.
        state: JSON-able metadata (``step`` is added); read back by ``read_state``.
        objects: file stem -> object saved with ``torch.save`` (optimizer state dicts).
        keep: keep only the newest ``keep`` checkpoints under ``root`` (None keeps all).
    """
    path = checkpoint_dir(root, step)
    with atomic_dir(path) as tmp:
        for stem, group in tensors.items():
            f = tmp / f"{stem}.safetensors"
            save_file({k: t.detach().contiguous().cpu() for k, t in group.items()}, str(f),
                      metadata={"step": str(step)})
            _fsync(f)
        for stem, obj in (objects or {}).items():
            f = tmp / f"{stem}.pt"
            torch.save(obj, f)
            _fsync(f)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}))
        _fsync(tmp / STATE_FILE)
    if keep is not None:
        done = sorted(p for p in Path(root).glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


@dataclass
class Checkpoint:
    """A checkpoint folder that was found complete; tensors and objects are read on demand."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def tensors(self, stem: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{stem}.safetensors", device=str(device))

    def object(self, stem: str, device: torch.device | str = "cpu") -> Any:
        return torch.load(self.path / f"{stem}.pt", map_location=device, weights_only=True)


def read_checkpoint(path: str | os.PathLike | None, root: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint at ``path``, or the latest under ``root`` when ``path`` is None; None when there
    is none (a folder without ``state.json`` is incomplete and not read)."""
    p = Path(path) if path is not None else latest_checkpoint(root)
    if p is None or not (p / STATE_FILE).is_file():
        return None
    return Checkpoint(p, json.loads((p / STATE_FILE).read_text()))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], free: Iterable[str]) -> list[str]:
    """Dotted keys whose values differ between two configs, except keys in ``free`` (a free key
    ``a.b`` also frees ``a.b.*``): the settings a resumed run may change (steps, logging, device)."""
    free = tuple(free)
    a, b = _flat(mine), _flat(theirs)

    def is_free(k: str) -> bool:
        return any(k == f or k.startswith(f + ".") for f in free)

    return sorted(k for k in set(a) | set(b) if not is_free(k) and a.get(k) != b.get(k))


def trim_log(path: str | os.PathLike, step: int) -> None:
    """Drop the rows of a JSONL step log after ``step`` (they will be logged again on resume)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step")
        except json.JSONDecodeError:  # a line cut by a crash is not a logged step
            continue
        if isinstance(row_step, int) and row_step <= step:
            keep.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
