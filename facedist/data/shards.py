"""Shard writer: identity folders -> WebDataset tar shards + per-split index (build / verify / info).

Input: `SRC/<identity>/<image>`; only files directly inside an identity folder belong to it. Every file
that does not become a sample is listed in `report.json` with the reason (not an image, corrupt or
truncated, zero bytes, broken symlink, duplicate within the identity, identity below --min-images,
nested folder, file outside any identity folder...). Symlinks are followed. Images are decoded with
Pillow (EXIF orientation applied), converted to RGB, CENTRE-CROPPED to a square (the shorter side is
kept) and resized to `--size` with bicubic filtering, then re-encoded (jpg/png/webp).

Output (see .plan/INTERFACES.md): `{split}-{index:06d}.tar` shards; a sample is three members
`{key}.{ext}`, `{key}.cls`, `{key}.json` with key `{split}_{sample:09d}` (no dots: webdataset splits keys
at the first dot). Samples are ordered by label, then by source path; labels are 0..C-1 per split in
identity-name order. `{split}-index.npy` gives, per sample, (shard, label, offset, size) of the image
bytes inside its tar; `manifest.json` names classes, counts and shard checksums.

Design for 100k+ identities and data larger than RAM: the trainer never scans the tars. It memory-maps
`{split}-index.npy` (24 bytes a sample: 10M images = 240 MB, paged in on demand) and, because samples
are sorted by label, class c is the contiguous row range `class_offsets[c]:class_offsets[c+1]`
(`np.searchsorted` on the label column; C+1 int64 in RAM). A P x M batch is then P range lookups and
P*M `pread`s of (offset, size) from the shard files: one random read an image, no per-class files, no
in-RAM dict of paths. Shards stay ordinary WebDataset tars, so streaming readers work on them too.

Determinism: files are processed in a fixed order, workers only decode/resize/encode (results come back
in order through `Pool.imap`), the main process writes the tars with fixed header fields (mtime 0,
uid/gid 0, empty user/group names, mode 0o444, ustar format) and the split choice depends on `--seed`
only. So the same input and options give byte-identical output for any `--workers`.

RecordIO: SRC may also be an MXNet indexed RecordIO dataset (a folder with train.rec + train.idx, or the
.rec file; facedist.data.recordio reads it). Identities are the class ids, zero-padded; report paths are
`train.rec#KEY`. Images that already have the requested size and format (112-px RGB JPEG into `--size 112
--format jpg`) are copied byte for byte (no re-encode); every image is still decoded in the check pass,
so undecodable ones go to the report.

Atomicity and resume: every file is written under a temporary name and renamed into place after fsync.
`.build.json` in OUT records the build fingerprint (options + every source path and sha256); a run that
was killed is started again with the same command: the finished shards (a prefix per split) are kept,
the rest is written, and `manifest.json`, written last, marks the build complete.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import stat
import tarfile
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from facedist.durable import TMP_SUFFIX, atomic_open, write_bytes_atomic, write_json_atomic

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("jpg", "png", "webp")
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("label", "<i4"), ("offset", "<i8"), ("size", "<i8")])
BUILD_STATE = ".build.json"
BLOCK = tarfile.BLOCKSIZE


class ShardError(Exception):
    """A build/verify problem; the message is one line naming the file, option or value."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything the output depends on (the number of workers is deliberately not here)."""

    size: int = 112
    format: str = "jpg"
    quality: int = 95
    max_samples: int = 10_000
    max_bytes: int = 1_000_000_000
    val_identities: str = "0"  # a count ("10") or a fraction of the usable identities ("0.1")
    test_identities: str = "0"
    min_images: int = 1
    seed: int = 0
    align: bool = False  # detect, align and crop the face (facedist.align); images without one are skipped

    def validate(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise ShardError(f"--format {self.format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        for name, value, low in (
            ("size", self.size, 8),
            ("max-samples", self.max_samples, 1),
            ("max-bytes", self.max_bytes, 1),
            ("min-images", self.min_images, 1),
            ("seed", self.seed, 0),
        ):
            if value < low:
                raise ShardError(f"--{name} must be >= {low} (got {value})")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"--quality must be in 1..100 (got {self.quality})")
        for name in ("val_identities", "test_identities"):
            split_count(getattr(self, name), 1, "--" + name.replace("_", "-"))


