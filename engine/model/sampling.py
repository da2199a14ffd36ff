"""Text-to-image generation with DDIM and classifier-free guidance."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from freezeasguard.engine.io import atomic_write_bytes
from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.diffusion import ddim_sample
from freezeasguard.engine.model.encode import encode_text


@torch.inference_mode()
def generate(c: Components, prompts: list[str], *, steps: int = 30, guidance: float = 1.0,
             seed: int = 0, batch_size: int = 64, device: torch.device | str | None = None,
             progress: bool = False) -> torch.Tensor:
    """Sample one image per prompt.

    Args:
        guidance: classifier-free guidance scale; 1.0 = conditional prediction only.
    Returns:
        uint8 images [len(prompts), 3, H, W] on the CPU.
    """
    device = torch.device(device) if device is not None else next(c.unet.parameters()).device
    c.unet.eval()
    out = []
    batches = range(0, len(prompts), batch_size)
    if progress:
        batches = tqdm(batches, desc="sampling", unit="batch")
    g = torch.Generator().manual_seed(seed)
    uncond = encode_text(c, [""], device=device) if guidance != 1.0 else None
    dtype = next(c.unet.parameters()).dtype
    for i in batches:
        chunk = prompts[i:i + batch_size]
        cond = encode_text(c, chunk, device=device).to(dtype)
        shape = (len(chunk), c.latent_channels, c.latent_size, c.latent_size)
        x_T = torch.randn(shape, generator=g).to(device, dtype)

        def denoise(x, t, cond=cond):
            if uncond is None:
                return c.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            both = torch.cat([uncond.expand(len(x), -1, -1).to(dtype), cond])
            e_u, e_c = c.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both,
                              return_dict=False)[0].chunk(2)
            return e_u + guidance * (e_c - e_u)

        x0 = ddim_sample(denoise, c.schedule, x_T, steps=steps, generator=g)
        if c.vae is not None:
            x0 = c.vae.decode(x0 / c.vae_scaling(), return_dict=False)[0]
        out.append(((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Write uint8 images [N, 3, H, W] as one PNG grid (atomically)."""
    n, _, h, w = images.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
