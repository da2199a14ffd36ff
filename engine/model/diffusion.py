"""DDPM noise schedule for training (epsilon and v-prediction) and a DDIM sampler.

The schedule is Stable Diffusion's (``scaled_linear`` betas from 0.00085 to 0.012 over 1,000
steps) and writes/reads diffusers' ``scheduler_config.json``, so a folder saved here loads in
diffusers and a real checkout's scheduler loads here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from freezeasguard.engine.io import atomic_write_json

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule:
    """Forward-process coefficients, kept in fp64 on the host and cast per use."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end, self.beta_schedule = beta_start, beta_end, beta_schedule
        self.prediction_type = prediction_type
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._dev: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device) -> "NoiseSchedule":
        return self  # coefficients are gathered per batch; kept on the host, moved lazily

    def _coefs(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (t.device, dtype)
        if key not in self._dev:
            ac = self.alphas_cumprod
            self._dev[key] = (ac.sqrt().to(t.device, dtype), (1 - ac).sqrt().to(t.device, dtype))
        a, s = self._dev[key]
        return a[t], s[t]

    @staticmethod
    def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return c.view(-1, *([1] * (x.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        a, s = self._coefs(t, x0.dtype)
        return self._expand(a, x0) * x0 + self._expand(s, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        a, s = self._coefs(t, x0.dtype)
        return self._expand(a, x0) * noise - self._expand(s, x0) * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t.to(device)

    def to_x0_eps(self, model_out: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recover (x0, epsilon) from a model output at integer timestep t."""
        a = float(self.alphas_cumprod[t].sqrt())
        s = float((1 - self.alphas_cumprod[t]).sqrt())
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x_t - s * eps) / a
        else:
            x0 = a * x_t - s * model_out
            eps = s * x_t + a * model_out
        return x0, eps

    # diffusers-compatible scheduler folder -------------------------------------------------------
    def config(self) -> dict:
        return {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        }

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / "scheduler_config.json", self.config())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "NoiseSchedule":
        path = Path(folder) / "scheduler_config.json"
        cfg = json.loads(path.read_text())
        return cls(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                   beta_start=cfg.get("beta_start", 0.00085), beta_end=cfg.get("beta_end", 0.012),
                   beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
                   prediction_type=cfg.get("prediction_type", "epsilon"))


def diffusion_loss(unet: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE in fp32 (epsilon or v target, per the schedule)."""
    x_t = schedule.add_noise(x0, noise, t)
    out = unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    return F.mse_loss(out.float(), schedule.target(x0, noise, t).float())


def per_sample_diffusion_loss(unet: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor,
                              noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE of each sample, fp32 [B] (its mean is ``diffusion_loss``)."""
    x_t = schedule.add_noise(x0, noise, t)
    out = unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    err = F.mse_loss(out.float(), schedule.target(x0, noise, t).float(), reduction="none")
    return err.flatten(1).mean(1)


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """Evenly spaced timesteps, high to low, with SD's ``steps_offset=1`` ("leading" spacing)."""
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    ratio = schedule.num_train_timesteps // steps
    return [i * ratio + 1 for i in range(steps)][::-1]


@torch.no_grad()
def ddim_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                x_T: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None,
                progress: Callable | None = None) -> torch.Tensor:
    """Deterministic (eta=0) or stochastic DDIM from x_T to x_0.

    Args:
        denoise: ``f(x_t, t_batch) -> model output`` (epsilon or v, per the schedule), with
            classifier-free guidance already applied by the caller if wanted.
        x_T: initial noise.
    Returns:
        x_0 estimate, same shape and dtype as ``x_T``.
    """
    ac = schedule.alphas_cumprod
    x = x_T
    ts = ddim_timesteps(schedule, steps)
    it = progress(ts) if progress is not None else ts
    for i, t in enumerate(it):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(ac[t])
        # After the last step SD's config (set_alpha_to_one=False) uses alpha_bar[0], not 1.
        a_prev = float(ac[prev]) if prev >= 0 else float(ac[0])
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = denoise(x, tb).to(x.dtype)
        x0, eps = schedule.to_x0_eps(out, x, t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        dir_xt = (1 - a_prev - sigma**2) ** 0.5 * eps
        x = a_prev**0.5 * x0 + dir_xt
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + sigma * noise
    return x
