"""ShardIndex: random access to the images of one split of a shard folder (format: facedist/data/shards.py).

The index is memory-mapped, so it costs no RAM up front whatever the dataset size; class c's samples
are rows `class_offsets[c]:class_offsets[c+1]`; an image is one `os.pread` from its tar. File
descriptors are opened lazily and reopened after a fork (DataLoader workers), never shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facedist.data.shards import INDEX_DTYPE, ShardError, load_manifest, shard_name


class ShardIndex:
    """One split of a shard folder: labels, class ranges, and `read_image_bytes(i)`."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        manifest = load_manifest(self.root)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.root}: no split {split!r} (has {', '.join(manifest['splits'])})")
        meta = manifest["splits"][split]
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
        self._fds: dict[int, int] = {}
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
        return f"{self._shard_paths[int(row['shard'])]} (split {self.split!r} sample {i}, byte offset {int(row['offset'])})"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked (DataLoader worker): open our own, never close the parent's
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._shard_paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close this process's file descriptors (reopened on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        # spawned workers re-map the index and reopen shards lazily instead of receiving copies
        state = {k: v for k, v in self.__dict__.items() if k not in ("_rows", "labels")}
        state["_fds"], state["_pid"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map_index()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass
