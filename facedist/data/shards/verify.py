"""Checking a finished build (`verify`: everything, re-read) and describing it (`info`: from the manifest).

`verify` re-reads every shard in worker processes: its sha256, its tar layout (three members a sample,
keys in order), that the index rows point at each image's bytes, labels and identities against the
manifest, and that every image decodes at the stored size. It returns one line per problem. `info`
reads only the manifest and stats the shard files, so it is instant and names missing or resized ones.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np

from facedist.data.shards.builder import worker_pool
from facedist.data.shards.images import decode_rgb, failure_reason
from facedist.data.shards.layout import (
    INDEX_DTYPE,
    ShardError,
    TarMember,
    file_sha256,
    group_samples,
    load_manifest,
    read_tar_members,
    sample_key,
    shard_file_problems,
)


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
                problems.append(f"{where}: image does not decode ({failure_reason(error)})")
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
        missing_or_resized = shard_file_problems(out, meta)
        problems += missing_or_resized.values()
        for shard_number, shard in enumerate(meta["shards"]):
            path = out / shard["file"]
            if shard["file"] not in missing_or_resized:
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


def info(out: str | Path) -> tuple[str, int]:
    """(a human-readable summary of a build with a line for each shard file missing or not its recorded size,
    the number of such files)."""
    manifest = load_manifest(out)
    lines = [
        f"{out}: {manifest['image_size']}px {manifest['image_format']}, seed {manifest['seed']}, "
        f"source {manifest['source']}"
    ]
    damaged = 0
    for split, meta in manifest["splits"].items():
        counts = np.array(meta["images_per_class"])
        size = sum(s["bytes"] for s in meta["shards"])
        lines.append(
            f"{split}: {len(meta['classes'])} identities, {meta['num_samples']} images "
            f"(per identity min {counts.min()}, median {np.median(counts):g}, max {counts.max()}), "
            f"{len(meta['shards'])} shards, {size / 1e6:.1f} MB"
        )
        problems = [f"{split}: {problem}" for problem in shard_file_problems(out, meta).values()]
        lines += problems
        damaged += len(problems)
    return "\n".join(lines), damaged
