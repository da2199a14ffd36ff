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

Under FSDP2 (``MemoryPlan.per_device``, ``train.parallel=fsdp``) every tensor is sharded on dim 0,
each rank holding ``ceil(rows / devices)`` rows of it (FSDP2 pads the last ranks' shards), so the
busiest rank holds those shards of every weight, gradient and moment; on top of them it holds,
transiently, what FSDP2's default schedule all-gathers and reduce-scatters (``Unit``): the root's
tensors (kept gathered from forward to backward), two blocks' unsharded tensors at once (the one
computing and the one prefetched, in forward and in backward), each tensor in its storage dtype as
``train.fsdp`` all-gathers it, and a block's unsharded fp32 gradients together with the
reduce-scatter input they are copied into.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from torch import nn

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.guard.tensor import fp32_param_names
from freezeasguard.engine.model.families import family_of
from freezeasguard.engine.optim.states import alignment, check_kind, state_bytes


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit unsharded: a block the model family names (``Family.blocks``), or the root
    (every tensor outside the blocks)."""

    name: str
    param_bytes: int  # its tensors in their storage dtypes: what FSDP2 all-gathers
    grad_bytes: int  # its trainable tensors' fp32 gradients: what it reduce-scatters


@dataclass(frozen=True)
class HeldTensor:
    """What ``per_device`` needs of one parameter: dim-0 rows, elements, bytes per element held."""

    rows: int
    numel: int
    bytes_per_elem: int
    trainable: bool

    def shard(self, devices: int) -> int:
        """Elements of the busiest rank's dim-0 shard (FSDP2 pads every rank's shard to this)."""
        if self.numel == 0:
            return 0
        return -(-self.rows // devices) * (self.numel // self.rows)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one setup holds before activations (``ledger.Ledger``'s static part), on one device or,
    from ``per_device``, on the busiest of several FSDP2 processes."""

    setup: str
    params: int
    frozen_params: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    grad_bytes: int
    grad_transient_bytes: int
    optimizer_state_bytes: int
    devices: int = 1
    # FSDP2's transients (0 on one device): all-gathered tensors (the root's + two blocks'), and a
    # block's unsharded gradients with the reduce-scatter input they are copied into
    gather_transient_bytes: int = 0
    reduce_transient_bytes: int = 0
    mode: str = "engine"
    states: str = "fp32"
    in_backward: bool = False
    tensors: tuple[HeldTensor, ...] = field(default=(), repr=False, compare=False)
    units: tuple[Unit, ...] = field(default=(), repr=False, compare=False)  # blocks, then the root

    @property
    def sharded_bytes(self) -> int:
        """Weights, gradients and optimizer state (this device's shards of them)."""
        return (self.frozen_weight_bytes + self.trainable_weight_bytes + self.grad_bytes
                + self.grad_transient_bytes + self.optimizer_state_bytes)

    @property
    def fsdp_transient_bytes(self) -> int:
        return self.gather_transient_bytes + self.reduce_transient_bytes

    @property
    def static_bytes(self) -> int:
        """Everything but activations: ``sharded_bytes`` plus FSDP2's transients."""
        return self.sharded_bytes + self.fsdp_transient_bytes

    @property
    def largest_block(self) -> Unit | None:
        return max(self.units[:-1], key=lambda u: u.param_bytes, default=None)

    def per_device(self, devices: int) -> MemoryPlan:
        """What the busiest of ``devices`` FSDP2 processes holds (module docstring).

        Sharded: each tensor's ``ceil(rows / devices)``-row shard of its weight, gradient and
        moments (the flat buffers pad as on one device). Transient, for ``devices > 1``: the root's
        unsharded tensors, kept gathered from forward to backward, plus twice the largest block's
        (the block computing and the one FSDP2 prefetches), each in its storage dtype; and twice the
        largest unit's fp32 gradients (autograd's unsharded gradients and the reduce-scatter input
        they are copied into, both alive at the copy). One device runs the plain path: the plan.
        """
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if self.devices != 1:
            raise ValueError("per_device takes the one-device plan")
        if devices == 1:
            return replace(self, setup=f"{self.setup} / 1 device")
        train = [t.shard(devices) for t in self.tensors if t.trainable]
        frozen = [(t.shard(devices), t.bytes_per_elem) for t in self.tensors if not t.trainable]
        parts = _static(train, frozen, self.mode, self.states, self.in_backward)
        blocks, root = self.units[:-1], self.units[-1]
        gather = root.param_bytes + 2 * max((u.param_bytes for u in blocks), default=0)
        reduce = 2 * max(u.grad_bytes for u in self.units)
        return replace(self, setup=f"{self.setup} / {devices} devices", devices=devices,
                       frozen_weight_bytes=parts[0], trainable_weight_bytes=parts[1], grad_bytes=parts[2],
                       grad_transient_bytes=parts[3], optimizer_state_bytes=parts[4],
                       gather_transient_bytes=gather, reduce_transient_bytes=reduce)


