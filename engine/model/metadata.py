"""``metadata.jsonl`` checked line by line before any image is opened: each line's JSON, caption
and domain, its file named safely inside the folder, a regular file under the size cap, listed
once. ``model.data.load_image_folder`` then reads the images the lines name.
"""
from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from freezeasguard.engine.errors import DatasetError
from freezeasguard.engine.model.folder_io import (
    _check_time,
    _Folder,
    _metadata_lines,
    _name_problem,
    _plain,
    _Refused,
    _said,
    _shown,
)


@dataclass(frozen=True)
class Record:
    """One image of a dataset as its metadata line lists it."""

    file_name: str
    caption: str
    domain: str | None
    line: int  # 1-based line in metadata.jsonl (0 for built-in data)


Problem = tuple[str, int, str]  # (file, metadata line, message)


class LineProblem(Exception):
    """One metadata line refused: skipped under ``skip_bad``, else the load's error."""

    def __init__(self, file: str, line: int, msg: str):
        super().__init__(msg)
        self.problem: Problem = (file, line, msg)


def decode_line(raw: bytes, lineno: int) -> str | None:
    """The text of a metadata line (a BOM allowed on the first), None when it is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        return None


def row_fields(line: str | None, lineno: int, where: str, caption_column: str,
               known_domains: Sequence[str] | None) -> tuple[str, str, str | None]:
    """(file_name, caption, domain) of one non-blank metadata line, or ``LineProblem``."""
    if line is None:
        raise LineProblem("metadata.jsonl", lineno, f"{where}: not valid UTF-8")
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise LineProblem("metadata.jsonl", lineno, f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
        raise LineProblem("metadata.jsonl", lineno, f"{where}: missing 'file_name'")
    fname, caption, domain = row["file_name"], row.get(caption_column), row.get("domain")
    if not isinstance(caption, str) or not caption.strip():
        raise LineProblem(fname, lineno, f"{where}: {_plain(fname)}: missing or empty caption '{caption_column}'")
    if domain is not None and not isinstance(domain, str):
        raise LineProblem(fname, lineno, f"{where}: {_plain(fname)}: 'domain' must be a string")
    if known_domains is not None and domain not in known_domains:
        raise LineProblem(fname, lineno, f"{where}: {_plain(fname)}: unknown domain {domain!r}; "
                          f"known: {sorted(known_domains)}")
    return fname, caption, domain


def locate(folder: _Folder, fname: str, lineno: int, where: str, seen: dict, max_image_bytes: int):
    """(path parts, stat) of a listed image inside the folder, or ``LineProblem``; a file listed
    twice is the load's error at once (``seen``: every file listed so far)."""
    if bad := _name_problem(fname):
        raise LineProblem(fname, lineno, f"{where}: file_name {_shown(fname)} is not a usable path ({bad})")
    try:
        parts, fst = folder.resolve(fname)
    except _Refused as r:
        raise LineProblem(fname, lineno, _said(r, where, fname)) from None
    if not stat.S_ISREG(fst.st_mode):
        raise LineProblem(fname, lineno, f"{where}: image file {_shown(fname)} is not a regular file")
    # the same file under two names (./a, sub/../a, a symlink, a hard link) is one file
    for key in (parts, *([(fst.st_dev, fst.st_ino)] if fst.st_ino else [])):
        if key in seen:
            first, line_first = seen[key]
            raise DatasetError(f"{where}: duplicate file_name {_shown(fname)} (the same file as "
                               f"{_shown(first)} on line {line_first})")
        seen[key] = (fname, lineno)
    if fst.st_size > max_image_bytes:
        raise LineProblem(fname, lineno, f"{where}: image file {_shown(fname)} is {fst.st_size} bytes, "
                          f"over the cap of {max_image_bytes} bytes")
    return parts, fst


def check_lines(folder: _Folder, root: Path, *, caption_column: str, domains: Sequence[str] | None,
                known_domains: Sequence[str] | None, max_images: int, max_image_bytes: int,
                max_metadata_bytes: int, deadline: float | None) -> tuple[list, list[Problem], str]:
    """Every metadata line checked before any image is opened: (images to read as (Record, parts,
    stat), the lines' problems, the SHA-256 of metadata.jsonl)."""
    meta = root / "metadata.jsonl"
    problems: list[Problem] = []
    todo, seen, listed, digest = [], {}, 0, hashlib.sha256()
    for lineno, raw in _metadata_lines(folder, root, meta, max_metadata_bytes, caption_column, digest):
        where = f"{meta}:{lineno}"
        _check_time(deadline, root, where)
        line = decode_line(raw, lineno)
        if line is not None and not line.strip():
            continue
        listed += 1
        if listed > max_images:
            raise DatasetError(f"{meta}: lists more than {max_images} images (the cap)")
        try:
            fname, caption, domain = row_fields(line, lineno, where, caption_column, known_domains)
            if domains is not None and domain not in domains:
                continue
            parts, fst = locate(folder, fname, lineno, where, seen, max_image_bytes)
        except LineProblem as p:
            problems.append(p.problem)
            continue
        todo.append((Record(fname, caption.strip(), domain, lineno), parts, fst))
    return todo, problems, digest.hexdigest()
