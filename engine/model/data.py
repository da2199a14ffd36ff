"""Captioned image data: Hugging Face imagefolder layout, a built-in real dataset, and caches.

An image folder holds images and a ``metadata.jsonl`` whose lines are JSON objects with
``file_name``, a caption (``text`` by default) and an optional ``domain`` label (``illegal``,
``legal``, a subject name, ...). Every line is checked before any work starts: a missing file,
an image that does not decode, a missing caption or an unknown domain is an error naming the
file and the line. ``skip_bad=True`` skips such lines instead and reports each one.

Images are decoded once, resized (short side) and cropped to a square, and kept as uint8. The
metadata lines are checked first (``model.metadata``), the files read through ``model.folder_io``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from freezeasguard.engine.errors import DatasetError
from freezeasguard.engine.io import atomic_dir
from freezeasguard.engine.model.folder_io import (  # noqa: F401  (OUTSIDE and the defaults are part of this API)
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_FORMATS,
    OUTSIDE,
    _check_time,
    _decode,
    _Folder,
    _Refused,
    _said,
)
from freezeasguard.engine.model.metadata import Problem, Record, check_lines

log = logging.getLogger("freezeasguard")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class ImageDataset:
    """Preprocessed square uint8 images with captions and domain labels.

    Attributes:
        images: uint8 tensor [N, 3, R, R].
        records: one Record per image (file, caption, domain, metadata line).
        skipped: (file, line, reason) for each line skipped under ``skip_bad``.
        files: SHA-256 of the bytes read (metadata.jsonl, each image) by load_image_folder.
    """

    images: torch.Tensor
    records: list[Record]
    source: str
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

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
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    if nw * nh <= 16 * resolution * resolution:
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + resolution, top + resolution))
    else:  # a long thin image: resample only the square kept, not the whole resized strip (unbounded)
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image_folder(root: str | os.PathLike, resolution: int, *, caption_column: str = "text",
                      domains: Sequence[str] | None = None, known_domains: Sequence[str] | None = None,
                      center_crop: bool = True, skip_bad: bool = False, seed: int = 0, progress: bool = False,
                      max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                      max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES, deadline: float | None = None,
                      confine: bool = True, single_link: bool = False,
                      formats: Sequence[str] = IMAGE_FORMATS) -> ImageDataset:
    """Read and validate an imagefolder with ``metadata.jsonl``, within bounds.

    Every line is checked before any image is opened (JSON, caption, domain; the name resolved
    inside the folder, a regular file of at most ``max_image_bytes``, listed once); then each image
    is read once, hashed (``ImageDataset.files``), and refused over ``max_pixels`` from its header,
    before it is decoded.

    Args:
        caption_column: the caption key of each metadata line.
        domains: keep only these domains; each must occur in the data.
        known_domains: if given, a line whose domain is not in it is an error.
        center_crop: center crop (else a seeded random crop, fixed at load time).
        skip_bad: skip bad lines and report them instead of raising.
        max_images, max_metadata_bytes: most non-blank lines and bytes of metadata.jsonl.
        max_pixels, max_image_bytes: most pixels (PIL's decompression-bomb limit applies too) and
            bytes of one image.
        deadline: a ``time.monotonic()`` value; reading past it is an error (None: no limit).
        confine: refuse a name that leads out of ``root`` (``..``, absolute, a symlink out) before
            anything is opened; nothing outside is looked at.
        single_link: refuse a file with more than one hard link, as its other name may be outside
            ``root`` (off by default: a folder of hard-linked copies is an ordinary one to train on).
        formats: the PIL formats an image may have.
    Raises:
        DatasetError naming the file and line of the first problem (or of all, when several); at
        once, even under ``skip_bad``, past a bound of the whole dataset (lines, metadata bytes,
        time) or at a file listed twice.
    """
    root = Path(root)
    folder = _open_folder(root, confine, single_link)
    try:
        todo, problems, meta_digest = check_lines(
            folder, root, caption_column=caption_column, domains=domains, known_domains=known_domains,
            max_images=max_images, max_image_bytes=max_image_bytes, max_metadata_bytes=max_metadata_bytes,
            deadline=deadline)
        square = functools.partial(_to_square, resolution=resolution, center_crop=center_crop,
                                   rng=np.random.default_rng(seed))
        records, images, files = _read_images(folder, root, todo, problems, square=square, max_pixels=max_pixels,
                                              max_image_bytes=max_image_bytes, formats=formats, deadline=deadline,
                                              progress=progress)
    finally:
        folder.close()
    _report(problems, skip_bad)
    _check_selection(root, records, domains, skipped=bool(problems))
    return ImageDataset(torch.stack(images), records, str(root), skipped=problems,
                        files={"metadata.jsonl": meta_digest, **files})


def _open_folder(root: Path, confine: bool, single_link: bool = False) -> _Folder:
    """The dataset folder opened for reads confined to it; a missing or unreadable one is refused."""
    try:
        st = os.stat(root)
    except (OSError, ValueError):
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    try:
        return _Folder(root, confine, single_link)
    except OSError as e:
        raise DatasetError(f"dataset folder {str(root)!r} cannot be read ({e.strerror})") from None


def _read_images(folder: _Folder, root: Path, todo: list, problems: list[Problem], *, square, max_pixels: int,
                 max_image_bytes: int, formats: Sequence[str], deadline: float | None,
                 progress: bool) -> tuple[list[Record], list[torch.Tensor], dict[str, str]]:
    """Each checked image read once, hashed, refused over ``max_pixels`` from its header, then
    decoded and squared; (records, images, file digests), the refusals appended to ``problems``."""
    meta = root / "metadata.jsonl"
    records: list[Record] = []
    images: list[torch.Tensor] = []
    files: dict[str, str] = {}
    it: Iterable = tqdm(todo, total=len(todo), desc=f"loading {root.name}", unit="img") if progress else todo
    for rec, parts, fst in it:
        where = f"{meta}:{rec.line}"
        _check_time(deadline, root, where)
        try:
            data = folder.read(parts, fst, max_image_bytes)
        except _Refused as r:
            problems.append((rec.file_name, rec.line, _said(r, where, rec.file_name)))
            continue
        out = _decode(data, where, rec.file_name, max_pixels, formats, square)
        if isinstance(out, str):
            problems.append((rec.file_name, rec.line, out))
            continue
        images.append(out)
        records.append(rec)
        files[rec.file_name] = hashlib.sha256(data).hexdigest()
    return records, images, files


def _report(problems: list[Problem], skip_bad: bool) -> None:
    """The first problem as the load's error (the count of the others with it), or each logged
    as skipped under ``skip_bad``."""
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problem(s); skip_bad=True skips them)" if len(problems) > 1 else ""
        raise DatasetError(problems[0][2] + more)
    for _, _, msg in problems:
        log.warning("skipped %s", msg)


def _check_selection(root: Path, records: list[Record], domains: Sequence[str] | None, *, skipped: bool) -> None:
    """Every domain asked for is present, and something is left to train on."""
    if domains is not None:
        present = {r.domain for r in records}
        unknown = [d for d in domains if d not in present]
        if unknown:
            raise DatasetError(f"{root}: unknown domain(s) {unknown}; present: "
                               f"{sorted(d for d in present if d is not None)}")
    if not records:
        raise DatasetError(f"{root}: the dataset is empty" + (" after skipping bad lines" if skipped else ""))


def folder_digests(root: str | os.PathLike, names: Iterable[str], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                   deadline: float | None = None, confine: bool = True,
                   single_link: bool = False) -> dict[str, str | None]:
    """SHA-256 of each named file of a folder, resolved and read as load_image_folder reads them
    (None for one that cannot be read now). Raises DatasetError past ``deadline``."""
    out: dict[str, str | None] = {}
    folder = _Folder(Path(root), confine, single_link)
    try:
        for name in names:
            _check_time(deadline, root, repr(name))
            try:
                parts, st = folder.resolve(name)
                out[name] = hashlib.sha256(folder.read(parts, st, max_bytes)).hexdigest() \
                    if stat.S_ISREG(st.st_mode) else None
            except _Refused:
                out[name] = None
    finally:
        folder.close()
    return out


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
