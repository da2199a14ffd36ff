"""Text-to-image generation with a diffusers sampler and classifier-free guidance.

The sampler is built from the model's own scheduler config (``NoiseSchedule.sampler``): DDIM by
default, deterministic for a seed; ``sampler='checkout'`` uses the class the model folder names,
and any diffusers scheduler class can be named.
"""
from __future__ import annotations

import inspect
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.io import atomic_write_bytes
from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.encode import encode_text
from freezeasguard.engine.model.family import Cond, predict


@torch.inference_mode()
def generate(c: Components, prompts: list[str], *, steps: int = 30, guidance: float = 1.0,
             seed: int = 0, batch_size: int = 64, device: torch.device | str | None = None,
             progress: bool = False, sampler: str = "ddim") -> torch.Tensor:
    """Sample one image per prompt.

    Args:
        steps: sampling steps.
        guidance: classifier-free guidance scale; 1.0 = conditional prediction only.
        sampler: 'ddim', 'checkout' or a diffusers scheduler class name (``NoiseSchedule.sampler``).
    Returns:
        uint8 images [len(prompts), 3, H, W] on the CPU.
    """
    if not 1 <= steps <= c.schedule.num_train_timesteps:
        raise ModelError(f"sampling steps must be in [1, {c.schedule.num_train_timesteps}], got {steps}")
    if not prompts:
        raise ModelError("no prompt to sample")
    device = torch.device(device) if device is not None else next(c.unet.parameters()).device
    c.unet.eval()
    out = []
    batches = range(0, len(prompts), batch_size)
    if progress:
        batches = tqdm(batches, desc="sampling", unit="batch")
    g = torch.Generator().manual_seed(seed)
    dtype = next(c.unet.parameters()).dtype
    # FLUX.1 [dev] is guidance-distilled: the scale is an input of the network, one pass per step.
    embedded = bool(getattr(c.unet.config, "guidance_embeds", False))
    uncond = encode_text(c, [""], device=device).to(dtype=dtype) if guidance != 1.0 and not embedded else None
    flow = c.schedule.prediction_type == "flow"
    for i in batches:
        chunk = prompts[i:i + batch_size]
        cond = encode_text(c, chunk, device=device).to(dtype=dtype)
        if embedded:
            cond.tensors["guidance"] = torch.full((len(chunk),), float(guidance), device=device)
        shape = (len(chunk), c.latent_channels, c.latent_size, c.latent_size)
        sched = c.schedule.sampler(sampler)
        if flow:
            c.schedule.set_sampling_timesteps(sched, steps, (c.latent_size // 2) ** 2, device)
        else:
            sched.set_timesteps(steps, device=device)
        x = torch.randn(shape, generator=g).to(device, dtype) * getattr(sched, "init_noise_sigma", 1.0)
        # Stochastic samplers draw their noise from the seeded generator too.
        extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            tb = t.expand(len(chunk)).to(device)
            if uncond is None:
                pred = predict(c.unet, x_in, tb, cond)
            else:
                both = Cond.cat([uncond.expand(len(chunk)), cond])
                e_u, e_c = predict(c.unet, torch.cat([x_in, x_in]), torch.cat([tb, tb]), both).chunk(2)
                pred = e_u + guidance * (e_c - e_u)
            x = sched.step(pred.to(x.dtype), t, x, **extra, return_dict=False)[0]
        if c.vae is not None:
            x = c.vae.decode(x / c.vae_scaling() + c.vae_shift(), return_dict=False)[0]
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def grid_scale(height: int, width: int, min_cell: int) -> int:
    """Whole-pixel enlargement that brings a sample's smaller side to at least ``min_cell`` (1: none).
    Whole pixels, so every model pixel stays one sharp square and nothing is invented between them."""
    side = min(height, width)
    return max(1, -(-min_cell // side)) if min_cell > 0 else 1


def save_grid(images: torch.Tensor, path, nrow: int = 8, min_cell: int = 0) -> int:
    """Write uint8 images [N, 3, H, W] as one PNG grid (atomically), each sample enlarged by
    nearest neighbour to at least ``min_cell`` pixels a side (0: the model's own resolution, which
    for a 16 px model is a strip too small to see). Returns the enlargement factor."""
    n, _, h, w = images.shape
    k = grid_scale(h, w, min_cell)
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for j in range(n):
        r, q = divmod(j, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[j].permute(1, 2, 0).numpy()
    if k > 1:
        grid = grid.repeat(k, axis=0).repeat(k, axis=1)
    atomic_write_bytes(path, _png(grid))
    return k


def save_samples(images: torch.Tensor, folder) -> list[Path]:
    """Write each uint8 image [3, H, W] at its own resolution as ``folder/NNN.png``: the samples
    exactly as the model drew them, for measuring rather than viewing."""
    folder = Path(folder)
    return [atomic_write_bytes(folder / f"{j:03d}.png", _png(img.permute(1, 2, 0).numpy()))
            for j, img in enumerate(images)]
