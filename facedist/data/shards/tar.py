"""Writing shards: samples as tar members, shards cut at a size, published atomically, resumed after a kill.

The tars have fixed header fields (mtime 0, uid/gid 0, empty user/group names, mode 0o444, ustar format),
so the same samples give byte-identical shards. Each shard is written under a temporary name and renamed
into place after fsync (facedist.durable), so a shard file that exists is complete; `finished_prefix`
finds the shards an interrupted run of the same build already finished, which a rerun keeps.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import ExitStack
from pathlib import Path

from facedist.data.shards.layout import ShardError, group_samples, read_tar_members, sample_key, shard_name
from facedist.data.shards.plan import Sample
from facedist.durable import atomic_open

BLOCK = tarfile.BLOCKSIZE


def _member_bytes(size: int) -> int:
    """Bytes a member of `size` data bytes takes in a tar: one header block, data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar holding `member_bytes` of headers + data: end-of-archive blocks, padded to a record."""
    return -(-(member_bytes + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed fields, so the same data gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sample_members(key: str, image_format: str, image: bytes, sample: Sample) -> list[tuple[str, bytes]]:
    """The three tar members of a sample, in order: image, class, metadata."""
    meta = {
        "identity": sample.identity,
        "source": sample.source,
        "original_size": list(sample.original_size),
        "sha256": sample.sha256,
    }
    return [
        (f"{key}.{image_format}", image),
        (f"{key}.cls", str(sample.label).encode("ascii")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]


class ShardWriter:
    """Writes one split's shards in order, starting a new shard at --max-samples / --max-bytes.

    Used as a context manager: leaving it normally finishes the last shard; leaving it on an error (a full
    disk) drops the shard being written with its temporary file, so only finished shards remain.
    """

    def __init__(self, out: Path, split: str, first_shard: int, max_samples: int, max_bytes: int):
        self.out, self.split, self.shard = out, split, first_shard
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._open_shard = ExitStack()  # holds the atomic_open of the shard being written
        self._tar = None
        self.samples = self.bytes = 0
        self.image_locations: list[tuple[int, int, int]] = []  # (shard, data offset, size) per sample

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error is None:
            self.close()
        else:  # atomic_open sees the error: it removes the temporary file instead of publishing it
            self._tar = None
            self._open_shard.__exit__(error_type, error, traceback)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members, first closing the current shard if the sample would overflow it."""
        size = sum(_member_bytes(len(data)) for _, data in members)
        full = self.samples + 1 > self.max_samples or _tar_file_bytes(self.bytes + size) > self.max_bytes
        if self._tar is not None and full:
            self.close()
        if self._tar is None:
            file = self._open_shard.enter_context(atomic_open(self.out / shard_name(self.split, self.shard)))
            self._tar = tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT)
            self.samples = self.bytes = 0
        image = members[0][1]
        self.image_locations.append((self.shard, self._tar.offset + BLOCK, len(image)))  # short name: 1 header block
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.samples += 1
        self.bytes += size

    def close(self) -> None:
        """Finish the current shard (end-of-archive blocks, fsync, rename into place)."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        self._open_shard.close()
        self.shard += 1


def finished_prefix(
    out: Path, split: str, samples: list[Sample], image_format: str
) -> tuple[int, list[tuple[int, int, int]]]:
    """Shards already written for `split` by an earlier run of the same build: (count, image locations)."""
    shard = done = 0
    locations = []
    while (out / shard_name(split, shard)).exists():
        try:
            grouped = group_samples(read_tar_members(out / shard_name(split, shard)), shard_name(split, shard))
        except (tarfile.TarError, ShardError, OSError):
            break
        expected = [sample_key(split, done + i) for i in range(len(grouped))]
        if not grouped or [k for k, _ in grouped] != expected or done + len(grouped) > len(samples):
            break
        if any(set(parts) != {image_format, "cls", "json"} for _, parts in grouped):
            break
        locations += [(shard, parts[image_format].offset, parts[image_format].size) for _, parts in grouped]
        done += len(grouped)
        shard += 1
    return shard, locations
