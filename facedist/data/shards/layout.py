"""The shard folder's on-disk format: names, constants, the manifest, and reading tar members back.

A build writes `{split}-{index:06d}.tar` shards; a sample is three members `{key}.{ext}`, `{key}.cls`,
`{key}.json` with key `{split}_{sample:09d}` (no dots: webdataset splits keys at the first dot).
`{split}-index.npy` gives, per sample, (shard, label, offset, size) of the image bytes inside its tar
(INDEX_DTYPE); `manifest.json` names the classes, counts, and each shard's file, byte size and sha256.
Everything that reads a shard folder (trainer, evaluation, verify, info) starts here: `load_manifest`
for the manifest, `shard_file_problems` for a stat of every shard it lists (missing or resized files are
found at start, not hours into a run), `read_tar_members` / `group_samples` for a tar's layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("jpg", "png", "webp")
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("label", "<i4"), ("offset", "<i8"), ("size", "<i8")])
BUILD_STATE = ".build.json"


class ShardError(Exception):
    """A build/verify problem; the message is one line naming the file, option or value."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_file_problems(root: str | Path, split_meta: dict) -> dict[str, str]:
    """{file name: problem} for each shard of a split (manifest entry `split_meta`) that is missing or not the
    size the manifest records: a `stat` each, so thousands of shards are checked in well under a second."""
    problems = {}
    for shard in split_meta["shards"]:
        path = Path(root) / shard["file"]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            problems[shard["file"]] = f"{path}: missing (manifest.json lists it)"
            continue
        if size != shard["bytes"]:
            problems[shard["file"]] = (
                f"{path}: {size} bytes, manifest.json says {shard['bytes']} (truncated or replaced)"
            )
    return problems


def check_shard_files(root: str | Path, split: str, split_meta: dict) -> None:
    """ShardError naming the first missing or resized shard file of `split`, if any."""
    problems = list(shard_file_problems(root, split_meta).values())
    if problems:
        more = f" (and {len(problems) - 1} more shard files of split {split!r})" if len(problems) > 1 else ""
        raise ShardError(f"{problems[0]}{more}; restore the shard folder or build it again")


def sample_key(split: str, index: int) -> str:
    """Key of sample `index` of `split` (its tar members are KEY.EXT)."""
    return f"{split}_{index:09d}"


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`."""
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class TarMember:
    """A regular member of a tar: its name and where its data lies."""

    name: str
    offset: int  # of the data, in bytes from the start of the tar file
    size: int


def read_tar_members(path: str | Path) -> list[TarMember]:
    """Names and data offsets/sizes of a tar's regular members (headers only; data is skipped)."""
    with tarfile.open(path, mode="r:") as tar:
        return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isreg()]


def group_samples(members: list[TarMember], path: str | Path) -> list[tuple[str, dict[str, TarMember]]]:
    """[(key, {extension: member})] in tar order; a key is everything before the first dot."""
    samples: list[tuple[str, dict[str, TarMember]]] = []
    for m in members:
        key, dot, ext = m.name.partition(".")
        if not dot:
            raise ShardError(f"{path}: member {m.name!r} has no extension")
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = m
    return samples


def load_manifest(out: str | Path) -> dict:
    """The manifest of a finished build (ShardError if missing or unreadable)."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path} not found: {out} is not a finished facedist shard folder") from None
    except ValueError as error:
        raise ShardError(f"{path} is not valid JSON ({error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest
