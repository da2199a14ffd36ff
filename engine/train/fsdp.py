"""FSDP2 (``torch.distributed.fsdp.fully_shard``) composed with the freeze: ``train.parallel=fsdp``.

For denoisers that do not fit one device (a 12B Flux transformer); DDP stays the default where the
model fits. With one process there is nothing to shard and the plain path runs (``parallel_for``).

What is sharded, and when. The freeze is enforced first (``train.wiring.apply_freeze``: frozen
tensors leave autograd, are held in bf16 under bf16 autocast, frozen convs become
``FrozenConv2d``), with the denoiser still on the host; then ``shard_denoiser`` applies
``fully_shard`` to each repeated block the model family names (``Family.blocks``: UNet down/mid/up
blocks, transformer blocks) and then to the root, which keeps the rest (embeddings, stem, head).
``fully_shard`` moves each unit to the device as it shards it, so the full denoiser never sits on
one device (the trainer sets the attention backend again afterwards: 'auto' looks at the device).
Every tensor, frozen or not, is sharded on dim 0 (``DTensor`` ``Shard(0)``, the last ranks' shards
padded or empty when dim 0 does not divide). Frozen shards get no gradient and no
optimizer state: FSDP reduce-scatters only tensors that require grad.

bf16 frozen storage works as it is: FSDP2 requires one dtype per unit only among the tensors that
require grad (``FSDPParamGroup._init_mp_dtypes``); a unit holding fp32 trainable, bf16 frozen and
fp32 frozen norm tensors is all-gathered as bytes (``foreach_all_gather`` switches to uint8 when
dtypes mix) and each tensor comes back in its own dtype, so autocast sees what it sees unsharded.

The optimizer runs per shard. ``ShardedFlatAdamW`` is the engine's ``FlatAdamW`` over this rank's
local shards: its one flat fp32 buffer holds every trainable tensor's padded local shard, and FSDP
is pointed at it (the shard FSDP all-gathers from, ``FSDPParam._sharded_param_data``, and the
DTensor's local tensor become views of the buffer), so the weights are stored once and the step
writes what the next all-gather reads. The gradients are DTensors over views of the flat gradient
buffer: FSDP adds each reduce-scattered shard into an existing gradient in place, which is also how
micro-batches accumulate (each one is reduce-scattered; there is no ``no_sync``). Clipping uses
the norm of the full gradient: the squared local norms are all-reduced. The binding uses FSDP2's
private state (torch 2.13) and is checked at every step: if FSDP ever rebinds a shard or gradient,
the step stops with an error instead of training a copy. torch's AdamW over the DTensors is the
reference (``freeze.mode=full|naive`` use it as they are).

The proof and the saved model. ``TensorGuard.export_state``/``verify`` gather every sharded tensor
(``DTensor.full_tensor()``, to the host): the manifest check, the live bf16 check, the final model
and its ``verify.json`` are those of a one-process run. Every rank takes part in the gathers; the
main process writes. Checkpoints hold the gathered trainable tensors (the files of a one-process
run) and every rank's flat optimizer state (gathered to the main process's host, one entry per
rank); they resume under FSDP with the same process count (others are refused by name).

The moments may be compact (``train.optimizer_states=bf16|8bit``): the flat AdamW lays them out
over the padded local shards exactly as over whole tensors (8-bit blocks start at each shard), so
a process steps its shards as ``FlatAdamW`` steps tensors of their shapes (tested bit for bit).

Memory per device, W processes, P_t trainable and P_f frozen parameters: trainable 4 P_t / W
(fp32 shards, in the flat buffer only), gradients 4 P_t / W, AdamW moments 8 P_t / W (4 in bf16,
about 2 in 8 bits), frozen
2 P_f / W under bf16 storage (4 P_f / W in fp32), no frozen gradient or state; plus, transiently,
two all-gathered blocks (the one computing and the one prefetched, in their storage dtypes, with a
block's unsharded gradients in backward) and the root's tensors, which FSDP2 keeps gathered from
forward to backward (``train.memplan``'s ``per_device`` counts exactly these). On the host
each process keeps the guard's fp32 copies of bf16-held frozen tensors, and the export gathers the
full model to every process's host.

Refused under FSDP (``FinetuneConfig.validate``; direction locks in ``train.wiring`` and here, custom
wirings in ``parallel_for``): in-backward updates, bitsandbytes' 8-bit AdamW, ``train.compile``,
direction locks, custom wirings. Tested on CPU with gloo (tests/test_fsdp.py). The memory ledger
(``train.ledger``) counts what each process holds: on the busiest it equals ``train.memplan``'s
per-device shards byte for byte (tested), and the all-gathered weights autograd saves are weights,
not activations.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from freezeasguard.engine.config import TrainConfig
from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.families import family_of
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.train.checkpoint import Checkpoint
from freezeasguard.engine.train.distributed import DistInfo
from freezeasguard.kernels.adamw import global_grad_norm

# Families whose sharded units return views (Flux's single-stream blocks and root slice their
# outputs), which FSDP2 warns about: an in-place op on such a view would drop the pre-backward
# all-gather. diffusers' forward does none on them, and tests/test_fsdp.py checks it where it
# matters: 2 processes' gradients, losses and weights against one process's for these families.
# The warning stays for the others (SD3, SDXL are not run under FSDP in the tests).
VIEW_OUTPUTS_CHECKED = frozenset({"sd", "flux"})


def shard_denoiser(unet: nn.Module, mesh: DeviceMesh) -> list[str]:
    """``fully_shard`` each repeated block of ``unet`` (``Family.blocks``), then the root; in place.
    Call it after the freeze (frozen tensors already out of autograd); returns the blocks."""
    if isinstance(unet, FSDPModule):
        raise TrainingError("the denoiser is already sharded (shard_denoiser runs once, after the freeze)")
    fam = family_of(unet)
    blocks = fam.blocks(unet)
    for name in blocks:
        fully_shard(unet.get_submodule(name), mesh=mesh)
    fully_shard(unet, mesh=mesh)
    if fam.name in VIEW_OUTPUTS_CHECKED:
        units = sorted({type(unet.get_submodule(n)).__name__ for n in blocks} | {type(unet).__name__})
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=rf"FSDP2-wrapped module \(({'|'.join(units)})\) returned a view tensor")
    return blocks


def _fsdp_params(model: nn.Module) -> dict[int, Any]:
    """id(sharded parameter) -> FSDP2's FSDPParam that owns its shard (private FSDP2 state)."""
    out = {}
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                out.update({id(fp.sharded_param): fp for fp in group.fsdp_params})
    return out


