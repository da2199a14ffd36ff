"""The static memory of a training setup computed from tensor shapes alone (no allocation).

``memory_plan`` gives what ``ledger.memory_ledger`` would read off the live tensors of the same
setup -- weights by dtype, gradients, optimizer state, the in-backward gradient peak -- from a
model built on the ``meta`` device, so models that do not fit this machine (SD v1.5 on a laptop,
a 12B transformer anywhere) get an exact plan. Tests check it against the ledger of real setups
byte for byte.

Per trainable parameter (fp32 master weight):

    setup                     weight   grad             moments
    full / naive              4        4                8 (torch AdamW; + a 4 B step count per tensor)
    engine, fp32 moments      4        4                8
    engine, bf16 moments      4        4                4
    engine, 8-bit moments     4        4                2 + 8 per 256-element block
    ... with update_in_backward         0 (+ the largest tensor's, once)

Frozen parameters: 4 B in full and naive (naive's AdamW holds no state for them: they never get
a gradient), 2 B under the engine with bf16 frozen storage, except norm weights (kept fp32). The
8-bit buffer pads each tensor to whole blocks, as ``optim.flat`` lays it out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from freezeasguard.engine.guard.tensor import fp32_param_names
from freezeasguard.engine.optim.states import BLOCK, alignment, check_kind


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one setup holds before activations (``ledger.Ledger``'s static part)."""

    setup: str
    params: int
    frozen_params: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    grad_bytes: int
    grad_transient_bytes: int
    optimizer_state_bytes: int

    @property
    def static_bytes(self) -> int:
        return (self.frozen_weight_bytes + self.trainable_weight_bytes + self.grad_bytes
                + self.grad_transient_bytes + self.optimizer_state_bytes)

    def per_device(self, devices: int) -> "MemoryPlan":
        """The same plan sharded evenly over ``devices`` (FSDP-style: every tensor split, nothing replicated)."""
        def cut(x: int) -> int:
            return -(-x // devices)

        return MemoryPlan(f"{self.setup} / {devices} devices", self.params, self.frozen_params,
                          cut(self.frozen_weight_bytes), cut(self.trainable_weight_bytes), cut(self.grad_bytes),
                          cut(self.grad_transient_bytes), cut(self.optimizer_state_bytes))


def memory_plan(model: nn.Module, frozen: Iterable[str], *, mode: str = "engine", states: str = "fp32",
                in_backward: bool = False, frozen_bf16: bool = True) -> MemoryPlan:
    """The static memory of training ``model`` with ``frozen`` tensors under ``mode``.

    Args:
        model: any device, ``meta`` included (only shapes are read).
        frozen: names of frozen parameters.
        mode: 'full' (``frozen`` ignored), 'naive' or 'engine'.
        states: engine moments, 'fp32', 'bf16' or '8bit'.
        in_backward: engine updates inside backward (no gradient buffer).
        frozen_bf16: engine frozen storage in bf16 (bf16 autocast), norm weights excepted.
    """
    if mode not in ("full", "naive", "engine"):
        raise ValueError(f"mode must be full|naive|engine, got {mode!r}")
    check_kind(states)
    if mode != "engine" and (states != "fp32" or in_backward):
        raise ValueError("compact moments and in-backward updates are engine options")
    params = dict(model.named_parameters())
    frozen = set() if mode == "full" else set(frozen)
    unknown = sorted(frozen - set(params))
    if unknown:
        raise ValueError(f"frozen names not in the model: {unknown[:5]}")
    norms = fp32_param_names(model) if mode == "engine" and frozen_bf16 else set()
    trainable = [p.numel() for n, p in params.items() if n not in frozen]
    n_frozen = sum(params[n].numel() for n in frozen)
    frozen_w = sum(params[n].numel() * (4 if (n in norms or not (mode == "engine" and frozen_bf16)) else 2)
                   for n in frozen)
    align = alignment(states) if mode == "engine" else 1
    slots = sum(-(-k // align) * align for k in trainable)  # flat-buffer elements, padding included
    n_train = sum(trainable)
    if mode != "engine":
        # torch AdamW: two fp32 moments and a 0-d fp32 step count per tensor that got a gradient
        weights, grads, moments = 4 * n_train, 4 * n_train, 8 * n_train + 4 * len(trainable)
    else:
        weights = 4 * n_train
        grads = 0 if in_backward else 4 * slots
        moments = {"fp32": 8 * slots, "bf16": 4 * slots, "8bit": 2 * slots + 8 * (-(-slots // BLOCK))}[states]
        moments += 4 if in_backward else 0  # the previous step's norm (0-d fp32), which the next one clips by
    peak = 4 * max(trainable, default=0) if (mode == "engine" and in_backward) else 0
    label = mode if mode != "engine" else "engine" + (f"+{states}" if states != "fp32" else "") + \
        ("+in-backward" if in_backward else "")
    return MemoryPlan(label, sum(p.numel() for p in params.values()), n_frozen, frozen_w, weights, grads, peak,
                      moments)