def split_count(spec: str, available: int, flag: str) -> int:
    """Number of identities for `spec`: an integer count, or a fraction in [0, 1] of `available`."""
    spec = str(spec).strip()
    try:
        count = int(spec)
    except ValueError:
        try:
            fraction = float(spec)
        except ValueError:
            raise ShardError(f"{flag} {spec!r} is neither a count nor a fraction") from None
        if not 0.0 <= fraction <= 1.0:
            raise ShardError(f"{flag} {spec!r}: a fraction must be in [0, 1]") from None
        return int(round(fraction * available))
    if count < 0:
        raise ShardError(f"{flag} {spec!r} must not be negative")
    return count


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SourceScan:
    """Candidate image files per identity (relative POSIX paths, sorted) and what was skipped while listing."""

    identities: dict[str, list[str]]
    skipped_files: list[dict] = field(default_factory=list)  # {"path", "reason"}
    skipped_identities: list[dict] = field(default_factory=list)  # {"identity", "reason"}
    records: dict[str, tuple[str, int, int]] | None = None  # RecordIO: relpath -> (rec file, offset, key)

    def locate(self, src: Path, relpath: str) -> str | tuple[str, int, int]:
        """What `read_source` reads: the file's path, or a RecordIO record's (rec, offset, key)."""
        return self.records[relpath] if self.records is not None else str(src / relpath)


def read_source(location: str | tuple[str, int, int]) -> bytes:
    if isinstance(location, tuple):
        from facedist.data.recordio import read_image

        return read_image(*location)
    return Path(location).read_bytes()


def scan_recordio_source(src: Path) -> SourceScan:
    """A RecordIO dataset as a SourceScan (facedist.data.recordio)."""
    from facedist.data.recordio import scan_recordio

    scan = scan_recordio(src)
    records = {
        scan.relpath(key): (str(scan.rec), offset, key)
        for entries in scan.identities.values()
        for key, offset in entries
    }
    identities = {name: [scan.relpath(key) for key, _ in entries] for name, entries in scan.identities.items()}
    return SourceScan(identities, scan.skipped_files, scan.skipped_identities, records)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in a file name come back as surrogates
        return False


