"""Intake of a job's dataset: read it within bounds, refuse what escapes the folder, hash what is trained on."""
from __future__ import annotations

import json
from pathlib import Path

from freezeasguard.engine.errors import DatasetError
from freezeasguard.engine.io import file_sha256
from freezeasguard.engine.model.data import ImageDataset, load_image_folder
from freezeasguard.engine.service.spec import JobSpec


def _listed_files(root: Path) -> list[str]:
    """Image files metadata.jsonl names (bad lines are left to the loader to report)."""
    names = []
    try:
        lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and (root / row["file_name"]).is_file():
            names.append(row["file_name"])
    return names


def _hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {n: file_sha256(root / n) for n in ["metadata.jsonl", *dict.fromkeys(names)]}


def review_dataset(spec: JobSpec, resolution: int, problems: list[str],
                   policy=None) -> tuple[ImageDataset | None, dict[str, str]]:
    """Load the dataset, report every unreadable image/line, and hash the files it was built from.

    Files are hashed before and after decoding: a file swapped while the job was being reviewed
    would make the record's hashes describe data that was not trained on.
    """
    root = Path(spec.data.path)
    try:
        before = _hash_files(root, _listed_files(root)) if (root / "metadata.jsonl").is_file() else {}
        ds = load_image_folder(root, resolution, caption_column=spec.data.caption_column,
                               domains=spec.data.domains, skip_bad=True, seed=spec.train.seed)
    except (DatasetError, OSError) as exc:
        problems.append(f"dataset: {exc}")
        return None, {}
    if ds.skipped:
        problems += [f"dataset: {msg}" for _, _, msg in ds.skipped]
        return None, {}
    inside = root.resolve()
    escaped = [r.file_name for r in ds.records if not (root / r.file_name).resolve().is_relative_to(inside)]
    if escaped:  # '../x' or a symlink out: the service must not read files the user cannot see
        problems.append(f"dataset: file(s) outside the dataset folder: {escaped[:5]}")
    if len(ds) < spec.train.batch_size:
        problems.append(f"dataset: {len(ds)} image(s), fewer than train.batch_size {spec.train.batch_size}")
    after = _hash_files(root, [r.file_name for r in ds.records])
    changed = sorted(f for f, h in after.items() if before.get(f) != h)
    if changed:
        problems.append(f"dataset: file(s) changed while being read: {changed}")
    return ds, after
