"""torch.distributed under torchrun: joining the process group, and the collectives the engine uses.

Order matters on GPUs: every process pins its own device (``torch.cuda.set_device(local_rank)``)
*before* the NCCL process group is created and before any collective, or NCCL's communicators (and
the first collective's buffers) land on GPU 0 for every rank. Checkpoints are written by the main
process between a barrier and an agreement (``all_ok``): no rank runs ahead while it writes, none
reads a checkpoint that is not complete, and when the write fails every rank stops with an error
instead of waiting on a collective the main process never reaches.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.world > 1:
            dist.barrier()

    def all_ok(self, ok: bool, device: torch.device | str = "cpu") -> bool:
        """Whether every process reports ``ok`` (a collective: every process must call it, so it also
        synchronises them, like a barrier)."""
        if self.world <= 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        return float(flag) == 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes, in place (no-op in a single process)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1).

    On CUDA the process's GPU is set first (``LOCAL_RANK``), then the NCCL group is created bound to
    it; elsewhere the gloo backend is used.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
        # Left to the interpreter's teardown, the group's threads can outlive it: a finished run
        # then aborts at exit ("terminate called without an active exception", exit code -6).
        atexit.register(_leave_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
