"""Captioned image data: Hugging Face imagefolder layout, a built-in real dataset, and caches.

An image folder holds images and a ``metadata.jsonl`` whose lines are JSON objects with
``file_name``, a caption (``text`` by default) and an optional ``domain`` label (``illegal``,
``legal``, a subject name, ...). Every line is checked before any work starts: a missing file,
an image that does not decode, a missing caption or an unknown domain is an error naming the
file and the line. ``skip_bad=True`` skips such lines instead and reports each one.

Images are decoded once, resized (short side) and cropped to a square, and kept as uint8.
"""
from __future__ import annotations

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
    _metadata_lines,
    _name_problem,
    _plain,
    _Refused,
    _said,
    _shown,
)

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
                      confine: bool = True, formats: Sequence[str] = IMAGE_FORMATS) -> ImageDataset:
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
        formats: the PIL formats an image may have.
    Raises:
        DatasetError naming the file and line of the first problem (or of all, when several); at
        once, even under ``skip_bad``, past a bound of the whole dataset (lines, metadata bytes,
        time) or at a file listed twice.
    """
    root = Path(root)
    meta = root / "metadata.jsonl"
    try:
        st = os.stat(root)
    except (OSError, ValueError):
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    try:
        folder = _Folder(root, confine)
    except OSError as e:
        raise DatasetError(f"dataset folder {str(root)!r} cannot be read ({e.strerror})") from None
    try:
        rng = np.random.default_rng(seed)
        problems: list[tuple[str, int, str]] = []
        todo, seen, listed, digest = [], {}, 0, hashlib.sha256()
        for lineno, raw in _metadata_lines(folder, root, meta, max_metadata_bytes, caption_column, digest):
            where = f"{meta}:{lineno}"
            _check_time(deadline, root, where)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                line = None
            if line is not None and not line.strip():
                continue
            listed += 1
            if listed > max_images:
                raise DatasetError(f"{meta}: lists more than {max_images} images (the cap)")
            if line is None:
                problems.append(("metadata.jsonl", lineno, f"{where}: not valid UTF-8"))
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                problems.append(("metadata.jsonl", lineno, f"{where}: not valid JSON ({getattr(e, 'msg', e)})"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
                problems.append(("metadata.jsonl", lineno, f"{where}: missing 'file_name'"))
                continue
            fname = row["file_name"]
            caption = row.get(caption_column)
            domain = row.get("domain")
            if not isinstance(caption, str) or not caption.strip():
                problems.append((fname, lineno, f"{where}: {_plain(fname)}: missing or empty caption "
                                                f"'{caption_column}'"))
                continue
            if domain is not None and not isinstance(domain, str):
                problems.append((fname, lineno, f"{where}: {_plain(fname)}: 'domain' must be a string"))
                continue
            if known_domains is not None and domain not in known_domains:
                problems.append((fname, lineno, f"{where}: {_plain(fname)}: unknown domain {domain!r}; "
                                                f"known: {sorted(known_domains)}"))
                continue
            if domains is not None and domain not in domains:
                continue
            if bad := _name_problem(fname):
                problems.append((fname, lineno, f"{where}: file_name {_shown(fname)} is not a usable path ({bad})"))
                continue
            try:
                parts, fst = folder.resolve(fname)
            except _Refused as r:
                problems.append((fname, lineno, _said(r, where, fname)))
                continue
            if not stat.S_ISREG(fst.st_mode):
                problems.append((fname, lineno, f"{where}: image file {_shown(fname)} is not a regular file"))
                continue
            # the same file under two names (./a, sub/../a, a symlink, a hard link) is one file
            for key in (parts, *([(fst.st_dev, fst.st_ino)] if fst.st_ino else [])):
                if key in seen:
                    first, line_first = seen[key]
                    raise DatasetError(f"{where}: duplicate file_name {_shown(fname)} (the same file as "
                                       f"{_shown(first)} on line {line_first})")
                seen[key] = (fname, lineno)
            if fst.st_size > max_image_bytes:
                problems.append((fname, lineno, f"{where}: image file {_shown(fname)} is {fst.st_size} bytes, "
                                                f"over the cap of {max_image_bytes} bytes"))
                continue
            todo.append((Record(fname, caption.strip(), domain, lineno), parts, fst))

        records: list[Record] = []
        images: list[torch.Tensor] = []
        files = {"metadata.jsonl": digest.hexdigest()}
        it: Iterable = todo
        if progress:
            it = tqdm(it, total=len(todo), desc=f"loading {root.name}", unit="img")
        for rec, parts, fst in it:
            where = f"{meta}:{rec.line}"
            _check_time(deadline, root, where)
            try:
                data = folder.read(parts, fst, max_image_bytes)
            except _Refused as r:
                problems.append((rec.file_name, rec.line, _said(r, where, rec.file_name)))
                continue
            out = _decode(data, where, rec.file_name, max_pixels, formats,
                          lambda img: _to_square(img, resolution, center_crop, rng))
            if isinstance(out, str):
                problems.append((rec.file_name, rec.line, out))
                continue
            images.append(out)
            records.append(rec)
            files[rec.file_name] = hashlib.sha256(data).hexdigest()
    finally:
        folder.close()
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
    return ImageDataset(torch.stack(images), records, str(root), skipped=problems, files=files)


def folder_digests(root: str | os.PathLike, names: Iterable[str], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                   deadline: float | None = None, confine: bool = True) -> dict[str, str | None]:
    """SHA-256 of each named file of a folder, resolved and read as load_image_folder reads them
    (None for one that cannot be read now). Raises DatasetError past ``deadline``."""
    out: dict[str, str | None] = {}
    folder = _Folder(Path(root), confine)
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