class ShardedFlatAdamW(FlatAdamW):
    """``FlatAdamW`` over this process's shards of FSDP2-sharded trainable tensors (module docstring).

    ``named``: the trainable parameters as ``fully_shard`` left them on ``model`` (DTensors);
    the other keyword arguments are ``FlatAdamW``'s (no ``locks``: a lock projects whole matrices).
    """

    def __init__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]], **kw):
        if kw.get("locks"):
            raise TrainingError("direction locks do not run under train.parallel=fsdp (a lock projects the "
                                "update of a whole matrix; a process holds rows of it): use train.parallel=ddp")
        owners = _fsdp_params(model)
        self.shards = []  # (name, sharded DTensor parameter, local stand-in, FSDPParam)
        for n, p in named:
            fp = owners.get(id(p))
            if fp is None or not isinstance(p, DTensor):
                raise TrainingError(f"trainable tensor {n!r} is not sharded by FSDP (shard the model first)")
            if fp.fsdp_placement != Shard(0) or fp.offload_to_cpu:
                raise TrainingError(f"{n!r}: ShardedFlatAdamW needs FSDP's default Shard(0) placement, no offload")
            # the padded local shard (a stand-in parameter FlatAdamW makes a view of its buffer)
            self.shards.append((n, p, nn.Parameter(fp._sharded_param_data.view(fp.padded_sharded_param_size)), fp))
        self.group = named[0][1].device_mesh.get_group() if named else None
        # persistent: FSDP reduce-scatters into the stand-in shards' .grad, which must stay views
        super().__init__([(n, q) for n, _, q, _ in self.shards], grad_buffer="persistent", **kw)
        with torch.no_grad():
            for _, p, q, fp in self.shards:
                rows = fp.sharded_size[0]
                fp._sharded_param_data = q.data.view(-1)  # what FSDP all-gathers: the buffer
                p._local_tensor = q.data.narrow(0, 0, rows)
                p.grad = DTensor.from_local(q.grad.narrow(0, 0, rows), p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())
        self.check_binding()

    def check_binding(self) -> None:
        """Every shard FSDP reads and every gradient it adds into is still a view of the buffers (an
        empty shard, a process past a tensor's last row, has no address to check but the padding)."""
        def bound(p: DTensor, q: nn.Parameter, fp: Any) -> bool:
            if fp._sharded_param_data.data_ptr() != q.data_ptr() or p.grad is None:
                return False
            local, grad = p.to_local(), p.grad.to_local()
            return local.numel() == 0 or (local.data_ptr() == q.data_ptr() and grad.data_ptr() == q.grad.data_ptr())

        bad = [n for n, p, q, fp in self.shards if not bound(p, q, fp)]
        if bad:
            raise TrainingError(f"FSDP rebound the shards or gradients of {len(bad)} tensor(s) (e.g. {bad[0]!r}) "
                                "away from the optimizer's buffer (a load_state_dict, zero_grad(set_to_none) or "
                                f"another torch version, here {torch.__version__}); nothing was updated")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """The norm of the full gradient (squared local norms summed over processes); with
        ``max_norm``, clip inside the next step."""
        sq = global_grad_norm(self.flat.grad).square()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt()
        self._norm = norm
        self._scale = None if max_norm is None else torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        self.check_binding()
        if self._norm is None:  # the non-finite check must see the global norm on every process
            self.clip_grad_norm_(None)
        return super().step()

    def describe(self) -> str:
        return super().describe() + f"; this process's FSDP shards (of {dist.get_world_size(self.group)})"


