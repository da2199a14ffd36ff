"""Reading a dataset folder within bounds: every name resolved one part at a time inside the
folder (symlinks followed by hand, never out of it), opened without following links or blocking,
capped in lines, bytes, pixels and time, and decoded only from an allow-listed format.
``model.data.load_image_folder`` reads image folders through it."""
from __future__ import annotations

import io
import os
import stat
import time
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from freezeasguard.engine.errors import DatasetError

# ----------------------------------------------------------------------------- reading within bounds
# Defaults of load_image_folder: generous for the engine's own training; the service passes its policy's.
DEFAULT_MAX_IMAGES = 1_000_000
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
DEFAULT_MAX_METADATA_BYTES = 256 << 20
MAX_LINE_BYTES = 64 << 10  # one metadata line, newline included
MAX_NAME_CHARS = 1024  # one file_name
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # never EPS & co., which run external programs
_MAX_LINKS = 40
_DIRFD = {os.open, os.stat, os.readlink} <= os.supports_dir_fd
_O_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_O_DIR = _O_FILE | getattr(os, "O_DIRECTORY", 0)
# Why a name is not read ("{}": the name, shown); OUTSIDE ends the message of a name that leads out.
OUTSIDE = "is outside the dataset folder"
_OUT, _MISSING = "file_name {} " + OUTSIDE, "image file {} not found"
_LOOP, _CHANGED = "image file {} cannot be resolved (too many symbolic links)", "image file {} changed while being read"


class _Refused(Exception):
    """A name that is not read; ``args[0]`` is one of the messages above."""


class _Linked(_Refused):
    """A file refused under ``single_link``: it has another name, maybe outside the folder."""

    WHY = "another name may be outside the dataset folder; copy the file into the folder"

    def __init__(self, nlink: int):
        self.nlink = nlink
        super().__init__(f"image file {{}} has {nlink} hard links ({self.WHY})")


def _parts(name: str) -> list[str]:
    """Path components of ``name``, last first (a stack), without empty and '.' ones."""
    return [p for p in reversed(name.split("/")) if p not in ("", ".")]


class _Folder:
    """A dataset folder, held open while it is read.

    With ``confine``, a name is resolved one component at a time relative to an open directory of
    the folder, its symlinks followed by hand and never a step out of it: nothing outside is ever
    looked at, so what exists there cannot change the answer. A file is then opened with
    O_NOFOLLOW at every step (a component swapped for a symlink meanwhile fails) and O_NONBLOCK (a
    FIFO swapped in never blocks), and must still be the regular file that was checked.

    With ``single_link``, a file with more than one hard link is refused too: a hard link names a
    file of anywhere on the filesystem without any symlink to see, so only a file whose one name is
    in the folder is known to be the folder's. The link count is that of the open descriptor, so
    the file checked is the file read (a name swapped meanwhile changes nothing).
    """

    def __init__(self, root: Path, confine: bool, single_link: bool = False):
        self.path, self.confine, self.single_link = os.path.realpath(root), confine, single_link
        self.fd = os.open(self.path, _O_DIR) if _DIRFD else None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def _in(self, dirs: list[str], fds: list, name: str) -> tuple[str, dict]:
        return (name, {"dir_fd": fds[-1]}) if _DIRFD else (os.path.join(self.path, *dirs, name), {})

    @staticmethod
    def _up(dirs: list[str], fds: list, depth: int) -> None:
        del dirs[depth:]
        while len(fds) > depth + 1:
            if (fd := fds.pop()) is not None:
                os.close(fd)

    def resolve(self, name: str) -> tuple[tuple[str, ...], os.stat_result]:
        """(components below the folder, stat) of what ``name`` names, or _Refused; opens no file."""
        dirs, fds, links, inside = [], [self.fd], 0, os.path.join(self.path, "")
        try:
            if not self.confine:
                path = os.path.realpath(os.path.join(self.path, name))
                return (path,), os.stat(path)
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
                raise _Refused(_OUT)
            todo = _parts(name)
            while todo:
                part = todo.pop()
                if part == "..":
                    if not dirs:
                        raise _Refused(_OUT)
                    self._up(dirs, fds, len(dirs) - 1)
                    continue
                path, kw = self._in(dirs, fds, part)
                st = os.stat(path, follow_symlinks=False, **kw)
                if stat.S_ISLNK(st.st_mode):
                    if (links := links + 1) > _MAX_LINKS:
                        raise _Refused(_LOOP)
                    target = os.readlink(path, **kw)
                    if os.path.isabs(target):  # the folder itself or a path in it, from the folder on
                        if not (target + os.sep).startswith(inside):
                            raise _Refused(_OUT)
                        self._up(dirs, fds, 0)
                        target = target[len(inside):]
                    todo += _parts(target)
                elif stat.S_ISDIR(st.st_mode):
                    fds.append(os.open(path, _O_DIR, **kw) if _DIRFD else None)
                    dirs.append(part)
                elif todo:
                    raise _Refused(_MISSING)  # a file used as a directory
                else:
                    return (*dirs, part), st
            return tuple(dirs), os.fstat(fds[-1]) if _DIRFD else os.stat(os.path.join(self.path, *dirs))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            raise _Refused(_MISSING) from None
        except OSError as e:
            raise _Refused(f"image file {{}} cannot be read ({e.strerror})") from None
        finally:
            self._up(dirs, fds, 0)

    def open(self, parts: tuple[str, ...], expect: os.stat_result) -> int:
        """A read-only fd of a resolved file, if it is still the regular file ``expect``."""
        dirs, fds = [], [self.fd]
        try:
            if self.confine and _DIRFD:
                for p in parts[:-1]:
                    fds.append(os.open(p, _O_DIR, dir_fd=fds[-1]))
                    dirs.append(p)
                fd = os.open(parts[-1], _O_FILE, dir_fd=fds[-1])
            else:
                fd = os.open(os.path.join(self.path, *parts), _O_FILE)
            st = os.fstat(fd)
        except OSError:
            raise _Refused(_CHANGED) from None
        finally:
            self._up(dirs, fds, 0)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            os.close(fd)
            raise _Refused(_CHANGED)
        if self.single_link and st.st_nlink > 1:
            os.close(fd)
            raise _Linked(st.st_nlink)
        return fd

    def read(self, parts: tuple[str, ...], expect: os.stat_result, cap: int) -> bytes:
        """The bytes of a resolved regular file, which must not grow past ``cap`` bytes."""
        fd, chunks, n = self.open(parts, expect), [], 0
        try:
            while chunk := os.read(fd, min(1 << 20, cap + 1 - n)):
                chunks.append(chunk)
                if (n := n + len(chunk)) > cap:
                    raise _Refused(_CHANGED)
            return b"".join(chunks)
        except OSError:
            raise _Refused(_CHANGED) from None
        finally:
            os.close(fd)


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 120 else f"{name[:120]!r}... ({len(name)} characters)"


