"""Learning a FreezeAsGuard mask: the bilevel loop over flat fp32 buffers.

The publisher learns one logit ``x_i`` per parameter tensor; ``m_i = sigmoid(x_i / T)`` says how
frozen tensor i is, and the model seen is ``theta(m) = theta_ft + m * theta_d`` with
``theta_d = theta_pre - theta_ft``. Steps alternate (``mask.every``): on ``every - 1`` batches the
*simulated user* runs the service's real optimizer (AdamW, its lr/betas/decay/clipping) on
``L_illegal + L_innocent``, its update scaled by ``1 - m``; on every ``every``-th batch the
publisher takes one step on the logits for ``-L_illegal + lambda * L_innocent + c * (rho -
mean(m))^2``, with the first-order gradient ``<theta_d_i, dL/dtheta_i> * m_i (1 - m_i) / T``. The
result is exported with an exact budget (top-k over the logits) as a freeze manifest.

Everything random in step ``s`` comes from generators seeded by ``(seed, s)`` and is drawn for the
global batch, so resuming from a checkpoint reproduces an uninterrupted run bit for bit on the CPU,
and N processes (each taking every N-th sample, gradients all-reduced) learn the mask one process
learns over the same global batch.

The model family enters through a ``Task`` (per-sample losses); ``learn.pipeline.DiffusionTask`` is
the diffusion denoiser's (every family), and ``learn.pipeline.learn_mask`` runs the whole thing from a model folder.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.learn import resume
from freezeasguard.engine.learn.batches import DomainBatches
from freezeasguard.engine.learn.config import MaskLearnConfig, MaskOptConfig
from freezeasguard.engine.learn.flat import FlatLayout, apply_mask_ref_
from freezeasguard.engine.learn.groups import MaskGroups
from freezeasguard.engine.train import checkpoint as ckpt
from freezeasguard.engine.train.distributed import DistInfo, init_distributed
from freezeasguard.engine.train.progress import StepLog
from freezeasguard.kernels.adamw import clip_coef, global_grad_norm
from freezeasguard.kernels.mask_update import bilevel_step_


# ------------------------------------------------------------------------------------ tasks
class Task(Protocol):
    """Per-sample losses of a model family; randomness is drawn per global batch."""

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """Random inputs of ``n`` samples (the global batch), on the CPU."""

    def losses(self, model: nn.Module, idx: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Loss of each sample ``idx[j]`` with random inputs ``draws[.][j]``: fp32 [len(idx)]."""


# ------------------------------------------------------------------------------------ learner
def _budget_logit(cfg: MaskOptConfig) -> float:
    if cfg.init_logit is not None:
        return cfg.init_logit
    rho = min(max(cfg.budget, 1e-3), 1 - 1e-3)
    return cfg.temperature * math.log(rho / (1 - rho))


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when available, else CPU; a bare 'cuda' is this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


