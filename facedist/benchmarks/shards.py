"""Shard conversion throughput: images/s of `facedist-shards build` for 1 and 2 workers on synthetic faces.

`python -m facedist.bench shards [--images 3000] [--size 112] [--format jpg] [--workers 1,2]` prints one
JSON object: wall-clock images/s and, since shared machines are noisy, images per CPU-second (user + system
time of the main process and its workers; ~ images/s per fully used core).
The time covers the whole build (scan, checking every source image, converting, writing
tars, index and manifest); the synthetic source tree (png) is generated first, untimed for the build.
`--recordio` packs the tree into an InsightFace-layout train.rec/train.idx first (untimed) and builds from
that; with `--source-format jpg` the source images already fit `--size --format jpg`, so the build copies
their bytes instead of re-encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from facedist.cli_common import DefaultsHelpFormatter
from facedist.data.shards import IMAGE_FORMATS, BuildOptions, build
from facedist.data.synth import write_synthetic_tree


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the build's pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench shards", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000, help="total synthetic images (20 per identity)")
    parser.add_argument("--size", type=int, default=112, help="side of the source and stored images")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="stored image format")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    parser.add_argument("--recordio", action="store_true", help="build from an InsightFace train.rec of the tree")
    parser.add_argument("--source-format", choices=IMAGE_FORMATS, default="png", help="synthetic source images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    images_per_identity = 20
    identities = max(1, args.images // images_per_identity)
    with tempfile.TemporaryDirectory(prefix="facedist-bench-") as tmp:
        src = Path(tmp) / "faces"
        started = time.perf_counter()
        total = write_synthetic_tree(
            src,
            identities,
            images_per_identity,
            size=args.size,
            seed=0,
            image_format=args.source_format,
            progress=False,
        )
        synth_seconds = time.perf_counter() - started
        if args.recordio:
            from facedist.data.recordio import write_insightface

            (Path(tmp) / "rec").mkdir()
            write_insightface(
                Path(tmp) / "rec" / "train.rec",
                [[p.read_bytes() for p in sorted(d.iterdir())] for d in sorted(src.iterdir())],
            )
            src = Path(tmp) / "rec"
        results = []
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(tmp) / f"shards_w{workers}"
            started, cpu_started = time.perf_counter(), _cpu_seconds()
            build(
                src,
                out,
                BuildOptions(size=args.size, format=args.format, val_identities="0.1"),
                workers=workers,
                progress=False,
            )
            seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
            results.append(
                {
                    "workers": workers,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(total / seconds, 1),
                    "images_per_s_per_worker": round(total / seconds / workers, 1),
                    "images_per_cpu_second": round(total / cpu_seconds, 1),
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "shards",
                "images": total,
                "identities": identities,
                "size": args.size,
                "format": args.format,
                "source": ("recordio " if args.recordio else "folder ") + args.source_format,
                "cpu_count": os.cpu_count(),
                "synth_images_per_s_one_core": round(total / synth_seconds, 1),
                "build": results,
            },
            indent=1,
        )
    )
    return 0
