"""Atomic file output: a reader never sees a half-written file, and a failed write leaves the
previous version in place (write to a temporary sibling, fsync, then rename).

Results (models, manifests, reports, logs) get the mode the umask gives any new file: the
temporary sibling comes from ``mkstemp`` / ``mkdtemp``, which create 0600 / 0700 whatever the
umask. Keys are written with ``private=True`` and stay 0600 from their first byte."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import save as _safetensors_bytes


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so a file created or renamed in it survives a crash (no-op where a folder
    cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; mode 0600 with ``private`` (secrets: never readable
    by others, not even while being written), else what the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, private: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), private=private)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename.

    An existing ``path`` is moved aside first and deleted only after the new folder is in place,
    so at every moment either the old or the new complete folder exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    data = _safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


_RENAME_NOREPLACE = 1


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even an empty
    folder, which a plain rename would silently replace). Uses Linux's renameat2(RENAME_NOREPLACE)
    where the C library has it; elsewhere a check right before the rename."""
    src, dst = os.fspath(src), os.fspath(dst)
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            fsync_dir(Path(dst).parent)
            return
        err = ctypes.get_errno()
        if err == 17:  # EEXIST
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: fall back
            raise OSError(err, os.strerror(err), src)
    if os.path.lexists(dst):
        raise FileExistsError(17, "File exists", dst)
    os.rename(src, dst)
    fsync_dir(Path(dst).parent)