def _static(train: list[int], frozen: list[tuple[int, int]], mode: str, states: str,
            in_backward: bool) -> tuple[int, int, int, int, int]:
    """(frozen weights, trainable weights, gradients, in-backward gradient peak, optimizer state) in
    bytes, for trainable tensors of ``train`` elements and frozen ones of (elements, bytes each)."""
    frozen_w = sum(n * b for n, b in frozen)
    n_train = sum(train)
    if mode != "engine":
        # torch AdamW: two fp32 moments and a 0-d fp32 step count per tensor that got a gradient
        return frozen_w, 4 * n_train, 4 * n_train, 0, 8 * n_train + 4 * len(train)
    align = alignment(states)
    slots = sum(-(-k // align) * align for k in train)  # flat-buffer elements, padding included
    grads = 0 if in_backward else 4 * slots
    moments = state_bytes(states, slots)
    moments += 4 if in_backward else 0  # the previous step's norm (0-d fp32), which the next one clips by
    peak = 4 * max(train, default=0) if in_backward else 0
    return frozen_w, 4 * n_train, grads, peak, moments


def _units(model: nn.Module, held: dict[str, HeldTensor]) -> tuple[Unit, ...]:
    """The FSDP2 units ``train.fsdp`` shards ``model`` into (its family's blocks, then the root)."""
    try:
        blocks = family_of(model).blocks(model)
    except ModelError:  # not a family's denoiser: FSDP2 over the root alone
        blocks = []
    owner: dict[str, str] = {}
    for b in blocks:
        owner.update({f"{b}.{n}": b for n, _ in model.get_submodule(b).named_parameters()})
    sizes = {b: [0, 0] for b in [*blocks, "<root>"]}
    for name, t in held.items():
        s = sizes[owner.get(name, "<root>")]
        s[0] += t.numel * t.bytes_per_elem
        s[1] += 4 * t.numel if t.trainable else 0
    return tuple(Unit(b, w, g) for b, (w, g) in sizes.items())


def memory_plan(model: nn.Module, frozen: Iterable[str], *, mode: str = "engine", states: str = "fp32",
                in_backward: bool = False, frozen_bf16: bool = True) -> MemoryPlan:
    """The static memory of training ``model`` with ``frozen`` tensors under ``mode``.

    Args:
        model: any device, ``meta`` included (only shapes are read).
        frozen: names of frozen parameters.
        mode: 'full' (``frozen`` ignored), 'naive' or 'engine'.
        states: engine moments, one of ``kernels.choices.STATE_KINDS``.
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
    low = mode == "engine" and frozen_bf16
    norms = fp32_param_names(model) if low else set()
    held = {n: HeldTensor(p.shape[0] if p.dim() else 1, p.numel(), 2 if (low and n in frozen and n not in norms) else 4,
                      n not in frozen) for n, p in params.items()}
    train = [t.numel for t in held.values() if t.trainable]
    parts = _static(train, [(t.numel, t.bytes_per_elem) for t in held.values() if not t.trainable],
                    mode, states, in_backward)
    label = mode if mode != "engine" else "engine" + (f"+{states}" if states != "fp32" else "") + \
        ("+in-backward" if in_backward else "")
    return MemoryPlan(label, sum(p.numel() for p in params.values()), sum(params[n].numel() for n in frozen),
                      *parts, mode=mode, states=states, in_backward=in_backward,
                      tensors=tuple(held.values()), units=_units(model, held))