def _shown(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'broken symlink' or 'special file' (symlinks followed)."""
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:
        return "broken symlink" if entry.is_symlink() else "unreadable entry"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special file"


def scan_source(src: Path) -> SourceScan:
    """List identity folders and their files; report everything that cannot be a sample."""
    if not src.is_dir():
        raise ShardError(f"SRC {src} does not exist or is not a folder")
    scan = SourceScan(identities={})
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        kind = _entry_kind(entry)
        if kind != "dir":
            reason = "not inside an identity folder" if kind == "file" else kind
            scan.skipped_files.append({"path": _shown(entry.name), "reason": reason})
            continue
        if entry.name.startswith("."):
            scan.skipped_identities.append({"identity": _shown(entry.name), "reason": "hidden folder ignored"})
            continue
        if not _utf8(entry.name):
            scan.skipped_identities.append({"identity": _shown(entry.name), "reason": "folder name is not valid UTF-8"})
            continue
        files = []
        for child in sorted(os.scandir(entry.path), key=lambda e: e.name):
            relpath = f"{entry.name}/{child.name}"
            child_kind = _entry_kind(child)
            if not _utf8(child.name):
                scan.skipped_files.append({"path": _shown(relpath), "reason": "file name is not valid UTF-8"})
            elif child_kind == "dir":
                scan.skipped_files.append(
                    {"path": relpath + "/", "reason": "nested folder, not merged into the identity"}
                )
            elif child_kind != "file":
                scan.skipped_files.append({"path": relpath, "reason": child_kind})
            else:
                files.append(relpath)
        if files:
            scan.identities[entry.name] = files
        else:
            scan.skipped_identities.append({"identity": entry.name, "reason": "no files in the identity folder"})
    if not scan.identities:
        raise ShardError(f"SRC {src} has no identity folders with files (expected SRC/<identity>/<image>)")
    return scan


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (raises on corrupt/truncated data), apply EXIF orientation, return RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float greyscale: rescale to 8 bits
            pixels = np.asarray(image, dtype=np.float64)
            span = max(float(pixels.max() - pixels.min()), 1e-12)
            image = Image.fromarray(((pixels - pixels.min()) / span * 255).astype(np.uint8))
        return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square (keeping the shorter side) and resize to `size` x `size`."""
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    """`image` as jpg/png/webp bytes with fixed encoder settings (same bytes on every run)."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    elif image_format == "png":
        image.save(buffer, "PNG", compress_level=6)
    elif image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=4)
    else:
        raise ShardError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    return buffer.getvalue()


def _failure_reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image (Pillow cannot identify it)"
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"corrupt image ({type(error).__name__}: {text})"


@functools.lru_cache(maxsize=1)
def _aligner(size: int):
    from facedist.align import FaceAligner

    return FaceAligner(size)


def check_file(path: str | tuple, align_size: int = 0) -> tuple[str | None, list[int] | None, str | None]:
    """(sha256, [w, h], None) for a readable image (with a face when `align_size` > 0), else (None, None, reason)."""
    try:
        data = read_source(path)
    except OSError as error:
        return None, None, f"unreadable ({error.strerror})"
    if not data:
        return None, None, "zero-byte file"
    try:
        image = decode_rgb(data)
    except Exception as error:  # Pillow raises many types for bad data; every one means "skip this file"
        return None, None, _failure_reason(error)
    original_size = list(image.size)  # as displayed, i.e. after EXIF orientation
    if align_size:
        from facedist.align import NoFaceError

        try:
            _aligner(align_size).align(image, path)
        except NoFaceError:
            return None, None, "no face found (--align)"
    return hashlib.sha256(data).hexdigest(), original_size, None


_PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def fits_as_is(data: bytes, size: int, image_format: str) -> bool:
    """The bytes are already a size x size RGB image of `image_format` without an EXIF rotation (header only)."""
    with Image.open(io.BytesIO(data)) as image:
        return (
            _PIL_FORMATS.get(image.format) == image_format
            and image.size == (size, size)
            and image.mode == "RGB"
            and image.getexif().get(0x0112, 1) == 1
        )


def convert_file(job: tuple[str | tuple, str, int, str, int, bool]) -> bytes:
    """Decode, square (or align) and resize, encode one source image (whose sha256 must still be `expected_sha`);
    a RecordIO image that already fits is returned as it is (decoded in the check pass)."""
    path, expected_sha, size, image_format, quality, align = job
    data = read_source(path)
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise ShardError(f"{path}: changed since it was checked; run the build again")
    if isinstance(path, tuple) and not align and fits_as_is(data, size, image_format):
        return data
    # --align detects again here: the check pass only learns which images have a face (splits and labels
    # depend on it); keeping its crops would hold every image in memory until the write pass
    image = _aligner(size).align(decode_rgb(data), path).image if align else square_resize(decode_rgb(data), size)
    return encode_image(image, image_format, quality)


@dataclass(frozen=True)
class Sample:
    label: int
    identity: str
    source: str  # path relative to SRC
    sha256: str
    original_size: tuple[int, int]


@dataclass
class Plan:
    """Samples per split in output order, plus the report of everything left out."""

    splits: dict[str, list[Sample]]
    classes: dict[str, list[str]]
    report: dict

    def fingerprint(self, options: BuildOptions) -> str:
        h = hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, "options": asdict(options)}).encode())
        for split, samples in self.splits.items():
            for s in samples:
                h.update(f"{split}\0{s.label}\0{s.source}\0{s.sha256}\n".encode())
        return h.hexdigest()


def make_plan(scan: SourceScan, checks: dict[str, tuple], options: BuildOptions) -> Plan:
    """Drop bad files, dedup within identities, apply --min-images, choose splits, assign labels."""
    skipped_files = list(scan.skipped_files)
    skipped_identities = list(scan.skipped_identities)
    kept: dict[str, list[tuple[str, str, list[int]]]] = {}
    for identity, files in scan.identities.items():
        first_by_sha: dict[str, str] = {}
        good = []
        for relpath in files:
            sha, original_size, reason = checks[relpath]
            if reason is not None:
                skipped_files.append({"path": relpath, "reason": reason})
            elif sha in first_by_sha:
                skipped_files.append({"path": relpath, "reason": f"duplicate of {first_by_sha[sha]}"})
            else:
                first_by_sha[sha] = relpath
                good.append((relpath, sha, original_size))
        if len(good) < options.min_images:
            reason = f"{len(good)} usable images < --min-images {options.min_images}"
            skipped_identities.append({"identity": identity, "reason": reason})
            skipped_files.extend({"path": p, "reason": f"identity skipped: {reason}"} for p, _, _ in good)
        else:
            kept[identity] = good

    by_sha = defaultdict(list)
    for good in kept.values():
        for relpath, sha, _ in good:
            by_sha[sha].append(relpath)
    cross_duplicates = [{"sha256": sha, "paths": paths} for sha, paths in sorted(by_sha.items()) if len(paths) > 1]

    names = sorted(kept)
    n_val = split_count(options.val_identities, len(names), "--val-identities")
    n_test = split_count(options.test_identities, len(names), "--test-identities")
    if n_val + n_test > len(names):
        raise ShardError(
            f"--val-identities ({n_val}) + --test-identities ({n_test}) exceed the {len(names)} usable identities"
        )
    order = np.random.default_rng(options.seed).permutation(len(names))
    chosen = {
        "val": {names[i] for i in order[:n_val]},
        "test": {names[i] for i in order[n_val : n_val + n_test]},
    }
    chosen["train"] = set(names) - chosen["val"] - chosen["test"]

    splits, classes = {}, {}
    for split in SPLITS:
        split_names = sorted(chosen[split])
        if not split_names:
            continue
        classes[split] = split_names
        splits[split] = [
            Sample(label, name, relpath, sha, tuple(original_size))
            for label, name in enumerate(split_names)
            for relpath, sha, original_size in kept[name]
        ]
    report = {
        "format_version": FORMAT_VERSION,
        "skipped_files": sorted(skipped_files, key=lambda r: r["path"]),
        "skipped_identities": sorted(skipped_identities, key=lambda r: r["identity"]),
        "cross_identity_duplicates": cross_duplicates,
    }
    return Plan(splits, classes, report)


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar holding `member_bytes` of headers + data: end-of-archive blocks, padded to a record."""
    return -(-(member_bytes + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
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
    """Writes one split's shards in order, starting a new shard at --max-samples / --max-bytes."""

    def __init__(self, out: Path, split: str, first_shard: int, max_samples: int, max_bytes: int):
        self.out, self.split, self.shard = out, split, first_shard
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._open_shard = ExitStack()  # holds the atomic_open of the shard being written
        self._tar = None
        self.samples = self.bytes = 0
        self.image_locations: list[tuple[int, int, int]] = []  # (shard, data offset, size) per sample

    def add(self, members: list[tuple[str, bytes]]) -> None:
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


@dataclass(frozen=True)
class TarMember:
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


def _finished_prefix(
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


def _check_out(out: Path, fingerprint: str | None) -> None:
    """Refuse an OUT that holds something else than this build (finished or interrupted).

    With `fingerprint=None` (before the source is read) only a foreign non-empty OUT is refused.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ShardError(f"OUT {out} exists and is not a folder")
    for marker, what in (
        ("manifest.json", "a different dataset"),
        (BUILD_STATE, "an unfinished build of a different dataset"),
    ):
        path = out / marker
        if path.exists():
            if fingerprint is None:
                return
            try:
                recorded = json.loads(path.read_text(encoding="utf-8")).get("build_fingerprint")
            except (ValueError, OSError):
                recorded = None
            if recorded != fingerprint:
                raise ShardError(f"OUT {out} already holds {what} ({marker} differs); choose another OUT or delete it")
            return
    leftovers = [p.name for p in out.iterdir() if not p.name.endswith(TMP_SUFFIX)]
    if leftovers:
        raise ShardError(f"OUT {out} is not empty and holds no facedist build (found {sorted(leftovers)[0]!r})")


class _InProcessPool:
    """Stand-in for multiprocessing.Pool when --workers 1: no child processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, iterable, chunksize=1):
        return map(fn, iterable)


def worker_pool(workers: int):
    """A multiprocessing Pool, or an in-process stand-in for one worker."""
    return Pool(workers) if workers > 1 else _InProcessPool()


def build(src: str | Path, out: str | Path, options: BuildOptions, workers: int = 1, progress: bool = True) -> dict:
    """Convert identity folders under `src` to shards in `out`; returns the summary (also printed)."""
    from tqdm import tqdm

    options.validate()
    src, out = Path(src).absolute(), Path(out).absolute()
    started = time.perf_counter()
    from facedist.data.recordio import is_recordio

    recordio = is_recordio(src)
    if out.resolve().is_relative_to((src.parent if src.is_file() else src).resolve()):
        raise ShardError(f"OUT {out} is inside SRC {src}; its files would become part of the input")
    _check_out(out, None)
    scan = scan_recordio_source(src) if recordio else scan_source(src)
    files = [p for paths in scan.identities.values() for p in paths]
    with worker_pool(workers) as pool:
        checks = {}
        check = functools.partial(check_file, align_size=options.size if options.align else 0)
        results = pool.imap(check, [scan.locate(src, p) for p in files], chunksize=16)
        for relpath, result in tqdm(
            zip(files, results), total=len(files), desc="check", unit="img", disable=not progress
        ):
            checks[relpath] = result
        plan = make_plan(scan, checks, options)
        fingerprint = plan.fingerprint(options)
        _check_out(out, fingerprint)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".*{TMP_SUFFIX}"):
            stale.unlink()
        write_json_atomic(out / BUILD_STATE, {"build_fingerprint": fingerprint})

        image_locations = _write_shards(pool, functools.partial(scan.locate, src), out, plan, options, progress)

    manifest = _finish(out, src, plan, options, fingerprint, image_locations)
    elapsed = time.perf_counter() - started
    summary = {
        "identities": {split: len(names) for split, names in plan.classes.items()},
        "images": sum(len(s) for s in plan.splits.values()),
        "skipped_files": len(plan.report["skipped_files"]),
        "skipped_identities": len(plan.report["skipped_identities"]),
        "shards": sum(len(m["shards"]) for m in manifest["splits"].values()),
        "bytes": sum(sh["bytes"] for m in manifest["splits"].values() for sh in m["shards"]),
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(files) / elapsed, 1) if elapsed > 0 else None,
    }
    if progress:
        print(format_summary(summary))
    return summary


def _write_shards(pool, locate, out: Path, plan: Plan, options: BuildOptions, progress: bool) -> dict[str, list]:
    """Convert (in `pool`) and write every sample not already in a finished shard; image locations per split.
    locate: source relpath -> what read_source reads."""
    from tqdm import tqdm

    resume = {split: _finished_prefix(out, split, samples, options.format) for split, samples in plan.splits.items()}
    jobs = [
        (locate(s.source), s.sha256, options.size, options.format, options.quality, options.align)
        for split, (_, done) in resume.items()
        for s in plan.splits[split][len(done) :]
    ]
    encoded = pool.imap(convert_file, jobs, chunksize=16)
    bar = tqdm(total=len(jobs), desc="convert", unit="img", disable=not progress)
    image_locations = {}
    for split, (shard, locations) in resume.items():
        writer = ShardWriter(out, split, shard, options.max_samples, options.max_bytes)
        for i, sample in enumerate(plan.splits[split][len(locations) :], start=len(locations)):
            try:
                image = next(encoded)
            except (OSError, ValueError) as error:  # ShardError (changed file) passes through as is
                raise ShardError(f"{locate(sample.source)}: unreadable during the build ({error})") from error
            writer.add(sample_members(sample_key(split, i), options.format, image, sample))
            bar.update(1)
        writer.close()
        image_locations[split] = locations + writer.image_locations
    bar.close()
    return image_locations


def _finish(
    out: Path,
    src: Path,
    plan: Plan,
    options: BuildOptions,
    fingerprint: str,
    image_locations: dict[str, list[tuple[int, int, int]]],
) -> dict:
    """Write each split's index, then report.json and (last) manifest.json."""
    splits = {}
    for split, samples in plan.splits.items():
        rows = np.zeros(len(samples), dtype=INDEX_DTYPE)
        locations = np.array(image_locations[split], dtype=np.int64).reshape(-1, 3)
        rows["shard"], rows["offset"], rows["size"] = locations.T
        rows["label"] = [s.label for s in samples]
        shards = []
        for shard, count in enumerate(np.bincount(rows["shard"]).tolist()):
            path = out / shard_name(split, shard)
            shards.append(
                {"file": path.name, "samples": count, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            )
        index_name = f"{split}-index.npy"
        buffer = io.BytesIO()
        np.save(buffer, rows, allow_pickle=False)
        write_bytes_atomic(out / index_name, buffer.getvalue())
        splits[split] = {
            "classes": plan.classes[split],
            "images_per_class": np.bincount(rows["label"], minlength=len(plan.classes[split])).tolist(),
            "num_samples": len(samples),
            "shards": shards,
            "index": index_name,
            "index_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "image_size": options.size,
        "image_format": options.format,
        "splits": splits,
        "source": str(src),
        "seed": options.seed,
        "options": asdict(options),
        "build_fingerprint": fingerprint,
    }
    write_json_atomic(out / "report.json", plan.report)
    write_json_atomic(out / "manifest.json", manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def format_summary(summary: dict) -> str:
    identities = ", ".join(f"{split} {n}" for split, n in summary["identities"].items())
    return (
        f"identities: {identities} | images: {summary['images']} | skipped: {summary['skipped_files']} files, "
        f"{summary['skipped_identities']} identities | shards: {summary['shards']} | "
        f"{summary['bytes'] / 1e6:.1f} MB | {summary['images_per_second']} images/s"
    )


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


def _verify_shard(job: tuple[str, str, int, str, int, list[str], np.ndarray, str]) -> list[str]:
    """Problems in one shard: checksum, member layout, index rows, labels, metadata, image decoding."""
    path, split, first, image_format, size, classes, rows, expected_sha = job
    name = Path(path).name
    if file_sha256(path) != expected_sha:
        return [f"{name}: sha256 differs from manifest.json"]
    problems = []
    try:
        grouped = group_samples(read_tar_members(path), name)
    except (tarfile.TarError, ShardError) as error:
        return [f"{name}: not a readable tar ({error})"]
    with open(path, "rb") as f:
        for n, (key, parts) in enumerate(grouped):
            where = f"{name}: sample {key}"
            if key != sample_key(split, first + n):
                return problems + [f"{where}: expected key {sample_key(split, first + n)}"]
            if set(parts) != {image_format, "cls", "json"}:
                problems.append(f"{where}: members {sorted(parts)}, expected {image_format}, cls, json")
                continue
            row = rows[n]

            def read(member: TarMember) -> bytes:
                return os.pread(f.fileno(), member.size, member.offset)

            image = parts[image_format]
            if (image.offset, image.size) != (int(row["offset"]), int(row["size"])):
                problems.append(f"{where}: index offset/size differ from the tar")
            try:
                label = int(read(parts["cls"]))
                meta = json.loads(read(parts["json"]))
            except ValueError as error:
                problems.append(f"{where}: bad .cls or .json ({error})")
                continue
            if label != int(row["label"]) or not 0 <= label < len(classes) or meta.get("identity") != classes[label]:
                problems.append(
                    f"{where}: label {label} / identity {meta.get('identity')!r} disagree with the index/manifest"
                )
            try:
                decoded = decode_rgb(read(image))
            except Exception as error:  # any decoder failure is a bad sample
                problems.append(f"{where}: image does not decode ({_failure_reason(error)})")
                continue
            if decoded.size != (size, size):
                problems.append(f"{where}: image is {decoded.size}, expected {size}x{size}")
    return problems


def verify(out: str | Path, workers: int = 1, progress: bool = True) -> list[str]:
    """Re-read every shard of a build; returns the problems found (empty list = all good)."""
    from tqdm import tqdm

    out = Path(out)
    manifest = load_manifest(out)
    problems, jobs = [], []
    for split, meta in manifest["splits"].items():
        index_path = out / meta["index"]
        if not index_path.exists() or file_sha256(index_path) != meta["index_sha256"]:
            problems.append(f"{meta['index']}: missing or sha256 differs from manifest.json")
            continue
        rows = np.load(index_path, allow_pickle=False)
        if rows.dtype != INDEX_DTYPE or len(rows) != meta["num_samples"]:
            problems.append(
                f"{meta['index']}: {len(rows)} rows of {rows.dtype}, expected {meta['num_samples']} of {INDEX_DTYPE}"
            )
            continue
        counts = np.bincount(rows["label"], minlength=len(meta["classes"])).tolist()
        if np.any(np.diff(rows["label"]) < 0) or counts != meta["images_per_class"]:
            problems.append(f"{meta['index']}: labels unsorted or per-class counts differ from manifest.json")
        first = 0
        for shard_number, shard in enumerate(meta["shards"]):
            path = out / shard["file"]
            if not path.exists() or path.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['file']}: missing or size differs from manifest.json")
            else:
                shard_rows = rows[first : first + shard["samples"]]
                if len(shard_rows) != shard["samples"] or np.any(shard_rows["shard"] != shard_number):
                    problems.append(f"{shard['file']}: index rows do not match its {shard['samples']} samples")
                else:
                    jobs.append(
                        (
                            str(path),
                            split,
                            first,
                            manifest["image_format"],
                            manifest["image_size"],
                            meta["classes"],
                            np.array(shard_rows),
                            shard["sha256"],
                        )
                    )
            first += shard["samples"]
        if first != meta["num_samples"]:
            problems.append(f"{split}: shards hold {first} samples, manifest says {meta['num_samples']}")
    with worker_pool(workers) as pool:
        for found in tqdm(
            pool.imap(_verify_shard, jobs), total=len(jobs), desc="verify", unit="shard", disable=not progress
        ):
            problems.extend(found)
    return problems


def info(out: str | Path) -> str:
    """A human-readable summary of a build."""
    manifest = load_manifest(out)
    lines = [
        f"{out}: {manifest['image_size']}px {manifest['image_format']}, seed {manifest['seed']}, "
        f"source {manifest['source']}"
    ]
    for split, meta in manifest["splits"].items():
        counts = np.array(meta["images_per_class"])
        size = sum(s["bytes"] for s in meta["shards"])
        lines.append(
            f"{split}: {len(meta['classes'])} identities, {meta['num_samples']} images "
            f"(per identity min {counts.min()}, median {np.median(counts):g}, max {counts.max()}), "
            f"{len(meta['shards'])} shards, {size / 1e6:.1f} MB"
        )
    return "\n".join(lines)
