"""The measured peak of one training step: what the allocator held at most, not a model of it.

``measure_step_peak`` runs one step and returns ``held_at_start + above_start``:

* ``held_at_start``: the bytes of every storage on the step's device reachable from the roots
  passed (the trainer passes its denoiser, optimizer and guard), each storage once, read when the
  step begins. Gradients that a ``zero_grad(set_to_none=True)`` dropped are not there, so nothing
  the step allocates is counted twice.
* ``above_start``: the allocator's maximum above what was allocated when the step began. On CUDA
  that is ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated``
  at the start. On CPU the caching-free allocator keeps no such counter, so the step runs under
  ``torch.profiler`` with ``profile_memory=True``: every allocation and free is an event with its
  signed size, and the running sum of the events in time order is the bytes allocated above the
  start at each instant; its maximum is exact (the profiler sees every allocation torch's CPU
  allocator makes, on every thread).

The memory ledger (``train.ledger``) explains where these bytes go; tests hold the two together.
"""
from __future__ import annotations

import gc
import types
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

MiB = 1 << 20
# Objects the walk does not enter: code and classes lead to the whole interpreter, not to what a
# training setup holds (hooks and patched forwards are functions; what they close over is the
# setup's modules, reached through the modules themselves).
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, types.FrameType, str, bytes, int, float, bool, complex, torch.device, torch.dtype)


@dataclass
class StepPeak:
    """One step's measured peak on ``device`` (bytes)."""

    device: str
    held_at_start: int  # storages reachable from the roots when the step began
    above_start: int  # the allocator's maximum above its start within the step
    method: str  # how ``above_start`` was measured

    @property
    def peak_bytes(self) -> int:
        return self.held_at_start + self.above_start

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def _tensors(roots: Iterable[Any]):
    """Every tensor reachable from ``roots`` through Python references, and their ``.grad``."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        o = stack.pop()
        if o is None or id(o) in seen or isinstance(o, _OPAQUE):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            yield o
            if o.is_leaf:
                stack.append(o.grad)
            continue
        stack.extend(gc.get_referents(o))


def held_bytes(roots: Iterable[Any], device: torch.device | str) -> int:
    """Bytes of the distinct storages on ``device`` reachable from ``roots`` (a DTensor counts its
    local shard). Views of one buffer count the buffer once, in full."""
    device = torch.device(device)
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .grad of a non-leaf is never read, but be quiet about it
        for t in _tensors(roots):
            t = t.to_local() if isinstance(t, DTensor) else t
            if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
                continue
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def cpu_above_start(events) -> int:
    """The maximum of the running sum of signed allocation sizes, in time order (0 if it never rises)."""
    cur = top = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        top = max(top, cur)
    return top


def _cpu_memory_events(prof) -> list[tuple[int, int]]:
    cpu = torch.device("cpu").type
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and str(e.device_type()).split(".")[-1].lower() == cpu:
            out.append((e.start_ns(), e.nbytes()))
    return out


def measure_step_peak(step: Callable[[], Any], roots: Iterable[Any], device: torch.device | str
                      ) -> tuple[Any, StepPeak]:
    """Run ``step()`` once and measure its peak on ``device``; returns (what it returned, StepPeak)."""
    device = torch.device(device)
    roots = list(roots)
    gc.collect()
    held = held_bytes(roots, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = step()
        torch.cuda.synchronize(device)
        above = torch.cuda.max_memory_allocated(device) - start
        return out, StepPeak(str(device), held, above, "cuda max_memory_allocated above the step's start")
    if device.type != "cpu":
        raise ValueError(f"no allocator peak is measured on {device.type}")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        out = step()
    above = cpu_above_start(_cpu_memory_events(prof))
    return out, StepPeak(str(device), held, above, "cpu profiler memory events, running sum")
