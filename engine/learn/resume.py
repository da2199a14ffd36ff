"""What a mask-learning checkpoint records about its run, and when another run may resume from it.

A resumed run must be the uninterrupted one, bit for bit, so a checkpoint is refused unless it was
written for the same flat layout, the same base weights (by the SHA-256 of ``theta_pre``) and the
same settings, apart from how long the run goes on and how it reports (``FREE_KEYS``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.learn.flat import FlatLayout
from freezeasguard.engine.train import checkpoint as ckpt
from freezeasguard.engine.version import __version__

# The learner's buffers a checkpoint holds, one file each.
STATE_KEYS = ("theta", "theta_d", "exp_avg", "exp_avg_sq", "logits")
FREE_KEYS = ("steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "num_threads",
             "work_dir", "device")


def buffer_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy()).hexdigest()


def checkpoint_state(cfg: MaskLearnConfig, layout: FlatLayout, theta_pre_sha256: str, user_steps: int,
                     history: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``state.json`` of a learner checkpoint (what ``read_resumable`` checks)."""
    return {"user_steps": user_steps, "names": list(layout.names), "numels": list(layout.numels),
            "chunk": layout.chunk, "theta_pre_sha256": theta_pre_sha256, "config": cfg.to_dict(),
            "history": history, "version": __version__}


def read_resumable(path: str | Path | None, root: Path, cfg: MaskLearnConfig, layout: FlatLayout,
                   theta_pre_sha256: str) -> ckpt.Checkpoint:
    """The checkpoint at ``path`` (default: the latest under ``root``), refused with a
    MaskLearnError when it belongs to another model, layout, base or config."""
    found = ckpt.read_checkpoint(path, root)
    if found is None:
        raise MaskLearnError(f"no mask-learning checkpoint under {path if path is not None else root}")
    state = found.state
    if (state["names"], state["numels"], state["chunk"]) != (list(layout.names), list(layout.numels), layout.chunk):
        raise MaskLearnError(f"checkpoint {found.path} was written for a different model or layout")
    if state["theta_pre_sha256"] != theta_pre_sha256:
        raise MaskLearnError(f"checkpoint {found.path} was written for other base weights")
    diff = ckpt.config_differences(cfg.to_dict(), state["config"], FREE_KEYS)
    if diff:
        raise MaskLearnError(f"checkpoint {found.path} was written with another config: {diff}")
    return found
