"""Captioned image data: Hugging Face imagefolder layout, a built-in real dataset, and caches.

An image folder holds images and a ``metadata.jsonl`` whose lines are JSON objects with
``file_name``, a caption (``text`` by default) and an optional ``domain`` label (``illegal``,
``legal``, a subject name, ...). Every line is checked before any work starts: a missing file,
an image that does not decode, a missing caption or an unknown domain is an error naming the
file and the line. ``skip_bad=True`` skips such lines instead and reports each one.

Images are decoded once, resized (short side) and cropped to a square, and kept as uint8.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from tqdm import tqdm

from freezeasguard.engine.errors import DatasetError
from freezeasguard.engine.io import atomic_dir

log = logging.getLogger("freezeasguard")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Record:
    file_name: str
    caption: str
    domain: str | None
    line: int  # 1-based line in metadata.jsonl (0 for built-in data)


@dataclass
class ImageDataset:
    """Preprocessed square uint8 images with captions and domain labels.

    Attributes:
        images: uint8 tensor [N, 3, R, R].
        records: one Record per image (file, caption, domain, metadata line).
        skipped: (file, line, reason) for each line skipped under ``skip_bad``.
    """

    images: torch.Tensor
    records: list[Record]
    source: str
    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    @property
    def domains(self) -> list[str | None]:
        return [r.domain for r in self.records]

    def domain_names(self) -> list[str]:
        return sorted({r.domain for r in self.records if r.domain is not None})

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], [self.records[i] for i in idx.tolist()], self.source)

    def select_domains(self, domains: Iterable[str]) -> "ImageDataset":
        want = list(domains)
        present = set(self.domain_names())
        unknown = [d for d in want if d not in present]
        if unknown:
            raise DatasetError(f"{self.source}: unknown domain(s) {unknown}; present: {sorted(present)}")
        keep = [i for i, r in enumerate(self.records) if r.domain in want]
        return self.subset(keep)

    def normalized(self) -> torch.Tensor:
        """Images as float32 in [-1, 1]."""
        return self.images.float().div_(127.5).sub_(1.0)


def _to_square(img, resolution: int, center_crop: bool, rng: np.random.Generator | None):
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image_folder(root: str | os.PathLike, resolution: int, *, caption_column: str = "text",
                      domains: Sequence[str] | None = None, known_domains: Sequence[str] | None = None,
                      center_crop: bool = True, skip_bad: bool = False, seed: int = 0,
                      progress: bool = False) -> ImageDataset:
    """Read and validate an imagefolder with ``metadata.jsonl``.

    Args:
        root: the folder.
        resolution: output side length in pixels.
        caption_column: the caption key of each metadata line.
        domains: keep only these domains; each must occur in the data.
        known_domains: if given, a line whose domain is not in it is an error.
        center_crop: center crop (else a seeded random crop, fixed at load time).
        skip_bad: skip bad lines and report them instead of raising.
    Raises:
        DatasetError naming the file and line of the first problem (or of all, when several).
    """
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    if not meta.is_file():
        raise DatasetError(f"{str(root)!r} has no metadata.jsonl (expected lines of "
                           f'{{"file_name": ..., "{caption_column}": ..., "domain": ...}})')
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    images: list[torch.Tensor] = []
    problems: list[tuple[str, int, str]] = []
    lines = meta.read_text(encoding="utf-8").splitlines()
    it: Iterable = enumerate(lines, start=1)
    if progress:
        it = tqdm(it, total=len(lines), desc=f"loading {root.name}", unit="img")
    for lineno, line in it:
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(("metadata.jsonl", lineno, f"{where}: not valid JSON ({e.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            problems.append(("metadata.jsonl", lineno, f"{where}: missing 'file_name'"))
            continue
        fname = row["file_name"]
        caption = row.get(caption_column)
        domain = row.get("domain")
        if not isinstance(caption, str) or not caption.strip():
            problems.append((fname, lineno, f"{where}: {fname}: missing or empty caption '{caption_column}'"))
            continue
        if domain is not None and not isinstance(domain, str):
            problems.append((fname, lineno, f"{where}: {fname}: 'domain' must be a string"))
            continue
        if known_domains is not None and domain not in known_domains:
            problems.append((fname, lineno, f"{where}: {fname}: unknown domain {domain!r}; "
                                            f"known: {sorted(known_domains)}"))
            continue
        if domains is not None and domain not in domains:
            continue
        path = root / fname
        if not path.is_file():
            problems.append((fname, lineno, f"{where}: image file {fname!r} not found"))
            continue
        try:
            with Image.open(path) as img:
                img.load()
                images.append(_to_square(img, resolution, center_crop, rng))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            problems.append((fname, lineno, f"{where}: cannot decode image {fname!r}: {e}"))
            continue
        records.append(Record(fname, caption.strip(), domain, lineno))
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problem(s); skip_bad=True skips them)" if len(problems) > 1 else ""
        raise DatasetError(problems[0][2] + more)
    for _, _, msg in problems:
        log.warning("skipped %s", msg)
    if domains is not None:
        present = {r.domain for r in records}
        unknown = [d for d in domains if d not in present]
        if unknown:
            raise DatasetError(f"{root}: unknown domain(s) {unknown}; present: "
                               f"{sorted(d for d in present if d is not None)}")
    if not records:
        raise DatasetError(f"{root}: the dataset is empty" + (" after skipping bad lines" if problems else ""))
    return ImageDataset(torch.stack(images), records, str(root), skipped=problems)


def digits_dataset(resolution: int = 16, classes: Sequence[int] | None = None) -> ImageDataset:
    """scikit-learn's 1,797 real handwritten 8x8 digits as captioned RGB images.

    White ink on black, upsampled bicubically to ``resolution``; caption "a photo of the digit
    seven"; domain = the digit's word ("seven").
    """
    d = load_digits()
    keep = np.arange(len(d.target)) if classes is None else np.flatnonzero(np.isin(d.target, list(classes)))
    if len(keep) == 0:
        raise DatasetError(f"digits: no images for classes {list(classes or [])}")
    imgs, records = [], []
    for i in keep:
        a = (d.images[i] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L").resize((resolution, resolution), Image.Resampling.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1))
        word = DIGIT_WORDS[int(d.target[i])]
        records.append(Record(f"digit_{i:04d}.png", f"a photo of the digit {word}", word, 0))
    return ImageDataset(torch.stack(imgs), records, "digits")


def write_image_folder(ds: ImageDataset, root: str | os.PathLike) -> Path:
    """Write a dataset as an imagefolder (PNG files + metadata.jsonl), atomically."""
    root = Path(root)
    with atomic_dir(root) as tmp:
        lines = []
        for img, r in zip(ds.images, ds.records):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp / r.file_name)
            row = {"file_name": r.file_name, "text": r.caption}
            if r.domain is not None:
                row["domain"] = r.domain
            lines.append(json.dumps(row))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def load_dataset(path: str, resolution: int, **kw) -> ImageDataset:
    """'digits' (built-in) or an image folder; keyword arguments as in load_image_folder."""
    if path == "digits":
        ds = digits_dataset(resolution)
        return ds.select_domains(kw["domains"]) if kw.get("domains") else ds
    return load_image_folder(path, resolution, **kw)
