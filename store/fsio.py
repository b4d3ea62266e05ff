"""Durable file operations: atomic writes, fsync, streaming sha256, copies with progress.

    write_atomic(path, b"...")                # temp file + fsync + rename + fsync(dir)
    copy_atomic(src, dst, progress=bar)       # same, streaming from another file
    digest, size = sha256_file(path)          # 1 MiB at a time, never the whole file

Readers in other processes see either the old file or the new one, never a prefix: the
bytes go to a temporary name in the same folder and are fsync'ed before the rename, and
the folder is fsync'ed after it so the rename itself survives a crash.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Protocol

CHUNK = 1 << 20


class Progress(Protocol):
    """The part of a tqdm bar this module uses."""

    def update(self, n: float | None = ...) -> bool | None: ...


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def copy_atomic(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy `src` to `dst` in chunks, then rename into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dst)
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                if progress is not None:
                    progress.update(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (after a library wrote them without it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def sha256_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest(), size