class MaskLearner:
    """The bilevel loop. The model's parameters become views of the flat ``theta`` buffer.

    Args:
        model: the base model; its current weights are ``theta_pre``.
        task: per-sample losses (``learn.pipeline.DiffusionTask`` for a diffusion denoiser).
        domains: the domain label of every sample index the task knows.
        cfg: the validated config.
        theta_ft: fine-tuned weights by name (default: theta_pre, i.e. ``theta_d = 0``).
        dist: process group info (default: from the torchrun environment).
        groups: ``groups(layout, device) -> MaskGroups`` (``learn.groups``), the units the mask
            decides on: one logit, keep factor, dot product and budget share each (default:
            ``MaskGroups.per_tensor``). ``scores`` and ``export_mask`` read one logit per tensor,
            so a finer grouping exports through methods of its own.

    Attributes:
        step_backend: implementation of the per-step dots/update (``mask_update.bilevel_step_``):
            'auto' runs the fused Triton kernel on CUDA and the torch reference elsewhere.
    """

    step_backend: str = "auto"

    def __init__(self, model: nn.Module, task: Task, domains: Sequence[str | None], cfg: MaskLearnConfig,
                 *, theta_ft: Mapping[str, torch.Tensor] | None = None, dist: DistInfo | None = None,
                 groups: Callable[[FlatLayout, torch.device], MaskGroups] = MaskGroups.per_tensor):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives run on the current device
        self.dist = dist or init_distributed(self.device.type)
        if cfg.user.batch_size % self.dist.world:
            raise MaskLearnError(f"user.batch_size {cfg.user.batch_size} must be divisible by the "
                                 f"number of processes ({self.dist.world})")
        not_fp32 = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if not_fp32:
            raise MaskLearnError(f"mask learning needs fp32 base weights (the manifest pins their bytes); "
                                 f"{len(not_fp32)} tensor(s) are not, e.g. {not_fp32[0]!r}")
        self.task = task
        self.samples = DomainBatches(list(domains), self.cfg)

        self.model = model.to(self.device).train()
        if cfg.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        for p in model.parameters():
            p.requires_grad_(True)  # every tensor's gradient feeds its mask gradient
        self.layout = FlatLayout.from_module(model, cfg.chunk)
        lay, dev = self.layout, self.device
        with torch.no_grad():
            self.theta_pre = lay.flatten(dict(model.named_parameters()), dev)
            self.theta = self.theta_pre.clone()
            self.theta_d = torch.zeros_like(self.theta_pre)
            self.grad = torch.zeros_like(self.theta_pre)
            self.exp_avg = torch.zeros_like(self.theta_pre)
            self.exp_avg_sq = torch.zeros_like(self.theta_pre)
            self.scratch = torch.empty_like(self.theta_pre)  # the update's temporary, reused
        lay.bind(model, self.theta, self.grad)
        self.groups = groups(lay, dev)
        self.row_group = self.groups.row_group()
        self.budget_weights = self.groups.budget_weights(cfg.mask.budget_by)

        self.logits = torch.full((len(self.groups),), _budget_logit(cfg.mask), dtype=torch.float32, device=dev,
                                 requires_grad=True)
        mo = cfg.mask
        self.mask_optimizer = (torch.optim.Adam([self.logits], lr=mo.lr, foreach=False) if mo.optimizer == "adam"
                               else torch.optim.SGD([self.logits], lr=mo.lr, foreach=False))
        self.step = 0
        self.user_steps = 0
        self.history: list[dict[str, Any]] = []
        self._theta_pre_sha: str | None = None
        if theta_ft is not None:
            self.set_finetuned(theta_ft)
        self.refresh_theta()

    # setup -------------------------------------------------------------------------------------
    def set_finetuned(self, theta_ft: Mapping[str, torch.Tensor]) -> None:
        """``theta_d = theta_pre - theta_ft`` (fp32), then refresh theta(m)."""
        with torch.no_grad():
            ft = self.layout.flatten(theta_ft, self.device)
            torch.sub(self.theta_pre, ft, out=self.theta_d)
        self.refresh_theta()

    # mask state --------------------------------------------------------------------------------
    def soft_mask(self) -> torch.Tensor:
        """m = sigmoid(x / T), fp32 [n_groups] in flat order (one per tensor by default)."""
        return torch.sigmoid(self.logits.detach() / self.cfg.mask.temperature)

    def refresh_theta(self) -> None:
        """Recompute ``theta = theta_pre - (1 - m) * theta_d`` from the logits (after they change)."""
        self.keep = (1.0 - self.soft_mask())[self.row_group].contiguous()
        apply_mask_ref_(self.theta, self.theta_pre, self.theta_d, self.keep, self.layout.chunk)

    def mask_update(self, dots: torch.Tensor) -> None:
        """One optimizer step on the logits from the data dots ``dU/dm`` plus the budget penalty."""
        mo = self.cfg.mask
        m = self.soft_mask()
        w = self.budget_weights
        mean = (w * m).sum()
        d_m = dots.float() + 2.0 * mo.penalty * (mean - mo.budget) * w  # dU/dm_i
        self.logits.grad = d_m * m * (1.0 - m) / mo.temperature        # chain rule through sigmoid
        self.mask_optimizer.step()
        self.mask_optimizer.zero_grad(set_to_none=True)
        self.refresh_theta()

    # one step ----------------------------------------------------------------------------------
    def is_mask_step(self, step: int) -> bool:
        return (step + 1) % self.cfg.mask.every == 0

    def step_inputs(self, step: int):
        """This process's share of the global batch of ``step``: indices, random draws, and the
        per-sample coefficients of the user loss, the publisher loss and the two logged losses."""
        return self.samples.step_inputs(step, self.task, self.dist, self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place (nothing to do on one), and return it: every
        per-step reduction goes through here, so N processes learn the mask one process learns."""
        return self.dist.all_reduce(t)

    def _losses(self, idx: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")
        with amp:
            return self.task.losses(self.model, idx, draws).float()

    def backward(self, step: int, publisher: bool) -> tuple[float, float]:
        """Forward/backward of the global batch of ``step`` into the flat gradient (this process's
        share, not yet all-reduced) for the user's objective or the publisher's data objective;
        returns the global (L_illegal, L_innocent)."""
        idx, draws, coefs = self.step_inputs(step)
        self.grad.zero_()
        losses = self._losses(idx, draws)
        (losses * coefs[1 if publisher else 0]).sum().backward()
        logged = self.all_reduce((losses.detach() * coefs[2:]).sum(1))
        l_ill, l_inn = logged.tolist()
        if not (math.isfinite(l_ill) and math.isfinite(l_inn)):
            raise MaskLearnError(f"loss is not finite at step {step} (L_illegal {l_ill}, L_innocent "
                                 f"{l_inn}); lower user.lr or check the data")
        return l_ill, l_inn

    def reduced_dots(self) -> torch.Tensor:
        """Per-group ``<theta_d_i, grad_i>`` (fp64, flat order) of the gradient just computed,
        summed over processes (the dots are linear in the gradient: no full all-reduce needed)."""
        dots = bilevel_step_(self.theta, self.theta_pre, self.theta_d, self.grad, self.exp_avg,
                             self.exp_avg_sq, self.keep, self.groups.rows, chunk=self.layout.chunk,
                             update=False, backend=self.step_backend, **self._adamw_kwargs())
        return self.all_reduce(dots)

    def mask_gradient(self, step: int) -> torch.Tensor:
        """dU/dm of the publisher's data objective ``-L_illegal + lambda L_innocent`` per tensor
        (flat order, fp64, all-reduced) on the global batch of ``step``, at the current theta(m)."""
        self.backward(step, publisher=True)
        return self.reduced_dots()

    def train_step(self) -> dict[str, Any]:
        """One batch: a simulated-user step, or (every ``mask.every``-th) a mask step."""
        t0 = time.perf_counter()
        mask_step = self.is_mask_step(self.step)
        l_ill, l_inn = self.backward(self.step, publisher=mask_step)
        if mask_step:
            self.mask_update(self.reduced_dots())
        else:
            self.user_update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        row = {"step": self.step, "kind": "mask" if mask_step else "user", "L_illegal": l_ill,
               "L_innocent": l_inn, **self.mask_stats(), "step_time": time.perf_counter() - t0}
        self.history.append(row)
        return row

    def user_update(self) -> None:
        """All-reduce the flat gradient, clip it, and take the simulated user's AdamW step."""
        self.all_reduce(self.grad)
        u = self.cfg.user
        norm = float(global_grad_norm(self.grad))
        if not math.isfinite(norm):  # the losses were finite, yet a step would poison every buffer
            raise MaskLearnError(f"the simulated user's gradient norm is {norm} at step {self.step}; nothing was "
                                 "updated; lower user.lr or check the data")
        scale = clip_coef(self.grad, u.max_grad_norm) if u.max_grad_norm is not None else None
        self.user_steps += 1
        bilevel_step_(self.theta, self.theta_pre, self.theta_d, self.grad, self.exp_avg,
                      self.exp_avg_sq, self.keep, self.groups.rows, chunk=self.layout.chunk,
                      grad_scale=scale, dots=False, scratch=self.scratch, backend=self.step_backend,
                      **self._adamw_kwargs())

    def _adamw_kwargs(self) -> dict[str, Any]:
        u = self.cfg.user
        return dict(lr=u.lr, beta1=u.beta1, beta2=u.beta2, eps=u.eps, weight_decay=u.weight_decay,
                    decay_end=self.layout.decay_end, step=max(1, self.user_steps))

    def mask_stats(self) -> dict[str, float]:
        """mean(m) as the budget counts it, and the ratios of the hard mask m > 1/2."""
        m = self.soft_mask()
        hard = (m > 0.5).double()
        numels = self.groups.numels
        return {"mean_m": float((self.budget_weights * m).sum()),
                "hard_tensors": float(hard.mean()),
                "hard_params": float((hard * numels).sum() / numels.sum())}

    # the loop ----------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Run up to ``steps`` total steps (default ``cfg.steps``)."""
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        main = self.dist.is_main
        work = Path(cfg.work_dir) if cfg.work_dir else None
        if work is not None and main:
            work.mkdir(parents=True, exist_ok=True)
        with StepLog(work / "log.jsonl" if work is not None and main else None, every=cfg.log_every, end=end,
                     start=self.step, desc="learning mask" if cfg.progress and main else None,
                     postfix=lambda r: dict(ill=f"{r['L_illegal']:.4f}", inn=f"{r['L_innocent']:.4f}",
                                            m=f"{r['mean_m']:.3f}")) as steps_log:
            while self.step < end:
                row = self.train_step()
                if on_step:
                    on_step(row)
                steps_log.record(row["step"], row)
                if work is not None and cfg.checkpoint_every and row["step"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        return self.history

    # export ------------------------------------------------------------------------------------
    def scores(self) -> dict[str, float]:
        """The logits by tensor name, in model order (higher = freeze first)."""
        x = self.logits.detach().cpu().tolist()
        idx = self.layout.index()
        return {n: x[idx[n]] for n in self.layout.model_names}

    def base_state(self) -> dict[str, torch.Tensor]:
        """theta_pre by name (views), in model order."""
        return self.layout.views(self.theta_pre)

    def finetuned_state(self) -> dict[str, torch.Tensor]:
        """theta_ft = theta_pre - theta_d by name (new tensors), in model order."""
        return self.layout.views(self.theta_pre - self.theta_d)

    def export_mask(self, budget: float | None = None, by: str | None = None) -> FreezeMask:
        """The hard mask with an exact budget: top-k over the logits (``FreezeMask.from_scores``)."""
        mo = self.cfg.mask
        shapes = {n: tuple(s.shape) for n, s in self.base_state().items()}
        return FreezeMask.from_scores(shapes, self.scores(), mo.budget if budget is None else budget,
                                      by or mo.budget_by)

    # checkpoints -------------------------------------------------------------------------------
    def theta_pre_sha256(self) -> str:
        if self._theta_pre_sha is None:
            self._theta_pre_sha = resume.buffer_sha256(self.theta_pre)
        return self._theta_pre_sha

    @property
    def checkpoint_root(self) -> Path:
        if not self.cfg.work_dir:
            raise MaskLearnError("set work_dir to write or read checkpoints")
        return Path(self.cfg.work_dir) / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return ckpt.checkpoint_dir(self.checkpoint_root, step)

    def _buffer(self, key: str) -> torch.Tensor:
        return self.logits if key == "logits" else getattr(self, key)

    def save_checkpoint(self) -> Path:
        """Logits, both optimizers' states, the flat buffers and the step, as one atomic folder
        (one file per buffer: at most one model-sized buffer is staged in host memory at a time)."""
        root = self.checkpoint_root
        tensors = {k: {k: self._buffer(k).detach()} for k in resume.STATE_KEYS}
        state = resume.checkpoint_state(self.cfg, self.layout, self.theta_pre_sha256(), self.user_steps, self.history)
        ckpt.save_on_main(self.dist, self.device, lambda: ckpt.write_checkpoint(
            root, self.step, tensors=tensors, state=state, objects={"mask_optimizer": self.mask_optimizer.state_dict()},
            keep=self.cfg.keep_checkpoints), MaskLearnError(f"the main process could not write checkpoint {self.step}"))
        return ckpt.checkpoint_dir(root, self.step)

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(Path(self.cfg.work_dir or ".") / "checkpoints")

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the latest under work_dir); returns its step."""
        root = Path(self.cfg.work_dir or ".") / "checkpoints"
        found = resume.read_resumable(path, root, self.cfg, self.layout, self.theta_pre_sha256())
        with torch.no_grad():
            for k in resume.STATE_KEYS:
                self._buffer(k).copy_(found.tensors(k, self.device)[k])  # in place: views stay bound
        self.mask_optimizer.load_state_dict(found.object("mask_optimizer", self.device))
        self.step, self.user_steps = found.step, int(found.state["user_steps"])
        self.history = list(found.state["history"])
        self.keep = (1.0 - self.soft_mask())[self.row_group].contiguous()
        if self.dist.is_main and self.cfg.work_dir:
            ckpt.trim_log(Path(self.cfg.work_dir) / "log.jsonl", self.step)
        return self.step
