"""What a fine-tuning checkpoint records about its run, and when another run may resume from it.

A checkpoint (``train.checkpoint``) carries the trainable tensors' names, the resolved config and
the tokenizer next to its tensors. A run resumes from it only if it trains the same tensors with
the same settings: a resumed run must be the uninterrupted one, step for step, so only how long
it runs and how it reports (``RESUME_FREE_KEYS``) may change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from freezeasguard.engine.config import FinetuneConfig, from_dict
from freezeasguard.engine.errors import ConfigError, TrainingError
from freezeasguard.engine.train import checkpoint as ckpt
from freezeasguard.engine.version import __version__

CHECKPOINT_FORMAT = "freezeasguard.checkpoint/2"
RESUME_FREE_KEYS = ("out_dir", "train.steps", "train.progress", "train.log_every", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.device", "train.num_threads")


def checkpoint_state(cfg: FinetuneConfig, names: list[str], tokenizer: str) -> dict[str, Any]:
    """The ``state.json`` of a trainer checkpoint (what ``read_resumable`` checks)."""
    return {"format": CHECKPOINT_FORMAT, "trainable": names, "config": cfg.to_dict(), "tokenizer": tokenizer,
            "version": __version__}


def read_resumable(path: str | Path | None, root: Path, cfg: FinetuneConfig, names: list[str],
                   tokenizer: str) -> ckpt.Checkpoint:
    """The checkpoint at ``path`` (default: the latest under ``root``), refused with a
    TrainingError when it was written for other trainable tensors, another tokenizer, by another
    format, or with settings that change what is learned."""
    found = ckpt.read_checkpoint(path, root)
    if found is None:
        where = path if path is not None else root
        raise TrainingError(f"no checkpoint to resume from under {where} (a run writes one at its "
                            "last step and every train.checkpoint_every steps)")
    if found.state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"checkpoint {found.path} was written by another version of freezeasguard (format "
                            f"{found.state.get('format')!r}, this one reads {CHECKPOINT_FORMAT!r}); start a new run")
    if found.state.get("trainable") != names:
        raise TrainingError(f"checkpoint {found.path} was written for a different set of trainable tensors")
    try:  # keys the checkpoint's version did not have take their defaults
        theirs = from_dict(FinetuneConfig, found.state.get("config", {})).to_dict()
    except ConfigError as exc:
        raise TrainingError(f"checkpoint {found.path}: its config does not parse here ({exc})") from None
    free = RESUME_FREE_KEYS if cfg.train.lr_schedule == "constant" else \
        tuple(k for k in RESUME_FREE_KEYS if k != "train.steps")  # a cosine's length is part of its shape
    diff = ckpt.config_differences(cfg.to_dict(), theirs, free)
    if diff:
        raise TrainingError(f"checkpoint {found.path} was written with other settings: {diff} "
                            f"(only {list(free)} may change on resume)")
    if found.state.get("tokenizer") != tokenizer:
        raise TrainingError(f"checkpoint {found.path} was written with the tokenizer {found.state.get('tokenizer')}, "
                            f"this run has {tokenizer} (model.tokenizer=auto found another one)")
    return found
