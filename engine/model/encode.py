"""Frozen encoders, run once: VAE latents and text embeddings for a dataset.

The text encoder and the VAE are never trained here (the guard's policy locks them), so their
outputs are a pure function of the data and are computed once per dataset rather than at every
step. Text embeddings are computed once per *distinct* caption. VAE latents are stored as the
posterior's mean and std and sampled at each step (as the uncached path would), in both
orientations when random flips are on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.data import ImageDataset
from freezeasguard.engine.model.family import Cond


@torch.no_grad()
def encode_text(c: Components, prompts: list[str], device: torch.device | str = "cpu",
                batch_size: int = 64) -> Cond:
    """The model family's conditioning of ``prompts`` (fp32; for SD 1.x/2.x the text encoder's last
    hidden states [len(prompts), 77, D])."""
    return Cond.cat([c.encode_prompts(prompts[i:i + batch_size], device)
                     for i in range(0, len(prompts), batch_size)])


@torch.no_grad()
def encode_images(c: Components, images: torch.Tensor, device: torch.device | str = "cpu",
                  batch_size: int = 32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, std) of the VAE posterior, shifted and scaled as the model's VAE config says
    (``(z - shift_factor) * scaling_factor``); in pixel space the normalized images and None."""
    x = images.float().div(127.5).sub(1.0)
    if c.vae is None:
        return x, None
    means, stds = [], []
    rng = range(0, len(x), batch_size)
    if progress:
        rng = tqdm(rng, desc="encoding latents", unit="batch")
    s, shift = c.vae_scaling(), c.vae_shift()
    for i in rng:
        dist = c.vae.encode(x[i:i + batch_size].to(device)).latent_dist
        # contiguous: the VAE hands back channels-last tensors on CPU, and torch 2.13's CPU conv
        # backward segfaults on channels-last inputs when the conv weight needs no gradient.
        means.append(((dist.mean - shift) * s).float().contiguous().cpu())
        stds.append((dist.std * s).float().contiguous().cpu())
    return torch.cat(means), torch.cat(stds)


@dataclass
class EncodedData:
    """A dataset in the UNet's input space, ready for training steps.

    ``mean``/``std`` hold one row per image (and a second copy for flipped images when
    ``flipped`` is set: row ``i + N`` is image ``i`` mirrored).
    """

    mean: torch.Tensor
    std: torch.Tensor | None
    cond: Cond  # conditioning of the distinct captions, [U, ...] per tensor
    caption_index: torch.Tensor  # [N] -> row of cond
    captions: list[str]  # the distinct captions
    flipped: bool
    n: int

    def __len__(self) -> int:
        return self.n

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None, eps: torch.Tensor | None,
              device: torch.device | str) -> tuple[torch.Tensor, Cond]:
        """x0 and text conditioning for images ``idx``.

        Args:
            flip: bool per sample (ignored unless the data was encoded with flips).
            eps: standard-normal noise for sampling the VAE posterior (latent space only).
        """
        rows = idx + self.n * flip.long() if (self.flipped and flip is not None) else idx
        x0 = self.mean[rows]
        if self.std is not None and eps is not None:
            x0 = x0 + self.std[rows] * eps
        return x0.to(device, non_blocking=True), self.cond[self.caption_index[idx]].to(device, non_blocking=True)


def encode_dataset(c: Components, ds: ImageDataset, *, random_flip: bool = False,
                   device: torch.device | str = "cpu", progress: bool = False) -> EncodedData:
    images = ds.images
    if random_flip:
        images = torch.cat([images, images.flip(-1)])
    mean, std = encode_images(c, images, device=device, progress=progress)
    distinct = list(dict.fromkeys(ds.captions))
    pos = {cap: i for i, cap in enumerate(distinct)}
    cond = encode_text(c, distinct, device=device).to("cpu")
    index = torch.tensor([pos[cap] for cap in ds.captions], dtype=torch.long)
    return EncodedData(mean, std, cond, index, distinct, random_flip, len(ds))


@dataclass
class LiveData:
    """Same interface as EncodedData, running the frozen encoders at every batch (no cache)."""

    components: Components
    dataset: ImageDataset
    flipped: bool
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.components
        return (c.latent_channels, c.latent_size, c.latent_size)

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None, eps: torch.Tensor | None,
              device: torch.device | str) -> tuple[torch.Tensor, Cond]:
        imgs = self.dataset.images[idx]
        if self.flipped and flip is not None:
            imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
        mean, std = encode_images(self.components, imgs, device=device)
        x0 = mean if std is None or eps is None else mean + std * eps
        cond = encode_text(self.components, [self.dataset.captions[i] for i in idx.tolist()], device=device)
        return x0.to(device), cond


def prepare_data(c: Components, ds: ImageDataset, *, cache: bool, random_flip: bool,
                 device: torch.device | str = "cpu", progress: bool = False) -> EncodedData | LiveData:
    if cache:
        return encode_dataset(c, ds, random_flip=random_flip, device=device, progress=progress)
    return LiveData(c, ds, random_flip, device)
