"""ShardIndex: random access to the images of one split of a shard folder (format: facedist/data/shards/).

The index is memory-mapped, so it costs no RAM up front whatever the dataset size; class c's samples
are rows `class_offsets[c]:class_offsets[c+1]`; an image is one `os.pread` from its tar. File
descriptors are opened lazily and reopened after a fork (DataLoader workers), never shared. Opening an
index stats every shard file of the split against the manifest, so a missing or truncated shard is one
ShardError at start (trainer and `facedist-eval --shards` alike), not a worker traceback hours in.

Open files: each process (trainer, every loader worker) keeps at most `max_open_shards()` shard files of
an index open, least recently used closed first, sized from the open-file limit after raising its soft
value to the hard one, so thousands of shards never hit EMFILE.
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from pathlib import Path

import numpy as np

from facedist.data.shards import INDEX_DTYPE, ShardError, check_shard_files, load_manifest, shard_name

# A process holds up to this share of its open-file limit per index: train + val indices, sockets, pipes,
# shared libraries and the DataLoader's queues keep well inside the rest
OPEN_FILE_SHARE = 8


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS caps at OPEN_MAX: keep what we have
            pass
    return soft


def max_open_shards() -> int:
    """Shard files one index may keep open in this process (an LRU of that size; see the module doc)."""
    return max(1, raise_open_file_limit() // OPEN_FILE_SHARE)


class ShardIndex:
    """One split of a shard folder: labels, class ranges, and `read_image_bytes(i)`."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        manifest = load_manifest(self.root)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.root}: no split {split!r} (has {', '.join(manifest['splits'])})")
        meta = manifest["splits"][split]
        check_shard_files(self.root, split, meta)  # a missing shard is found now, not at the first batch touching it
        self.image_size: int = manifest["image_size"]
        self.image_format: str = manifest["image_format"]
        self.class_names: list[str] = list(meta["classes"])
        self.num_classes = len(self.class_names)
        self._index_path = self.root / meta["index"]
        self._map_index()
        if self._rows.dtype != INDEX_DTYPE or len(self._rows) != meta["num_samples"]:
            raise ShardError(f"{self._index_path}: does not match manifest.json (rebuild the shards)")
        self.num_samples = len(self._rows)
        self.class_offsets = np.searchsorted(self.labels, np.arange(self.num_classes + 1)).astype(np.int64)
        self.images_per_class = np.diff(self.class_offsets)
        self._shard_paths = [str(self.root / shard_name(split, k)) for k in range(len(meta["shards"]))]
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> fd, least recently used first
        self._max_open = min(len(self._shard_paths), max_open_shards())
        self._pid = os.getpid()

    def _map_index(self) -> None:
        self._rows = np.load(self._index_path, mmap_mode="r", allow_pickle=False)
        self.labels = self._rows["label"]

    def __len__(self) -> int:
        return self.num_samples

    def read_image_bytes(self, i: int) -> bytes:
        """The encoded image of sample `i` (jpg/png/webp bytes), read with one pread."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples of split {self.split!r}")
        row = self._rows[i]
        data = os.pread(self._fd(int(row["shard"])), int(row["size"]), int(row["offset"]))
        if len(data) != row["size"]:
            raise ShardError(f"{self._shard_paths[row['shard']]}: short read for sample {i} (truncated shard?)")
        return data

    def sample_name(self, i: int) -> str:
        """Where sample `i` lives, for error messages: its shard file, split, row and byte offset."""
        row = self._rows[i]
        shard = self._shard_paths[int(row["shard"])]
        return f"{shard} (split {self.split!r} sample {i}, byte offset {int(row['offset'])})"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked (DataLoader worker): open our own, never close the parent's
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= self._max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = os.open(self._shard_paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close this process's file descriptors (reopened on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        # spawned workers re-map the index and reopen shards lazily instead of receiving copies
        state = {k: v for k, v in self.__dict__.items() if k not in ("_rows", "labels")}
        state["_fds"], state["_pid"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map_index()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass
