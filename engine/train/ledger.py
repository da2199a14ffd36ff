"""An exact, device-independent memory ledger of a training step.

Static memory (weights by dtype, split frozen/trainable; gradients; optimizer state) is read off
the live tensors, counting each storage once, so flat buffers with per-parameter views, shared
tensors and 8-bit optimizer states are all counted as what they really hold. Activation memory
is measured with ``count_saved_activations``: every tensor autograd saves for backward passes
through a ``saved_tensors_hooks`` pack hook, which works on any device and is deterministic.
On CUDA the allocator's peaks are added for comparison.

``Ledger.peak_bytes`` is the ledger's model of a step's peak; the peak itself is measured
(``train.peak``) and tests hold the two within a stated tolerance. The model: what outlives a step
(weights with the flat buffer's padding, optimizer state and its code tables, lock bases, and
gradients only where they persist between steps) plus the larger of the two things that take turns
during the step: the saved activations (with the one in-backward gradient alive at a time), which
backward frees as it produces the gradients, and gradients allocated within the step (which
``zero_grad(set_to_none=True)`` or a step-scoped flat buffer release after the update).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from freezeasguard.engine.errors import LedgerError

MiB = 1 << 20


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    # Meta tensors all report data_ptr 0; the StorageImpl address still tells storages apart.
    ptr = s.data_ptr() if t.device.type != "meta" else s._cdata
    return (str(t.device), ptr)


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of a tensor: a DTensor's local shard (FSDP2), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _held_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` this process holds. A DTensor sharded on a dim holds ``ceil(size / shards)``
    of it on every process: FSDP2 pads the last processes' shards (or gives them padding only), so
    the padded shard is what each one allocates."""
    if not isinstance(p, DTensor):
        return p.numel()
    shape = list(p.shape)
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            shape[pl.dim] = math.ceil(shape[pl.dim] / p.device_mesh.size(i))
    return math.prod(shape)


@dataclass
class SavedActivations:
    """What ``count_saved_activations`` saw: unique storages saved for backward and their bytes."""

    bytes: int = 0
    count: int = 0  # unique storages counted
    saves: int = 0  # pack-hook calls, parameters and repeats included
    by_dtype: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def count_saved_activations(params_to_exclude: nn.Module | Iterable[torch.Tensor] | None = None
                            ) -> Iterator[SavedActivations]:
    """Count the bytes of every tensor autograd saves for backward inside the ``with`` block.

    Each storage is counted once and in full (a saved view keeps its whole storage alive).
    Storages of ``params_to_exclude`` (a module's parameters, or tensors) are skipped, including
    when a parameter is a view into a larger flat buffer: the whole buffer is excluded. So is any
    saved parameter or view of one, whatever its storage: FSDP2 all-gathers a unit's weights into
    fresh storages for its forward (and frees them after), which are weights, not activations.

    Storages are keyed by address, so count one graph at a time: once a graph is freed, a later
    tensor may reuse an address and be missed.
    """
    if isinstance(params_to_exclude, nn.Module):
        params_to_exclude = params_to_exclude.parameters()
    excluded = {_storage_key(_local(p)) for p in (params_to_exclude or ())}
    seen: set[tuple[str, int]] = set()
    stats = SavedActivations()

    def pack(t: torch.Tensor) -> torch.Tensor:
        stats.saves += 1
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):  # a weight, counted as such
            return t
        key = _storage_key(t)
        if key not in excluded and key not in seen:
            seen.add(key)
            nbytes = _storage_nbytes(t)
            stats.bytes += nbytes
            stats.count += 1
            dt = str(t.dtype).removeprefix("torch.")
            stats.by_dtype[dt] = stats.by_dtype.get(dt, 0) + nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield stats


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += _storage_nbytes(t)
    return total


def _state_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor in an optimizer state entry (nested dicts/lists included)."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            for sub, t in _state_tensors(v):
                yield (str(k) if not sub else f"{k}.{sub}"), t
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


