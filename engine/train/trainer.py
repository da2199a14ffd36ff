"""Diffusion fine-tuning: the training step and the trainer (logs, checkpoints, resume, DDP, FSDP).

Determinism: everything random in step ``s`` comes from generators seeded by ``(seed, s)`` and is
drawn for the global batch (``train.batches``), so N steps + resume + N steps equals 2N steps bit
for bit, and 2 processes under DDP or FSDP (``train.fsdp``) see exactly the samples one process sees
at the same global batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from freezeasguard.engine.config import FinetuneConfig
from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.guard.tensor import TensorGuard
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.model.attention import set_attention_backend
from freezeasguard.engine.model.compile import compile_regions
from freezeasguard.engine.model.components import Components, save_components
from freezeasguard.engine.model.diffusion import diffusion_loss
from freezeasguard.engine.model.encode import prepare_data
from freezeasguard.engine.train import checkpoint as ckpt
from freezeasguard.engine.train import final, update
from freezeasguard.engine.train.batches import GlobalBatches, step_generator
from freezeasguard.engine.train.defaults import default_components, default_dataset, resolution_hint
from freezeasguard.engine.train.distributed import init_distributed
from freezeasguard.engine.train.fsdp import parallel_for
from freezeasguard.engine.train.ledger import count_saved_activations, memory_ledger
from freezeasguard.engine.train.progress import StepLog
from freezeasguard.engine.train.resume import checkpoint_state, read_resumable
from freezeasguard.engine.train.schedule import LRSchedule
from freezeasguard.engine.train.wiring import Wired, apply_freeze, as_wired, log_wiring
from freezeasguard.engine.version import __version__

log = logging.getLogger("freezeasguard")


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time: float
    samples_per_s: float
    memory: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "memory"}
        d.update(self.memory)
        return d


def _memory_now(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Trainer:
    """Fine-tunes a text-to-image diffusion UNet (text encoder and VAE stay frozen).

    Args:
        cfg: the resolved config.
        components: networks to train (default: built or loaded per ``cfg.model``).
        dataset: an ImageDataset (default: loaded per ``cfg.data``).
        wiring: ``wiring(unet) -> Wired(guard, named, optimizer)`` (``train.wiring``): freezes what
            it freezes and builds the optimizer over the trainable tensors, once, on the placed
            UNet. The guard it returns is the trainer's for the whole run: what ``verify_frozen``
            proves and ``save_final`` requires. A bare ``(named, optimizer)`` pair is a wiring with
            no guard, whose final model is refused when ``freeze.manifest`` is set. Default:
            ``apply_freeze`` (the freeze of ``cfg.freeze``).
    """

    def __init__(self, cfg: FinetuneConfig, components: Components | None = None, dataset=None,
                 wiring: Callable[[nn.Module], Wired] | None = None):
        self.cfg = cfg.validate()
        tc = cfg.train
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        dev = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = init_distributed(torch.device(dev).type)
        if dev == "cuda":
            dev = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(dev)
        self.parallel = parallel_for(tc, self.dist, self.device, custom_wiring=wiring is not None)  # train.fsdp
        if self.cfg.train.batch_size % (self.dist.world * tc.grad_accum):
            raise TrainingError(f"train.batch_size {tc.batch_size} must be divisible by processes "
                                f"({self.dist.world}) x grad_accum ({tc.grad_accum})")
        self.out = Path(cfg.out_dir)

        if dataset is None:
            dataset = default_dataset(cfg, resolution_hint(cfg, components))
        self.dataset = dataset
        if components is None:
            components = default_components(cfg, dataset)
        self.c = self.parallel.place(components)
        want = cfg.model.prediction_type
        if want is not None and want != self.c.schedule.prediction_type:
            log.info("prediction_type %s (model.prediction_type) instead of the model's %s",
                     want, self.c.schedule.prediction_type)
            self.c.schedule = self.c.schedule.with_overrides(prediction_type=want)
        if dataset.resolution != self.c.resolution:
            raise TrainingError(f"dataset resolution {dataset.resolution} != model resolution {self.c.resolution}")
        for m in self.c.frozen_networks:
            m.requires_grad_(False).eval()
        self._set_attention()
        if tc.gradient_checkpointing:
            self.c.unet.enable_gradient_checkpointing()
        self.data = prepare_data(self.c, dataset, cache=cfg.data.cache, random_flip=cfg.data.random_flip,
                                 device=self.device, progress=tc.progress and self.dist.is_main)
        self.batches = GlobalBatches(len(self.data), tc.batch_size, tc.seed)

        self.c.unet.train()
        if wiring is None:
            wired = apply_freeze(self.cfg, self.c.unet, self.device, self.parallel)
            if self.dist.is_main:
                log_wiring(wired, cfg.freeze.mode)
        else:
            wired = as_wired(wiring(self.c.unet))
        self._guard: TensorGuard | None = wired.guard
        self._proof_required = final.proof_required(self.cfg, wired.guard)
        self.named_trainable, self.optimizer = wired.named, wired.optimizer
        self.trainable = [p for _, p in self.named_trainable]
        update.check_setup(self.optimizer, world=self.dist.world, grad_accum=tc.grad_accum)
        if self.parallel.sharded:  # the UNet reached its device in the wiring: 'auto' attention must see it
            self._set_attention()
        # after the wiring (the regions trace the guarded modules); names, hence the proof, unchanged
        self.compiled = compile_regions(self.c.unet, mode=tc.compile) if tc.compile != "none" else []
        self.model: nn.Module = self.c.unet
        if self.dist.world > 1 and not self.parallel.sharded:
            self.model = DDP(self.c.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.scheduler = LRSchedule(self.optimizer, tc)
        self.step = 0
        self.history: list[StepStats] = []
        # When set, the next steps record a memory ledger (train/ledger.py) at their peak point:
        # after backward and the optimizer step, before gradients are zeroed.
        self.measure_memory = False
        self.last_ledger = None

    @property
    def guard(self) -> TensorGuard | None:
        """The freeze in force, as the wiring returned it (read-only: a guard fitted after the
        wiring would not be the one that froze the tensors)."""
        return self._guard

    def _set_attention(self) -> None:
        set_attention_backend(self.c.unet, self.cfg.model.attention)

    # checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return ckpt.checkpoint_dir(self.checkpoint_root, step)

    def save_checkpoint(self) -> Path:
        """Trainable UNet tensors + optimizer and schedule state + step, as one atomic folder.

        The main process writes it after a barrier, then every process agrees that it was written
        (``DistInfo.all_ok``): none runs ahead while it is written or reads it before it is complete,
        and a failed write stops every process with an error."""
        path = self.checkpoint_dir(self.step)
        tensors, opt_state = self.parallel.checkpoint_state(self.named_trainable, self.optimizer)  # FSDP: gathers
        state = checkpoint_state(self.cfg, [n for n, _ in self.named_trainable], self._tokenizer_id())
        ckpt.save_on_main(self.dist, self.device, lambda: ckpt.write_checkpoint(
            self.checkpoint_root, self.step, tensors={"trainable": tensors},
            objects={"optimizer": opt_state, "scheduler": self.scheduler.state_dict()}, state=state,
            keep=self.cfg.train.keep_checkpoints), TrainingError(f"the main process could not write {path}"))
        return path

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.checkpoint_root)

    def _tokenizer_id(self) -> str:
        return "+".join(f"{type(t).__name__}/{len(t)}" for t in self.c.tokenizers)

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the latest under out_dir); returns its step.

        Refused when it was written for other trainable tensors or with settings that change what
        is learned (``train.resume.read_resumable``). The step log is trimmed to the checkpoint's
        step, so every step appears in it once.
        """
        found = read_resumable(path, self.checkpoint_root, self.cfg, [n for n, _ in self.named_trainable],
                               self._tokenizer_id())
        self.parallel.load_checkpoint(found, self.named_trainable, self.optimizer)
        self.scheduler.load_state_dict(found.object("scheduler", self.device))
        self.step = found.step
        if self.dist.is_main:
            ckpt.trim_log(self.out / "log.jsonl", self.step)
        return self.step

    # the step ----------------------------------------------------------------------------------
    def _step_inputs(self, step: int):
        """Global-batch randomness of one step, sliced to this process."""
        tc, n_glob = self.cfg.train, self.cfg.train.batch_size
        g = step_generator(tc.seed, step)
        idx = self.batches(step)
        shape = self.data.sample_shape
        noise = torch.randn((n_glob, *shape), generator=g)
        t = self.c.schedule.sample_timesteps(n_glob, generator=g)
        flip = torch.rand(n_glob, generator=g) < 0.5
        eps = torch.randn((n_glob, *shape), generator=g)
        mine = slice(self.dist.rank, None, self.dist.world)
        return idx[mine], noise[mine], t[mine], flip[mine], eps[mine]

    def train_step(self) -> StepStats:
        tc = self.cfg.train
        t0 = time.perf_counter()
        idx, noise, t, flip, eps = self._step_inputs(self.step)
        chunks = torch.arange(len(idx)).chunk(tc.grad_accum)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.mixed_precision == "bf16")
        total = torch.zeros((), device=self.device)
        saved = None
        for i, ch in enumerate(chunks):
            x0, cond = self.data.batch(idx[ch], flip[ch], eps[ch], self.device)
            sync = i == len(chunks) - 1 or not isinstance(self.model, DDP)  # FSDP: reduce every micro-batch
            ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
            counting = self.measure_memory and i == 0
            if counting:  # activations saved for backward, counted on the first micro-batch
                counter = count_saved_activations(self.c.unet)
            else:
                counter = contextlib.nullcontext()
            with ctx:  # no_sync (DDP, not the last micro-batch) covers forward and backward
                with counter as saved_now, amp:
                    loss = diffusion_loss(self.model, self.c.schedule, x0, cond,
                                          noise[ch].to(self.device), t[ch].to(self.device))
                if counting:
                    saved = saved_now
                update.before_backward(self.optimizer, loss, self.step)
                (loss * (len(ch) / len(idx))).backward()
            total += loss.detach() * (len(ch) / len(idx))
        if self.dist.world > 1:
            self.dist.all_reduce(total)
            total /= self.dist.world
        loss_value = float(total)
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {self.step} (lr {self.scheduler.get_last_lr()[0]:g}); "
                                "lower train.lr, enable clipping, or check the data")
        lr = self.scheduler.get_last_lr()[0]
        gn = update.apply_update(self.optimizer, self.trainable, tc.max_grad_norm, step=self.step, loss=loss_value)
        self.scheduler.step()
        if self.measure_memory:
            frozen = self.guard.frozen_names if self.guard is not None else None
            self.last_ledger = memory_ledger(self.c.unet, self.optimizer, saved_activation_bytes=saved,
                                             frozen_names=frozen or None)
        self.optimizer.zero_grad(set_to_none=getattr(self.optimizer, "zero_grad_set_to_none", True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        return StepStats(self.step, loss_value, lr, gn, dt, tc.batch_size / dt, _memory_now(self.device))

    # the loop ----------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, on_step: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        """Train up to ``steps`` (default: ``cfg.train.steps``) total steps."""
        tc = self.cfg.train
        end = steps if steps is not None else tc.steps
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", {"config": self.cfg.to_dict(), "version": __version__,
                                                         "world_size": self.dist.world,
                                                         "device": str(self.device)})
        bar = "fine-tuning" if tc.progress and main else None
        with StepLog(self.out / "log.jsonl" if main else None, every=tc.log_every, end=end, start=self.step, desc=bar,
                     postfix=lambda r: dict(loss=f"{r['loss']:.4f}", gn=f"{r['grad_norm']:.2f}",
                                            sps=f"{r['samples_per_s']:.1f}")) as steps_log:
            while self.step < end:
                s = self.train_step()
                self.history.append(s)
                if on_step:
                    on_step(s)
                steps_log.record(s.step, s.to_dict())
                if self._checkpoint_due(s.step, end):
                    self.save_checkpoint()
        return self.history

    def _checkpoint_due(self, step: int, end: int) -> bool:
        every = self.cfg.train.checkpoint_every
        if every is None:
            return False
        # The run's last step always (so `resume` can extend a finished run); a partial fit(k)
        # that stops before train.steps is not the end of the run.
        return (step == end and end >= self.cfg.train.steps) or (every > 0 and step % every == 0)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only (what a delta checkpoint holds)."""
        return self.parallel.trainable_state(self.named_trainable)

    def unet_state_for_export(self) -> dict[str, torch.Tensor]:
        if self.guard is not None:
            return self.guard.export_state(self.c.unet)
        return {k: v.detach() for k, v in self.c.unet.state_dict().items()}

    def verify_frozen(self):
        """VerifyReport of the frozen tensors against the job's manifest (None without a freeze)."""
        return self.guard.verify(self.c.unet, steps=self.step) if self.guard is not None else None

    def save_final(self, path: str | Path | None = None) -> Path:
        """The fine-tuned model as a Stable-Diffusion-layout folder (written by the main process; under
        FSDP every process calls it, as the shards are gathered).

        Refused, with nothing written, when a frozen tensor is not bit-identical to the base, or when
        the run was given a manifest and no guard proved it (``train.final``).
        """
        path = Path(path) if path else self.out / "final"
        report = self.verify_frozen()
        why = final.refusal(report, self._proof_required)
        if why is not None:
            raise TrainingError(f"refusing to write {path}: {why}")
        state = self.unet_state_for_export()  # every process (FSDP gathers the shards)
        if self.dist.is_main:
            with self.parallel.saving(self.c.unet):
                save_components(self.c, path, unet_state=state, extra_json=final.proof_files(report, self.guard))
        return path
