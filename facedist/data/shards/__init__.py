"""Shard folders: identity folders -> WebDataset tar shards + a per-split index (build / verify / info).

A reader who wants one part opens one file: `scan.py` lists the source, `plan.py` checks every image and
chooses splits and labels, `images.py` decodes and re-encodes, `tar.py` writes the shards, `builder.py`
runs a build end to end (resume, report, manifest), `layout.py` is the on-disk format every reader
shares, `verify.py` checks and describes a finished build. This module re-exports the public API.

Design for 100k+ identities and data larger than RAM: the trainer never scans the tars. It memory-maps
`{split}-index.npy` (24 bytes a sample: 10M images = 240 MB, paged in on demand) and, because samples
are sorted by label, class c is the contiguous row range `class_offsets[c]:class_offsets[c+1]`
(`np.searchsorted` on the label column; C+1 int64 in RAM). A P x M batch is then P range lookups and
P*M `pread`s of (offset, size) from the shard files: one random read an image, no per-class files, no
in-RAM dict of paths. Shards stay ordinary WebDataset tars, so streaming readers work on them too.
"""

from facedist.data.shards.builder import build, format_summary, worker_pool
from facedist.data.shards.images import decode_rgb, encode_image, square_resize
from facedist.data.shards.layout import (
    BUILD_STATE,
    FORMAT_VERSION,
    IMAGE_FORMATS,
    INDEX_DTYPE,
    SPLITS,
    ShardError,
    check_shard_files,
    file_sha256,
    load_manifest,
    shard_file_problems,
    shard_name,
)
from facedist.data.shards.plan import BuildOptions
from facedist.data.shards.verify import info, verify
from facedist.durable import TMP_SUFFIX

__all__ = [
    "BUILD_STATE",
    "FORMAT_VERSION",
    "IMAGE_FORMATS",
    "INDEX_DTYPE",
    "SPLITS",
    "TMP_SUFFIX",
    "BuildOptions",
    "ShardError",
    "build",
    "check_shard_files",
    "decode_rgb",
    "encode_image",
    "file_sha256",
    "format_summary",
    "info",
    "load_manifest",
    "shard_file_problems",
    "shard_name",
    "square_resize",
    "verify",
    "worker_pool",
]
