"""Measuring whether a fine-tuned diffusion model learned a domain: a recogniser and metrics.

The paper asks whether images generated after illegal fine-tuning are still recognisable as the
target (face recognition). Here the recogniser is a small CNN trained on *real* images only
(never on generated ones), with its accuracy on held-out real images reported next to every
rate it produces. For a domain's prompt, a fine-tuned model's images are classified and

* ``rate``: the fraction classified as the target domain (the recognition rate),
* ``mean_prob``: the recogniser's mean softmax probability of the target (does not saturate),

and the model's held-out denoising loss (noise-prediction MSE on real images it was not trained
on, with noise and timesteps fixed by a seed, so that conditions are compared on the same draws).

``mitigation(rate_guarded, rate_full) = 1 - rate_guarded / rate_full``: on the illegal domain the
guard's mitigation, on a legal domain its collateral impact.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from freezeasguard.engine.errors import FreezeAsGuardError
from freezeasguard.engine.io import atomic_write_bytes, atomic_write_json
from freezeasguard.engine.model.data import ImageDataset
from freezeasguard.engine.model.diffusion import per_sample_diffusion_loss


class EfficacyError(FreezeAsGuardError, RuntimeError):
    """An evaluation that cannot be carried out as asked; the message says why."""


# ------------------------------------------------------------------------------------ recogniser
class Recogniser(nn.Module):
    """A small CNN over uint8 RGB images of one resolution (a multiple of 4).

    Three 3x3 conv stages (the last two strided) and two linear layers; inputs are scaled to
    [-1, 1] inside ``forward`` so callers pass the uint8 images a sampler returns.
    """

    def __init__(self, n_classes: int, resolution: int, width: int = 32):
        super().__init__()
        if resolution % 4:
            raise EfficacyError(f"recogniser resolution must be a multiple of 4, got {resolution}")
        self.resolution = resolution
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (resolution // 4) ** 2, 128), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(128, n_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images
        return self.head(self.features(x))


@dataclass
class RecogniserReport:
    """How well the recogniser does on held-out real images."""

    classes: list[str]
    accuracy: float
    per_class: dict[str, float]
    n_train: int
    n_test: int
    epochs: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stratified_split(domains: Sequence[str | None], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices per domain by ``fractions`` (summing to 1), shuffled with ``seed``.

    Each part keeps each domain's share; the last part takes the rounding remainder.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise EfficacyError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for d in sorted({x for x in domains if x is not None}):
        idx = [i for i, x in enumerate(domains) if x == d]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        start = 0
        for k, f in enumerate(fractions):
            end = len(idx) if k == len(fractions) - 1 else start + round(f * len(idx))
            parts[k] += idx[start:end]
            start = end
    return [sorted(p) for p in parts]


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels per image (zero fill = black)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_recogniser(dataset: ImageDataset, classes: Sequence[str] | None = None, *, holdout: float = 0.2,
                     epochs: int = 25, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     max_shift: int = 1, progress: bool = False) -> tuple[Recogniser, RecogniserReport]:
    """Train the recogniser on real images of ``classes`` (domains); test on a held-out split.

    Args:
        dataset: real images with a domain label each.
        classes: the domains to tell apart (default: all present).
        holdout: fraction of each class kept out of training for the accuracy.
        max_shift: random translation (pixels) during training, so that slightly off-centre
            generated images are not penalised for their placement.
    Returns:
        (the model in eval mode, its report on the held-out images).
    """
    classes = list(classes or dataset.domain_names())
    if len(classes) < 2:
        raise EfficacyError(f"a recogniser needs at least two classes, got {classes}")
    ds = dataset.select_domains(classes)
    label = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([label[d] for d in ds.domains])
    train_idx, test_idx = stratified_split(ds.domains, [1 - holdout, holdout], seed)
    if not test_idx:
        raise EfficacyError("the held-out split is empty: lower the number of classes or raise holdout")
    torch.manual_seed(seed)
    model = Recogniser(len(classes), ds.resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x_all = ds.images.float() / 127.5 - 1.0
    tr = torch.tensor(train_idx)
    # Inverse-frequency class weights: the classes have very different sizes (a few hundred
    # digits of each class, 100 faces), and every class's recall matters equally here.
    counts = torch.bincount(y[tr], minlength=len(classes)).clamp(min=1).float()
    weight = counts.sum() / (len(classes) * counts)
    epochs_it = range(epochs)
    if progress:
        epochs_it = tqdm(epochs_it, desc="recogniser", unit="epoch", leave=False)
    model.train()
    for _ in epochs_it:
        order = tr[torch.randperm(len(tr), generator=g)]
        for k in range(0, len(order), batch_size):
            b = order[k:k + batch_size]
            loss = F.cross_entropy(model(_shift(x_all[b], g, max_shift)), y[b], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    te = torch.tensor(test_idx)
    with torch.no_grad():
        pred = model(x_all[te]).argmax(1)
    per_class = {c: float((pred[y[te] == i] == i).float().mean()) for i, c in enumerate(classes)
                 if bool((y[te] == i).any())}
    report = RecogniserReport(classes, float((pred == y[te]).float().mean()), per_class, len(train_idx),
                              len(test_idx), epochs, seed)
    return model, report


def save_recogniser(model: Recogniser, report: RecogniserReport, path: str | os.PathLike) -> Path:
    """``path/recogniser.pt`` (weights) and ``path/report.json``, each written atomically."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path / "recogniser.pt", buf.getvalue())
    atomic_write_json(path / "report.json", {**report.to_dict(), "resolution": model.resolution})
    return path


