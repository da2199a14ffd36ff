"""The base values of frozen tensors held in a lower precision, kept on disk and read when needed.

Under bf16 frozen storage the live copy of a frozen tensor is its base value rounded to bf16. The
exported model must carry the base's fp32 bytes, and the proof must compare the live copy with the
base, but neither needs a second copy in RAM for the whole job (for FLUX.1 that copy is 22 GiB per
process). So ``FrozenOriginals`` holds no tensor: it names a safetensors file holding the fp32
values (a file the guard writes once, before the cast, or the base model's own weights file) and
reads one tensor from it at a time, memory-mapped, at export and at verify. A tensor whose bf16
round trip is exact is not stored at all: its live copy, cast back, is its base value bit for bit.

What is read is never trusted: ``verify`` hashes every exported frozen tensor against the signed
manifest, so a file changed on disk fails the proof like a changed tensor does.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written one tensor at a time: the header (8-byte little-endian length,
    JSON with each tensor's dtype, shape and byte range), then each tensor's bytes in turn, so the
    host holds one tensor's bytes at most (``safetensors.torch.save_file`` stages all of them)."""
    header, off = {}, 0
    for n, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


class FrozenOriginals:
    """Name -> base value of the frozen tensors held in a lower precision, read from ``path``."""

    def __init__(self, path: Path | None = None, names: tuple[str, ...] = ()):
        self.path = Path(path) if path is not None else None
        self.names = tuple(names)
        self._dir: Path | None = None

    @classmethod
    def spill(cls, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> "FrozenOriginals":
        """Write the values of ``tensors`` that ``dtype`` does not hold exactly to a private file
        (removed with this object), one tensor at a time: nothing of them is copied in RAM beyond
        the one tensor being written."""
        keep = {n: t for n, t in tensors.items() if not torch.equal(t.detach().to(dtype).to(t.dtype), t.detach())}
        out = cls(names=tuple(sorted(keep)))
        if keep:
            out._dir = Path(tempfile.mkdtemp(prefix="freezeasguard-originals-"))
            weakref.finalize(out, shutil.rmtree, out._dir, True)
            out.path = out._dir / "frozen_originals.safetensors"
            _write_safetensors(out.path, keep)
        return out

    @classmethod
    def in_file(cls, path: Path | str, names: tuple[str, ...]) -> "FrozenOriginals":
        """The values of ``names`` as stored in an existing safetensors file (the base's weights)."""
        return cls(Path(path), tuple(sorted(names)))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, base value) one at a time, each read when reached."""
        if not self.names:
            return
        with safe_open(str(self.path), framework="pt") as f:
            for n in self.names:
                yield n, f.get_tensor(n)

    @property
    def host_bytes(self) -> int:
        """Bytes of base values this object keeps in memory: none, by construction."""
        return 0
