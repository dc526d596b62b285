"""`build`: identity folders (or RecordIO) -> WebDataset shards, split indices, report.json and manifest.json.

The build runs in three passes: check every candidate image (plan.py), plan the splits and labels, then
convert (decode, square or align, resize, encode; in worker processes) and write the tars (tar.py),
then each split's index, report.json, with --align align.json (the face taken from each photo), and, last,
manifest.json, which marks the build complete. A build where no image survives writes report.json and no
manifest, and fails with one line saying why.

Determinism: files are processed in a fixed order, workers only decode/resize/encode (results come back
in order through `Pool.imap`), the main process writes the tars, and the split choice depends on `--seed`
only. So the same input and options give byte-identical output for any `--workers`. RecordIO images that
already have the requested size and format are copied byte for byte (no re-encode).

Atomicity and resume: every file is written under a temporary name and renamed into place after fsync.
`.build.json` in OUT records the build fingerprint (options + every source path and sha256); a run that
was killed, or stopped by a full disk (one line, naming OUT), is started again with the same command:
the finished shards (a prefix per split) are kept and the rest is written.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from facedist.data.shards.images import decode_rgb, encode_image, face_aligner, fits_as_is, square_resize
from facedist.data.shards.layout import (
    BUILD_STATE,
    FORMAT_VERSION,
    INDEX_DTYPE,
    ShardError,
    file_sha256,
    sample_key,
    shard_name,
)
from facedist.data.shards.plan import BuildOptions, Plan, check_file, make_plan
from facedist.data.shards.scan import SourceScan, read_source, scan_recordio_source, scan_source
from facedist.data.shards.tar import ShardWriter, finished_prefix, sample_members
from facedist.durable import TMP_SUFFIX, write_bytes_atomic, write_json_atomic


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
    image = face_aligner(size).align(decode_rgb(data), path).image if align else square_resize(decode_rgb(data), size)
    return encode_image(image, image_format, quality)


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
    leftovers = [p.name for p in out.iterdir() if not p.name.endswith(TMP_SUFFIX) and not _is_report(p)]
    if leftovers:
        raise ShardError(f"OUT {out} is not empty and holds no facedist build (found {sorted(leftovers)[0]!r})")


def _is_report(path: Path) -> bool:
    """`path` is the report.json of a build in which no image survived (a rerun may replace it)."""
    try:
        return path.name == "report.json" and "skipped_files" in json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, TypeError):
        return False


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
    from facedist.data.recordio import is_recordio

    options.validate()
    src, out = Path(src).absolute(), Path(out).absolute()
    started = time.perf_counter()
    if out.resolve().is_relative_to((src.parent if src.is_file() else src).resolve()):
        raise ShardError(f"OUT {out} is inside SRC {src}; its files would become part of the input")
    _check_out(out, None)
    scan = scan_recordio_source(src) if is_recordio(src) else scan_source(src)
    with worker_pool(workers) as pool:
        plan = make_plan(scan, _check_files(pool, src, scan, options, progress), options)
        fingerprint = plan.fingerprint(options)
        _check_out(out, fingerprint)
        with _disk_full_is_one_line(out):
            out.mkdir(parents=True, exist_ok=True)
            if not plan.splits:
                write_json_atomic(out / "report.json", plan.report)
                raise ShardError(
                    f"no image survived: {plan.why_empty(options)}; every skipped file and identity is listed "
                    f"in {out / 'report.json'} (no manifest written)"
                )
            for stale in out.glob(f".*{TMP_SUFFIX}"):
                stale.unlink()
            write_json_atomic(out / BUILD_STATE, {"build_fingerprint": fingerprint})
            image_locations = _write_shards(pool, functools.partial(scan.locate, src), out, plan, options, progress)
            manifest = _finish(out, src, plan, options, fingerprint, image_locations)
    elapsed = time.perf_counter() - started
    checked = sum(len(paths) for paths in scan.identities.values())
    summary = {
        "identities": {split: len(names) for split, names in plan.classes.items()},
        "images": sum(len(s) for s in plan.splits.values()),
        "skipped_files": len(plan.report["skipped_files"]),
        "skipped_identities": len(plan.report["skipped_identities"]),
        "shards": sum(len(m["shards"]) for m in manifest["splits"].values()),
        "bytes": sum(sh["bytes"] for m in manifest["splits"].values() for sh in m["shards"]),
        "seconds": round(elapsed, 3),
        "images_per_second": round(checked / elapsed, 1) if elapsed > 0 else None,
    }
    if progress:
        print(format_summary(summary))
    return summary


def _check_files(pool, src: Path, scan: SourceScan, options: BuildOptions, progress: bool) -> dict[str, tuple]:
    """`check_file` of every candidate (in `pool`): relpath -> (sha256, [w, h], reason, face)."""
    from tqdm import tqdm

    files = [p for paths in scan.identities.values() for p in paths]
    check = functools.partial(check_file, align_size=options.size if options.align else 0)
    results = pool.imap(check, [scan.locate(src, p) for p in files], chunksize=16)
    return dict(tqdm(zip(files, results), total=len(files), desc="check", unit="img", disable=not progress))


@contextmanager
def _disk_full_is_one_line(out: Path) -> Iterator[None]:
    """A full disk or quota becomes one ShardError; what was written stays consistent (finished shards only)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ShardError(
            f"no space left for OUT {out} ({error.strerror}); free some space and run the same command again: "
            "it resumes from the finished shards"
        ) from None


def _write_shards(pool, locate, out: Path, plan: Plan, options: BuildOptions, progress: bool) -> dict[str, list]:
    """Convert (in `pool`) and write every sample not already in a finished shard; image locations per split.
    locate: source relpath -> what read_source reads."""
    from tqdm import tqdm

    resume = {split: finished_prefix(out, split, samples, options.format) for split, samples in plan.splits.items()}
    jobs = [
        (locate(s.source), s.sha256, options.size, options.format, options.quality, options.align)
        for split, (_, done) in resume.items()
        for s in plan.splits[split][len(done) :]
    ]
    encoded = pool.imap(convert_file, jobs, chunksize=16)
    bar = tqdm(total=len(jobs), desc="convert", unit="img", disable=not progress)
    image_locations = {}
    for split, (shard, locations) in resume.items():
        with ShardWriter(out, split, shard, options.max_samples, options.max_bytes) as writer:
            for i, sample in enumerate(plan.splits[split][len(locations) :], start=len(locations)):
                try:
                    image = next(encoded)
                except (OSError, ValueError) as error:  # ShardError (changed file) passes through as is
                    raise ShardError(f"{locate(sample.source)}: unreadable during the build ({error})") from error
                writer.add(sample_members(sample_key(split, i), options.format, image, sample))
                bar.update(1)
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
    """Write each split's index, then report.json, align.json (--align) and (last) manifest.json."""
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
    if options.align:
        write_json_atomic(out / "align.json", plan.align_report())
    write_json_atomic(out / "manifest.json", manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def format_summary(summary: dict) -> str:
    """The build's one summary line."""
    identities = ", ".join(f"{split} {n}" for split, n in summary["identities"].items())
    return (
        f"identities: {identities} | images: {summary['images']} | skipped: {summary['skipped_files']} files, "
        f"{summary['skipped_identities']} identities | shards: {summary['shards']} | "
        f"{summary['bytes'] / 1e6:.1f} MB | {summary['images_per_second']} images/s"
    )
