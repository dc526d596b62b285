"""Writes that survive a crash or a power loss: the one home of facedist's atomic, fsync'd file writes.

A file is written under a temporary sibling name (`.NAME.PID.tmp`), fsync'd, renamed over its final
name, and its folder fsync'd after the rename, because a rename is durable only once its directory
entry is. Readers therefore see either the old file or the whole new one, never a half-written file;
a crash leaves at most a `*.tmp` sibling, which the shard builder sweeps on its next run. Shards,
manifests, checkpoints, metrics, embeddings and plots all go through here.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_directory(path: str | Path) -> None:
    """Flush `path`'s directory entries (renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """The name a file is written under before its rename: hidden, per process, ending in TMP_SUFFIX."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def _published(path: Path) -> Iterator[Path]:
    """Yield the temporary sibling to write and fsync; on success rename it to `path` and fsync the folder;
    in every case leave no temporary file behind."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_open(path: str | Path) -> Iterator[io.BufferedWriter]:
    """Open a temporary sibling of `path` for writing; on success fsync it, rename it to `path`, fsync the folder."""
    with _published(Path(path)) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Publish `path` by calling `write(tmp)` on a temporary sibling (for writers that want a file name),
    then fsync, rename and fsync the folder. A failing `write` leaves no temporary file behind."""
    with _published(Path(path)) as tmp:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` via a temporary file and a rename (fsync'd unless `fsync=False`, for scratch data)."""
    if fsync:
        with atomic_open(path) as f:
            f.write(data)
        return
    path = Path(path)
    tmp = temporary_sibling(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented UTF-8 JSON, published atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
