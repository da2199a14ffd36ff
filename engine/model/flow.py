"""Rectified-flow training and sampling (SD3, Flux), as diffusers' ``FlowMatchEulerDiscreteScheduler``
defines them from a model's ``scheduler/`` config.

The forward process interpolates straight from data to noise, ``x_t = (1 - s) x0 + s noise`` with
``s = t / T``, and the network predicts the velocity ``noise - x0``. Training timesteps are drawn
from the scheduler's own training grid (``scheduler.timesteps`` as built from the config, so a
config's ``shift`` applies exactly as in diffusers' training scripts; with dynamic shifting the grid
is unshifted and the resolution-dependent shift applies at sampling), uniformly or with a
logit-normal density. ``FlowSchedule`` has ``NoiseSchedule``'s interface, so the trainer, the mask
learner and the benchmarks need not know which objective a model has.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.io import atomic_write_json

CONFIG_FILE = "scheduler_config.json"
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
DENSITIES = ("uniform", "logit_normal")
FLOW_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                  "shift": 1.0}


def dynamic_shift_mu(image_seq_len: int, cfg: Mapping[str, Any]) -> float:
    """Flux's resolution-dependent shift: ``mu`` interpolated linearly in the image's token count
    between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``."""
    lo, hi = int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096))
    b0, b1 = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    return b0 + (b1 - b0) * (image_seq_len - lo) / (hi - lo)


class FlowSchedule:
    """The flow-matching process of one model (``prediction_type`` 'flow').

    Args:
        config: a FlowMatch scheduler config (None: unshifted, 1000 steps).
        density: how training timesteps are drawn: 'uniform' over the grid, or 'logit_normal'
            (SD3's paper: the sigmoid of a standard normal, which weights the middle of the path).
    """

    prediction_type = "flow"

    def __init__(self, config: Mapping[str, Any] | None = None, density: str = "uniform"):
        cfg = {k: v for k, v in (config or FLOW_SCHEDULER).items() if not k.startswith("_") or k == "_class_name"}
        cfg.setdefault("_class_name", "FlowMatchEulerDiscreteScheduler")
        if density not in DENSITIES:
            raise ModelError(f"flow timestep density must be one of {DENSITIES}, got {density!r}")
        try:
            self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"flow-matching scheduler config cannot be used: {exc}") from None
        self.config, self.density = cfg, density
        # the training grid, ascending in t (diffusers stores it from t = T down)
        self.grid = self.train_scheduler.timesteps.flip(0).float().clone()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.train_scheduler.config.num_train_timesteps)

    def to(self, device) -> "FlowSchedule":
        return self

    def with_overrides(self, **overrides: Any) -> "FlowSchedule":
        pt = overrides.pop("prediction_type", "flow")
        if pt != "flow":
            raise ModelError(f"this model is trained with flow matching: prediction_type {pt!r} does not apply "
                             "(leave model.prediction_type unset)")
        return FlowSchedule({**self.config, **overrides}, self.density)

    # training ------------------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        s = t.float() / self.num_train_timesteps
        return s.to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        """The velocity along the straight path: noise - x0."""
        return noise.float() - x0.float()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` training timesteps (float, in (0, T]) from the scheduler's grid."""
        if self.density == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator))
        idx = (u * len(self.grid)).long().clamp_(0, len(self.grid) - 1)
        return self.grid[idx].to(device)

    # sampling ------------------------------------------------------------------------------------
    def sampler(self, name: str = "ddim") -> SchedulerMixin:
        """A fresh sampler: FlowMatch Euler ('ddim' and 'checkout' both name the model's own)."""
        if name in ("ddim", "checkout"):
            cls_name = self.config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        else:
            cls_name = name
        if cls_name not in FLOW_CLASSES:
            raise ModelError(f"scheduler {cls_name!r} does not sample a flow-matching model; use one of {FLOW_CLASSES}")
        return getattr(diffusers, cls_name).from_config(self.config)

    def set_sampling_timesteps(self, sched: SchedulerMixin, steps: int, image_seq_len: int,
                               device: torch.device | str) -> None:
        """Diffusers' pipelines' grid: with dynamic shifting, sigmas 1 .. 1/steps shifted by ``mu``."""
        if self.config.get("use_dynamic_shifting"):
            sigmas = [1.0 - i / steps for i in range(steps)]
            sched.set_timesteps(sigmas=sigmas, mu=dynamic_shift_mu(image_seq_len, self.config), device=device)
        else:
            sched.set_timesteps(steps, device=device)

    # folders ---------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / CONFIG_FILE, self.config)


def is_flow_config(cfg: Mapping[str, Any]) -> bool:
    return str(cfg.get("_class_name", "")) in FLOW_CLASSES


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder}: no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: a scheduler config is a JSON object")
    return cfg

