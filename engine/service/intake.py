"""Intake of a job's dataset: read it within the policy's bounds, refuse what escapes the folder,
hash what is trained on.

The user who wrote the dataset may have read this code. Every bound (lines, bytes, pixels, time)
is checked before the work it bounds; every name is resolved inside the folder before anything
is opened, so a refusal never depends on what exists outside it, and a file with a second hard
link (which may be a name of any file outside) is refused from its open descriptor; PIL's decompression-bomb check
and every decoder error become a named problem. Nothing is written.
"""
from __future__ import annotations

import time
from pathlib import Path

from freezeasguard.engine.errors import DatasetError
from freezeasguard.engine.model.data import OUTSIDE, ImageDataset, folder_digests, load_image_folder
from freezeasguard.engine.service.policy import Policy
from freezeasguard.engine.service.spec import JobSpec


def review_dataset(spec: JobSpec, resolution: int, problems: list[str],
                   policy: Policy | None = None) -> tuple[ImageDataset | None, dict[str, str]]:
    """Load the dataset, report every unreadable image/line, and hash the files it was built from.

    The hashes are those of the very bytes decoded. The files are hashed again afterwards: one
    swapped while the job was being reviewed is refused, so the record's hashes describe what is
    on disk as well as what is trained on. ``policy`` None: the Policy defaults.
    """
    policy = policy if policy is not None else Policy()
    deadline = time.monotonic() + policy.max_review_seconds
    root = Path(spec.data.path)
    try:
        ds = load_image_folder(root, resolution, caption_column=spec.data.caption_column,
                               domains=spec.data.domains, skip_bad=True, seed=spec.train.seed,
                               max_images=policy.max_images, max_pixels=policy.max_image_pixels,
                               max_image_bytes=policy.max_image_bytes,
                               max_metadata_bytes=policy.max_metadata_bytes, deadline=deadline, confine=True,
                               single_link=True)
    except (DatasetError, OSError) as exc:
        problems.append(f"dataset: {exc}")
        return None, {}
    if ds.skipped:
        # '../x', an absolute path or a symlink out: named, never opened
        escaped = [f for f, _, msg in ds.skipped if msg.endswith(OUTSIDE)]
        if escaped:
            problems.append(f"dataset: file(s) outside the dataset folder: {escaped[:5]}"
                            + (f" (and {len(escaped) - 5} more)" if len(escaped) > 5 else ""))
        problems += [f"dataset: {msg}" for _, _, msg in ds.skipped if not msg.endswith(OUTSIDE)]
        return None, {}
    if len(ds) < spec.train.batch_size:
        problems.append(f"dataset: {len(ds)} image(s), fewer than train.batch_size {spec.train.batch_size}")
    try:
        after = folder_digests(root, ds.files, max_bytes=max(policy.max_image_bytes, policy.max_metadata_bytes),
                               deadline=deadline, confine=True,
                               single_link=True)
    except (DatasetError, OSError) as exc:
        problems.append(f"dataset: {exc}")
        return None, {}
    changed = sorted(f for f, h in ds.files.items() if after.get(f) != h)
    if changed:
        problems.append(f"dataset: file(s) changed while being read: {changed}")
    return ds, dict(ds.files)