class Parallel:
    """Whole tensors on every process (one process, or DDP): the trainer's default."""

    sharded = False

    def __init__(self, dist_info: DistInfo, device: torch.device):
        self.dist, self.device = dist_info, device

    def place(self, c: Components) -> Components:
        return c.to(self.device)

    def shard(self, unet: nn.Module) -> None:  # noqa: ARG002 - nothing to shard
        return None

    def flat_adamw(self, unet: nn.Module, named: list, **kw) -> FlatAdamW:  # noqa: ARG002
        return FlatAdamW(named, **kw)

    def trainable_state(self, named: list) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in named}

    def checkpoint_state(self, named: list, optimizer) -> tuple[dict[str, torch.Tensor], Any]:
        """(trainable tensors, optimizer state) for a checkpoint (computed on every process)."""
        return dict(named), optimizer.state_dict()

    def load_checkpoint(self, found: Checkpoint, named: list, optimizer) -> None:
        state = found.object("optimizer", self.device)
        if isinstance(state, dict) and "fsdp_ranks" in state:
            raise TrainingError(f"checkpoint {found.path} was written by {len(state['fsdp_ranks'])} FSDP processes "
                                "(its optimizer state is per shard); resume it with as many processes")
        tensors = found.tensors("trainable")
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[n])
        optimizer.load_state_dict(state)

    def saving(self, unet: nn.Module) -> contextlib.AbstractContextManager:  # noqa: ARG002
        return contextlib.nullcontext()


class FullyShardedParallel(Parallel):
    """``train.parallel=fsdp`` over more than one process (module docstring)."""

    sharded = True

    def __init__(self, dist_info: DistInfo, device: torch.device):
        super().__init__(dist_info, device)
        self.mesh = init_device_mesh(device.type, (dist_info.world,))

    def place(self, c: Components) -> Components:
        # the denoiser stays on the host until shard(): fully_shard moves it unit by unit
        for m in c.frozen_networks:
            m.to(self.device)
        c.schedule = c.schedule.to(self.device)
        return c

    def shard(self, unet: nn.Module) -> None:
        shard_denoiser(unet, self.mesh)

    def flat_adamw(self, unet: nn.Module, named: list, **kw) -> FlatAdamW:
        return ShardedFlatAdamW(unet, named, **kw)

    @torch.no_grad()
    def trainable_state(self, named: list) -> dict[str, torch.Tensor]:
        """The full trainable tensors on the host of every process (a collective)."""
        return {n: p.full_tensor().cpu() for n, p in named}

    @torch.no_grad()
    def checkpoint_state(self, named: list, optimizer) -> tuple[dict[str, torch.Tensor], Any]:
        """Gathered trainable tensors, and every process's optimizer state, on the main process
        (a collective; the others get empty values)."""
        main = self.dist.is_main
        tensors = {}
        for n, p in named:
            full = p.full_tensor()
            if main:
                tensors[n] = full.cpu()
        mine = _to_host(optimizer.state_dict())
        ranks = [None] * self.dist.world if main else None
        dist.gather_object(mine, ranks, dst=0)
        return tensors, ({"fsdp_ranks": ranks} if main else None)

    def load_checkpoint(self, found: Checkpoint, named: list, optimizer) -> None:
        state = found.object("optimizer")
        ranks = state.get("fsdp_ranks") if isinstance(state, dict) else None
        if ranks is None or len(ranks) != self.dist.world:
            who = "one process or DDP" if ranks is None else f"{len(ranks)} FSDP processes"
            raise TrainingError(f"checkpoint {found.path} was written by {who}; this run has {self.dist.world} "
                                "FSDP processes and the optimizer state is per shard: resume it as it was written")
        tensors = found.tensors("trainable")
        with torch.no_grad():
            for n, p in named:
                mine = distribute_tensor(tensors[n].to(self.device), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(mine.to_local())
        optimizer.load_state_dict(ranks[self.dist.rank])

    @contextlib.contextmanager
    def saving(self, unet: nn.Module) -> Iterator[None]:
        """The denoiser under its own class while it is saved (FSDP2 swaps in a subclass named
        ``FSDP<class>``, which diffusers would write as the config's ``_class_name``)."""
        cls = type(unet)
        unet.__class__ = next(k for k in cls.__mro__ if not issubclass(k, FSDPModule))
        try:
            yield
        finally:
            unet.__class__ = cls


def _to_host(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def parallel_for(tc: TrainConfig, dist_info: DistInfo, device: torch.device, *,
                 custom_wiring: bool = False) -> Parallel:
    """The data-parallel strategy of a run: FSDP for ``train.parallel=fsdp`` over several processes
    (one process has nothing to shard: the plain path), else whole tensors (DDP over several)."""
    if tc.parallel != "fsdp" or dist_info.world <= 1:
        return Parallel(dist_info, device)
    if custom_wiring:
        raise TrainingError("train.parallel=fsdp runs the engine's own freeze wiring only (it shards the model "
                            "between the freeze and the optimizer); use train.parallel=ddp with a custom wiring")
    return FullyShardedParallel(dist_info, device)
