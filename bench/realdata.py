"""Real images of other kinds than digits, from files that installed packages ship (no download).

* ``lfw_dataset``: scikit-image's ``lfw_subset.npy``: 100 real faces and 100 real non-face
  patches (25x25 grayscale crops of Labeled Faces in the Wild photographs). Domains ``face``
  ("a photo of a face") and ``background`` ("a photo of a background").
* ``photo_crops_dataset``: seeded random crops of the photographs scikit-learn and matplotlib
  ship (``china.jpg``, ``flower.jpg``, ``grace_hopper.jpg``), one domain per photograph. The
  fallback when scikit-image is not installed.
* ``concat``: several ``ImageDataset`` at the same resolution as one.

The file is located through the package's import spec and read with numpy, so scikit-image is
never imported (its import is slow and it is only a carrier of the data here).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from freezeasguard.engine.errors import FreezeAsGuardError
from freezeasguard.engine.model.data import ImageDataset, Record


class RealDataError(FreezeAsGuardError, RuntimeError):
    """A packaged dataset is not available here; the message says what to install."""


def _gray_to_rgb_uint8(images: np.ndarray, resolution: int) -> torch.Tensor:
    """Float images in [0, 1] (N, H, W) -> uint8 RGB [N, 3, R, R], bicubic resize."""
    from PIL import Image

    out = []
    for a in images:
        img = Image.fromarray((np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8), mode="L")
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB")
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)


def lfw_file() -> Path:
    """Path of scikit-image's bundled ``lfw_subset.npy``.

    Raises:
        RealDataError: scikit-image is not installed (``pip install scikit-image``).
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RealDataError("the face data ships with scikit-image: pip install scikit-image")
    path = Path(spec.origin).parent / "data" / "lfw_subset.npy"
    if not path.is_file():
        raise RealDataError(f"scikit-image is installed but {path} is missing (a wheel without its data?)")
    return path


def has_lfw() -> bool:
    try:
        lfw_file()
    except RealDataError:
        return False
    return True


def lfw_dataset(resolution: int = 16) -> ImageDataset:
    """100 real faces (domain ``face``) and 100 non-face patches (domain ``background``)."""
    arr = np.load(lfw_file())
    if arr.shape[0] != 200:
        raise RealDataError(f"lfw_subset.npy holds {arr.shape[0]} images, expected 200 (100 faces, 100 not)")
    images = _gray_to_rgb_uint8(arr, resolution)
    records = [Record(f"lfw_{i:03d}.png", "a photo of a face" if i < 100 else "a photo of a background",
                      "face" if i < 100 else "background", 0) for i in range(200)]
    return ImageDataset(images, records, "lfw_subset")


def _sample_photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 photographs shipped by scikit-learn and matplotlib."""
    from sklearn.datasets import load_sample_images

    photos = {}
    s = load_sample_images()
    for fname, img in zip(s.filenames, s.images):
        photos[Path(fname).stem] = np.asarray(img)  # china (a temple), flower
    try:
        import matplotlib.cbook as cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos["portrait"] = np.asarray(Image.open(f).convert("RGB"))
    except (ImportError, OSError, ValueError):  # matplotlib without its sample data
        pass
    return photos


def photo_crops_dataset(resolution: int = 16, per_photo: int = 150, scale: int = 4,
                        seed: int = 0) -> ImageDataset:
    """Seeded random crops of the packaged photographs; one domain (and caption) per photograph.

    Each photograph is first downscaled so its short side is ``scale * resolution`` pixels, so a
    crop shows a recognisable part (petals, roof tiles), not a flat patch of one colour.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, records = [], []
    for name, photo in sorted(_sample_photos().items()):
        img = Image.fromarray(photo)
        w, h = img.size
        f = scale * resolution / min(w, h)
        img = img.resize((max(resolution, round(w * f)), max(resolution, round(h * f))), Image.Resampling.BICUBIC)
        a = np.asarray(img.convert("RGB"))
        for k in range(per_photo):
            y = int(rng.integers(0, a.shape[0] - resolution + 1))
            x = int(rng.integers(0, a.shape[1] - resolution + 1))
            crop = a[y:y + resolution, x:x + resolution]
            images.append(torch.from_numpy(crop.copy()).permute(2, 0, 1))
            records.append(Record(f"{name}_{k:03d}.png", f"a photo of a {name}", name, 0))
    return ImageDataset(torch.stack(images), records, "sample_photos")


def concat(datasets: Sequence[ImageDataset]) -> ImageDataset:
    """One dataset holding all images and records, in order."""
    if not datasets:
        raise ValueError("concat needs at least one dataset")
    res = {d.resolution for d in datasets}
    if len(res) != 1:
        raise ValueError(f"datasets have different resolutions {sorted(res)}")
    return ImageDataset(torch.cat([d.images for d in datasets]), [r for d in datasets for r in d.records],
                        "+".join(d.source for d in datasets))
