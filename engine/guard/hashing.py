"""Hashes that pin tensors: SHA-256 of a tensor's bytes, and a fingerprint of a whole model.

The fingerprint covers every tensor's name, dtype, shape and bytes, in an order-independent,
length-prefixed framing, so a manifest or a policy can pin "exactly this base model".
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from freezeasguard.engine.errors import ManifestError
from freezeasguard.engine.io import file_sha256

_FINGERPRINT_TAG = b"freezeasguard.fingerprint/1\x00"

NamedTensors = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (the spelling stored in manifests)."""
    return str(dtype).removeprefix("torch.")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    if t.device.type == "meta":
        raise ManifestError("cannot hash a tensor on the meta device (it holds no data)")
    # A byte view of the flat contiguous tensor works for every dtype, bf16 included (numpy has
    # no bf16; viewing as uint8 reinterprets the same bytes). Byte order is the host's, which is
    # little-endian on every platform torch supports.
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw element bytes in row-major order.

    Shape and dtype are not hashed here (``model_fingerprint`` adds them), so two tensors with the
    same bytes hash equal.
    """
    return hashlib.sha256(_raw_bytes(t)).hexdigest()


def named_tensors(source: NamedTensors) -> dict[str, torch.Tensor]:
    """Name -> tensor of a module's parameters, a state dict, or (name, tensor) pairs."""
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    items = source.items() if isinstance(source, Mapping) else source
    out: dict[str, torch.Tensor] = {}
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ManifestError(f"{name!r} is a {type(t).__name__}, not a tensor")
        out[str(name)] = t
    return out


def _fingerprint(records: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    # Framing: tag, u64 count, then per tensor in sorted-name order:
    #   u64 len(name) | name (utf-8) | u64 len(dtype) | dtype (ascii) | u64 ndim | u64 dims...
    #   | 32-byte SHA-256 of the tensor's bytes.
    # Every variable-length field is length-prefixed, so no two different (name, dtype, shape)
    # sequences serialize to the same bytes. The tensor bytes enter through their own SHA-256
    # (a two-level hash), which lets one pass over the data yield both the per-tensor hashes a
    # manifest stores and the fingerprint.
    recs = sorted(records)
    h = hashlib.sha256(_FINGERPRINT_TAG)
    h.update(struct.pack("<Q", len(recs)))
    for name, dtype, shape, digest in recs:
        for text in (name.encode("utf-8"), dtype.encode("ascii")):
            h.update(struct.pack("<Q", len(text)))
            h.update(text)
        h.update(struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def model_fingerprint(tensors: NamedTensors, *, digests: Mapping[str, str] | None = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, independent of tensor order.

    Args:
        tensors: a module (its parameters), a state dict, or (name, tensor) pairs.
        digests: already computed ``tensor_sha256`` values by name, to skip rehashing.
    """
    digests = digests or {}
    return _fingerprint(
        (n, dtype_name(t.dtype), tuple(t.shape), digests.get(n) or tensor_sha256(t))
        for n, t in named_tensors(tensors).items())


_FOLDER_TAG = b"freezeasguard.model-folder/1\x00"
# What load_components reads: every file of these component folders, and the folder's index.
# Every family's folders (model.families): a denoiser folder, up to three text encoders and tokenizers.
MODEL_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                    "tokenizer_2", "tokenizer_3", "scheduler", "vae")
MODEL_INDEX = "model_index.json"


def model_folder_files(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file of a model folder that affects training or sampling, by relative path
    (each component's weights and config, the tokenizer, the scheduler, ``model_index.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"model folder {str(root)!r} does not exist")
    files: dict[str, str] = {}
    if (root / MODEL_INDEX).is_file():
        files[MODEL_INDEX] = file_sha256(root / MODEL_INDEX)
    for comp in MODEL_COMPONENTS:
        base = root / comp
        if not base.exists():
            continue
        if not base.is_dir():
            raise ManifestError(f"model folder {str(root)!r}: {comp!r} is not a folder")
        for path in sorted(base.rglob("*")):
            if path.is_dir():
                continue
            if not path.is_file():  # a FIFO, a socket, a dangling link: not a model file
                raise ManifestError(f"model folder {str(root)!r}: {path.relative_to(root)} is not a regular file")
            files[path.relative_to(root).as_posix()] = file_sha256(path)
    return files


def model_folder_fingerprint(files: Mapping[str, str]) -> str:
    """One SHA-256 over a folder's ``model_folder_files`` (path and content hash of each,
    length-prefixed)."""
    h = hashlib.sha256(_FOLDER_TAG)
    for name in sorted(files):
        raw = name.encode("utf-8")
        h.update(struct.pack("<Q", len(raw)) + raw + bytes.fromhex(files[name]))
    return h.hexdigest()