@dataclass
class Ledger:
    """Exact bytes held by one training setup. All sizes in bytes."""

    weights_frozen: dict[str, int]  # dtype -> bytes of frozen weights
    weights_trainable: dict[str, int]  # dtype -> bytes of trainable weights
    frozen_params: int
    trainable_params: int
    grad_bytes: int
    optimizer_state_bytes: int
    optimizer_state_by_key: dict[str, int]  # e.g. exp_avg, exp_avg_sq, step (bnb: state1, ...)
    activation_bytes: int | None = None
    lock_bytes: int = 0  # direction-lock bases the optimizer holds (optim.flat.FlatAdamW.lock_bytes)
    # the largest gradient held at once when updates run in backward (optim.inbackward): no
    # gradient outlives its update, so the step holds this instead of ``grad_bytes``
    grad_transient_bytes: int = 0
    # gradients kept from one step to the next (a persistent buffer); False where the step allocates
    # them and the update releases them (set_to_none, the step-scoped flat buffer)
    grads_between_steps: bool = True
    weight_padding_bytes: int = 0  # trainable storages' bytes beyond their tensors (8-bit block padding)
    code_table_bytes: int = 0  # tables the optimizer's kernels read (8-bit codes and midpoints)
    cuda_max_allocated: int | None = None
    cuda_max_reserved: int | None = None
    device: str = "cpu"

    @property
    def frozen_weight_bytes(self) -> int:
        return sum(self.weights_frozen.values())

    @property
    def trainable_weight_bytes(self) -> int:
        return sum(self.weights_trainable.values())

    @property
    def weight_bytes(self) -> int:
        return self.frozen_weight_bytes + self.trainable_weight_bytes

    @property
    def static_bytes(self) -> int:
        """Weights + gradients (persistent, or the in-backward peak) + optimizer state (+ lock bases)."""
        return (self.weight_bytes + self.grad_bytes + self.grad_transient_bytes + self.optimizer_state_bytes
                + self.lock_bytes)

    @property
    def total_bytes(self) -> int:
        """Static bytes plus saved activations (when measured)."""
        return self.static_bytes + (self.activation_bytes or 0)

    @property
    def held_bytes(self) -> int:
        """The model of what a step starts from: everything that outlives it."""
        persistent = self.grad_bytes if self.grads_between_steps else 0
        return (self.weight_bytes + self.weight_padding_bytes + self.optimizer_state_bytes + self.code_table_bytes
                + self.lock_bytes + persistent)

    @property
    def peak_bytes(self) -> int:
        """The model of the step's peak (module docstring): held bytes plus the larger of saved
        activations (+ the in-backward gradient) and gradients allocated within the step."""
        in_step = 0 if self.grads_between_steps else self.grad_bytes
        return self.held_bytes + max((self.activation_bytes or 0) + self.grad_transient_bytes, in_step)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(frozen_weight_bytes=self.frozen_weight_bytes,
                 trainable_weight_bytes=self.trainable_weight_bytes,
                 weight_bytes=self.weight_bytes, static_bytes=self.static_bytes,
                 total_bytes=self.total_bytes, held_bytes=self.held_bytes, peak_bytes=self.peak_bytes)
        return d

    def table(self) -> str:
        """A fixed-width table in MiB (and exact bytes)."""
        rows: list[tuple[str, int | None]] = []
        for dt, b in sorted(self.weights_frozen.items()):
            rows.append((f"weights frozen ({dt})", b))
        for dt, b in sorted(self.weights_trainable.items()):
            rows.append((f"weights trainable ({dt})", b))
        rows.append(("gradients", self.grad_bytes))
        if self.grad_transient_bytes:
            rows.append(("gradients (in backward)", self.grad_transient_bytes))
        rows.append(("optimizer state", self.optimizer_state_bytes))
        for k, b in sorted(self.optimizer_state_by_key.items()):
            rows.append((f"  state {k}", b))
        rows.append(("static total", self.static_bytes))
        if self.weight_padding_bytes or self.code_table_bytes:
            rows.append(("flat buffer padding", self.weight_padding_bytes))
            rows.append(("code tables", self.code_table_bytes))
        rows.append(("saved activations", self.activation_bytes))
        if self.activation_bytes is not None:
            rows.append(("static + activations", self.total_bytes))
            rows.append(("peak (model)", self.peak_bytes))
        if self.cuda_max_allocated is not None:
            rows.append(("cuda max allocated", self.cuda_max_allocated))
            rows.append(("cuda max reserved", self.cuda_max_reserved))
        lines = [f"{'memory (' + self.device + ')':<28}{'MiB':>12}{'bytes':>16}",
                 f"{'params frozen / trainable':<28}{self.frozen_params:>12,} / {self.trainable_params:,}"]
        for label, b in rows:
            mib = "-" if b is None else f"{b / MiB:.2f}"
            exact = "-" if b is None else f"{b:,}"
            lines.append(f"{label:<28}{mib:>12}{exact:>16}")
        return "\n".join(lines)


