"""The optimizer a training setup asks for, over the parameter groups it is handed."""
from __future__ import annotations

import torch

from freezeasguard.engine.backends import bitsandbytes_backend
from freezeasguard.engine.config import TrainConfig
from freezeasguard.engine.errors import BackendError


def make_optimizer(groups: list[dict], tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW, per ``tc.optimizer``."""
    groups = [g for g in groups if g["params"]]
    if tc.optimizer == "adamw8bit":
        b = bitsandbytes_backend()
        if not b.available:
            raise BackendError(f"train.optimizer=adamw8bit needs bitsandbytes: {b.reason} "
                               "(pip install bitsandbytes, or use train.optimizer=adamw)")
        import bitsandbytes as bnb  # optional backend: imported only when asked for

        return bnb.optim.AdamW8bit(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=device.type == "cuda")
