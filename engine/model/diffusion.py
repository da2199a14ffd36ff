"""Noise schedules, as diffusers computes them from a model's ``scheduler/`` config, and the loss.

A model folder's ``scheduler/scheduler_config.json`` holds every setting of its diffusion process
(``beta_schedule``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``, ``steps_offset``,
``rescale_betas_zero_snr``, ...). Training noises images with diffusers' ``DDPMScheduler`` built
from that config, as diffusers' own training scripts do whatever sampler the checkout names;
sampling (``model.sampling``) uses DDIM built from the same config, or the class the checkout
names. No schedule math is reimplemented here, so a setting of a real model is never dropped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.model.family import predict
from freezeasguard.engine.model.flow import FlowSchedule, is_flow_config, read_scheduler_config

CONFIG_FILE = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Stable Diffusion v1's process; a folder's config overrides any of these. Written out as DDIM
# (what `generate` samples with by default), so diffusers' pipelines load our folders the same way.
SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": "epsilon",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class NoiseSchedule:
    """The forward process of one model: noising, training targets, timesteps, and its samplers.

    Args:
        config: a diffusers scheduler config (any scheduler class), used as it is: a key it omits
            takes diffusers' own default, exactly as when diffusers loads the folder. None: Stable
            Diffusion v1's process (``SD_SCHEDULER``), for models built from a preset.
        **overrides: settings that replace the config's (e.g. ``prediction_type='v_prediction'``).
    """

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any):
        base = SD_SCHEDULER if config is None else config
        cfg = {**{k: v for k, v in base.items() if not k.startswith("_") or k == "_class_name"}, **overrides}
        if cfg.get("prediction_type") == "flow":
            raise ModelError("prediction_type 'flow' needs a flow-matching model (an SD3 or Flux scheduler, "
                             "FlowMatchEulerDiscreteScheduler); this model's process is DDPM's")
        if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise ModelError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {cfg['prediction_type']!r}")
        try:
            self.ddpm = DDPMScheduler.from_config(cfg)
        except (ValueError, NotImplementedError, TypeError) as exc:  # e.g. an unknown beta_schedule
            raise ModelError(f"scheduler config cannot be used: {exc}") from None
        self.config = cfg

    @property
    def prediction_type(self) -> str:
        return self.ddpm.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.ddpm.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t of every training timestep (fp32, diffusers' values)."""
        return self.ddpm.alphas_cumprod

    def to(self, device) -> "NoiseSchedule":
        return self  # diffusers moves its coefficients to the samples' device per call

    def with_overrides(self, **overrides: Any) -> "NoiseSchedule":
        return NoiseSchedule(self.config, **overrides)

    # training ------------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' ``DDPMScheduler.add_noise``)."""
        return self.ddpm.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: noise, v = sqrt(a_t) noise - sqrt(1 - a_t) x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.ddpm.get_velocity(x0, noise, t)
        return x0

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t.to(device)

    # sampling ------------------------------------------------------------------------------------
    def sampler(self, name: str = "ddim") -> SchedulerMixin:
        """A fresh diffusers sampler built from this config.

        Args:
            name: 'ddim' (deterministic DDIM, the default), 'checkout' (the class the folder's
                config names), or the name of any diffusers scheduler class.
        """
        if name == "ddim":
            return DDIMScheduler.from_config(self.config)  # ignores the keys other schedulers use
        cls_name = self.config.get("_class_name", "DDIMScheduler") if name == "checkout" else name
        cls = getattr(diffusers, str(cls_name), None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise ModelError(f"unknown diffusers scheduler {cls_name!r} (use 'ddim', 'checkout' or a class name "
                             "such as 'DPMSolverMultistepScheduler')")
        return cls.from_config(self.config)

    # folders ---------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / CONFIG_FILE, self.config)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "NoiseSchedule":
        return cls(read_scheduler_config(folder))


def make_schedule(config: Mapping[str, Any], prediction_type: str | None = None) -> "NoiseSchedule | FlowSchedule":
    """The model's process from its scheduler config: flow matching for a FlowMatch scheduler, else DDPM."""
    if is_flow_config(config):
        return FlowSchedule(config) if prediction_type in (None, "flow") else \
            FlowSchedule(config).with_overrides(prediction_type=prediction_type)
    if prediction_type == "flow":
        raise ModelError("prediction_type 'flow' needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)")
    return NoiseSchedule(config, **({"prediction_type": prediction_type} if prediction_type else {}))


def load_schedule(folder: str | os.PathLike) -> "NoiseSchedule | FlowSchedule":
    """The process a model folder's ``scheduler/`` defines."""
    return make_schedule(read_scheduler_config(folder))

def diffusion_loss(unet: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond,
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Denoising MSE in fp32 (the schedule's target: epsilon, v, x0 or the flow's velocity).

    ``cond`` is the family's conditioning (``model.family.Cond``) of the batch."""
    x_t = schedule.add_noise(x0, noise, t)
    out = predict(unet, x_t, t, cond)
    return F.mse_loss(out.float(), schedule.target(x0, noise, t).float())


def per_sample_diffusion_loss(unet: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond,
                              noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Denoising MSE of each sample, fp32 [B] (its mean is ``diffusion_loss``)."""
    x_t = schedule.add_noise(x0, noise, t)
    out = predict(unet, x_t, t, cond)
    err = F.mse_loss(out.float(), schedule.target(x0, noise, t).float(), reduction="none")
    return err.flatten(1).mean(1)