def memory_ledger(model: nn.Module, optimizer: Any = None, *,
                  saved_activation_bytes: int | SavedActivations | None = None,
                  frozen_names: Iterable[str] | None = None, grads_between_steps: bool | None = None) -> Ledger:
    """Account for the memory of ``model`` (and ``optimizer``) exactly.

    Args:
        model: the trained network. A parameter is trainable if it requires grad.
        optimizer: anything exposing ``.state`` (torch optimizers, bitsandbytes, ours); every
            tensor in it is counted once by storage.
        saved_activation_bytes: from ``count_saved_activations`` (object or its ``.bytes``).
        frozen_names: names of frozen weights; they may also name buffers (a frozen weight kept
            as a low-precision buffer). A listed parameter that requires grad is an error: the
            ledger would describe a freeze that is not in force.
        grads_between_steps: whether the gradients outlive a step. Default: the optimizer's
            ``grads_between_steps`` attribute where it has one (the flat AdamW says), else False
            where an optimizer is given (the trainer zeroes torch optimizers with set_to_none), True
            without one (the gradients found are all there is to say).

    Returns:
        A ``Ledger``. Weights are counted per tensor (numel x element size); gradients and
        optimizer state per unique storage, i.e. what is actually held, flat buffers included.
        Under FSDP2 every count is this process's: a sharded weight's padded dim-0 shard, the
        local shards of gradients and optimizer state.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    frozen_set = set(frozen_names) if frozen_names is not None else None
    if frozen_set is not None:
        unknown = sorted(frozen_set - set(params) - set(buffers))
        if unknown:
            raise LedgerError(f"frozen_names not found among the model's parameters or buffers: {unknown}")
        lifted = sorted(n for n in frozen_set if n in params and params[n].requires_grad)
        if lifted:
            raise LedgerError(f"{len(lifted)} parameter(s) listed as frozen require grad: {lifted}")

    frozen_w: dict[str, int] = defaultdict(int)
    train_w: dict[str, int] = defaultdict(int)
    n_frozen = n_train = 0
    for name, p in params.items():
        dt = str(p.dtype).removeprefix("torch.")
        held = _held_numel(p)
        if p.requires_grad:
            train_w[dt] += held * p.element_size()
            n_train += held
        else:
            frozen_w[dt] += held * p.element_size()
            n_frozen += held
    for name in sorted(frozen_set or ()):
        if name in buffers:
            b = buffers[name]
            frozen_w[str(b.dtype).removeprefix("torch.")] += b.numel() * b.element_size()
            n_frozen += b.numel()

    grad_bytes = _unique_bytes((_local(p.grad) for p in params.values() if p.grad is not None), set())
    # padding: a storage the trainable tensors are views of (the flat buffer) beyond their own bytes
    plain = [p for p in params.values() if p.requires_grad and not isinstance(p, DTensor)]
    padding = _unique_bytes(plain, set()) - sum(p.numel() * p.element_size() for p in plain) if plain else 0
    if grads_between_steps is None:
        grads_between_steps = bool(getattr(optimizer, "grads_between_steps", False)) if optimizer is not None \
            else True

    state_total, by_key = 0, defaultdict(int)
    if optimizer is not None:
        state = getattr(optimizer, "state", None)
        if state is None:
            raise LedgerError(f"{type(optimizer).__name__} exposes no .state to account for")
        seen: set[tuple[str, int]] = set()
        for entry in state.values():
            for key, t in _state_tensors(entry):
                b = _unique_bytes([_local(t)], seen)
                state_total += b
                by_key[key or "<tensor>"] += b

    act = saved_activation_bytes
    if isinstance(act, SavedActivations):
        act = act.bytes

    device = next((p.device for p in params.values()), torch.device("cpu"))
    max_alloc = max_reserved = None
    if device.type == "cuda":
        max_alloc = torch.cuda.max_memory_allocated(device)
        max_reserved = torch.cuda.max_memory_reserved(device)
    return Ledger(weights_frozen=dict(frozen_w), weights_trainable=dict(train_w),
                  frozen_params=n_frozen, trainable_params=n_train, grad_bytes=grad_bytes,
                  optimizer_state_bytes=state_total, optimizer_state_by_key=dict(by_key),
                  activation_bytes=act, lock_bytes=int(getattr(optimizer, "lock_bytes", 0) or 0),
                  grad_transient_bytes=int(getattr(optimizer, "peak_grad_bytes", 0) or 0),
                  grads_between_steps=grads_between_steps, weight_padding_bytes=max(padding, 0),
                  code_table_bytes=int(getattr(optimizer, "code_table_bytes", 0) or 0),
                  cuda_max_allocated=max_alloc,
                  cuda_max_reserved=max_reserved, device=str(device))