def _plain(name: str) -> str:
    return name if name.isprintable() and len(name) <= 120 else _shown(name)


def _name_problem(name: str) -> str | None:
    if "\x00" in name:
        return "it contains a NUL byte"
    if len(name) > MAX_NAME_CHARS:
        return f"it is over {MAX_NAME_CHARS} characters"
    try:
        parts = os.fsencode(name).split(b"/")
    except UnicodeError:
        return "it cannot be encoded as a file name"
    return "a component is over 255 bytes" if any(len(p) > 255 for p in parts) else None


def _said(r: _Refused, where: str, name: str) -> str:
    return f"{where}: " + r.args[0].replace("{}", _shown(name))


def _check_time(deadline: float | None, root, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DatasetError(f"{root}: not read within the time limit (stopped at {where})")


def _metadata_lines(folder: _Folder, root: Path, meta: Path, cap: int, caption_column: str, digest):
    """(line number, bytes) of each line of metadata.jsonl, read within ``cap`` bytes (fatal past it)."""
    try:
        parts, st = folder.resolve("metadata.jsonl")
    except _Refused as r:
        if r.args[0] == _OUT:
            raise DatasetError(f"{str(root)!r}: metadata.jsonl {OUTSIDE}") from None
        raise DatasetError(f"{str(root)!r} has no metadata.jsonl (expected lines of "
                           f'{{"file_name": ..., "{caption_column}": ..., "domain": ...}})') from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{meta}: not a regular file")
    if st.st_size > cap:
        raise DatasetError(f"{meta}: {st.st_size} bytes, over the cap of {cap} bytes")
    try:
        fd = folder.open(parts, st)
    except _Linked as r:
        raise DatasetError(f"{meta}: has {r.nlink} hard links ({r.WHY})") from None
    except _Refused:
        raise DatasetError(f"{meta}: changed while being read") from None
    with os.fdopen(fd, "rb") as f:
        lineno, total = 0, 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno, total = lineno + 1, total + len(raw)
            if total > cap:
                raise DatasetError(f"{meta}: over the cap of {cap} bytes (it grew while being read)")
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"{meta}:{lineno}: line over the cap of {MAX_LINE_BYTES} bytes")
            digest.update(raw)
            yield lineno, raw


def _decode(data: bytes, where: str, name: str, max_pixels: int, formats, convert):
    """``convert(img)`` of the decoded image, or the message saying why it is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats)) as img:
                w, h = img.size  # from the header: nothing is decoded yet
                if w * h > max_pixels:
                    return f"{where}: image {_shown(name)} is {w}x{h} pixels, over the cap of {max_pixels}"
                img.load()
                if img.size != (w, h):
                    return (f"{where}: image {_shown(name)} decoded to {img.size[0]}x{img.size[1]} pixels, "
                            f"not the {w}x{h} its header claims")
                return convert(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"{where}: image {_shown(name)} refused as a decompression bomb"
    except UnidentifiedImageError:
        return f"{where}: cannot decode image {_shown(name)}: not a {', '.join(formats)} image"
    except Exception as e:  # noqa: BLE001 - a malformed file can make a decoder raise anything
        return f"{where}: cannot decode image {_shown(name)}: {e or type(e).__name__}"