def load_recogniser(path: str | os.PathLike) -> tuple[Recogniser, RecogniserReport]:
    path = Path(path)
    meta = json.loads((path / "report.json").read_text())
    res = meta.pop("resolution")
    report = RecogniserReport(**meta)
    model = Recogniser(len(report.classes), res)
    model.load_state_dict(torch.load(path / "recogniser.pt", weights_only=True))
    return model.eval(), report


@torch.no_grad()
def recognise(model: Recogniser, classes: Sequence[str], images: torch.Tensor, target: str) -> dict[str, Any]:
    """Recognition rate and mean target probability of generated uint8 images.

    Returns:
        ``{"rate", "mean_prob", "n", "predicted": {class: count}}``.
    """
    classes = list(classes)
    if target not in classes:
        raise EfficacyError(f"target {target!r} is not a recogniser class {classes}")
    if images.shape[-1] != model.resolution:
        raise EfficacyError(f"images are {images.shape[-1]} px, the recogniser takes {model.resolution} px")
    k = classes.index(target)
    prob = torch.softmax(model(images), dim=1)
    pred = prob.argmax(1)
    counts = torch.bincount(pred, minlength=len(classes)).tolist()
    return {"rate": float((pred == k).float().mean()), "mean_prob": float(prob[:, k].mean()),
            "n": int(images.shape[0]), "predicted": {c: n for c, n in zip(classes, counts) if n}}


# ------------------------------------------------------------------------------------ losses
@torch.no_grad()
def heldout_loss(unet: nn.Module, schedule, data, *, draws: int = 4, seed: int = 0,
                 batch_size: int = 256) -> float:
    """Mean noise-prediction MSE over ``draws`` fixed (noise, timestep) draws per image.

    Args:
        data: ``model.encode.EncodedData`` of real held-out images (their captions as conditioning).
        seed: fixes the draws, so every model evaluated with the same seed sees the same noise.
    """
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    total, count = 0.0, 0
    for _ in range(draws):
        noise = torch.randn((n, *data.sample_shape), generator=g)
        t = schedule.sample_timesteps(n, generator=g)
        eps = torch.randn((n, *data.sample_shape), generator=g)
        for k in range(0, n, batch_size):
            idx = torch.arange(k, min(n, k + batch_size))
            x0, cond = data.batch(idx, None, eps[idx], device)
            per = per_sample_diffusion_loss(unet, schedule, x0, cond, noise[idx].to(device), t[idx].to(device))
            total += float(per.double().sum())
            count += len(idx)
    unet.train(was_training)
    return total / count


# ------------------------------------------------------------------------------------ summaries
def mitigation(rate_guarded: float, rate_full: float) -> float:
    """``1 - rate_guarded / rate_full`` (NaN when full fine-tuning reached nothing)."""
    return 1.0 - rate_guarded / rate_full if rate_full > 0 else float("nan")


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds."""

    mean: float
    std: float
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return cls(float("nan"), float("nan"), 0, [])
        m = sum(v) / len(v)
        s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return cls(m, s, len(v), v)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fmt(self, pct: bool = False, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        if pct:
            return f"{100 * self.mean:.0f}% ± {100 * self.std:.0f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def steps_to_reach(curve: Sequence[tuple[int, float]], level: float) -> float | None:
    """First step at which a (step, value) curve reaches ``level``, linearly interpolated
    between evaluated steps; None when it never does within the curve."""
    prev = None
    for s, v in sorted(curve):
        if v >= level:
            if prev is None or prev[1] >= level:
                return float(s)
            s0, v0 = prev
            return s0 + (level - v0) * (s - s0) / (v - v0)
        prev = (s, v)
    return None
