"""`facedist-shards`: make synthetic identities, build / verify / describe WebDataset shard folders, draw LFW-style
pairs files and pack them into .bin verification sets."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from facedist.align import AlignerMissingError, require_aligner
from facedist.cli_common import DefaultsHelpFormatter
from facedist.data.shards import IMAGE_FORMATS, BuildOptions, ShardError, build, info, verify

SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_count(text: str) -> int:
    """'500000', '512M', '1G', '64Mi' -> bytes."""
    lowered = text.strip().lower().removesuffix("b")
    number = lowered.rstrip("kmgi")
    suffix = lowered[len(number) :]
    try:
        return int(float(number) * SIZE_SUFFIXES[suffix])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 500000, 512M, 1G)") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedist-shards", description=__doc__, formatter_class=DefaultsHelpFormatter)
    # every subcommand's --help shows its options' defaults
    subcommand = functools.partial(argparse.ArgumentParser, formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=subcommand)
    default_workers = min(8, os.cpu_count() or 1)

    synth = commands.add_parser("synth", help="write procedurally drawn face identities as OUT/<identity>/<image>")
    synth.add_argument("out", metavar="OUT", help="folder to write, one subfolder per identity")
    synth.add_argument("--identities", type=int, default=200, help="identities to draw")
    synth.add_argument("--images-per-identity", type=int, default=10, help="images drawn of each identity")
    synth.add_argument("--size", type=int, default=112, help="side of the square images, pixels (>= 16)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed draws the same faces")
    synth.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="image file format")
    synth.add_argument("--workers", type=int, default=default_workers, help="drawing processes")

    defaults = BuildOptions()
    b = commands.add_parser(
        "build", help="convert identity folders SRC (or an MXNet RecordIO train.rec + train.idx) into shards in OUT"
    )
    b.add_argument("src", metavar="SRC", help="identity folders SRC/<identity>/<image>, or an MXNet train.rec")
    b.add_argument("out", metavar="OUT", help="shard folder to write (resumed if a build was interrupted)")
    b.add_argument("--size", type=int, default=defaults.size, help="side of the stored square images")
    b.add_argument("--format", choices=IMAGE_FORMATS, default=defaults.format, help="stored image format")
    b.add_argument("--quality", type=int, default=defaults.quality, help="jpg/webp quality 1..100")
    b.add_argument("--max-samples", type=int, default=defaults.max_samples, help="samples per shard at most")
    b.add_argument("--max-bytes", type=byte_count, default=defaults.max_bytes, help="bytes per shard at most (e.g. 1G)")
    b.add_argument("--workers", type=int, default=default_workers, help="decode/encode processes")
    b.add_argument("--val-identities", default=defaults.val_identities, help="count or fraction of identities")
    b.add_argument("--test-identities", default=defaults.test_identities, help="count or fraction of identities")
    b.add_argument("--seed", type=int, default=defaults.seed, help="chooses the val/test identities")
    b.add_argument("--min-images", type=int, default=defaults.min_images, help="skip identities with fewer images")
    b.add_argument(
        "--min-size",
        type=int,
        default=defaults.min_size,
        help="skip (and report) images whose shorter side has fewer pixels: thumbnails, 1x1 placeholders",
    )
    b.add_argument(
        "--align",
        action="store_true",
        help="detect, align and crop each face (OpenCV; pip install 'facedist[align]'); "
        "images without a face are skipped and reported",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    v = commands.add_parser("verify", help="re-read every shard: checksums, counts, index, decode every image")
    v.add_argument("out", metavar="OUT", help="shard folder to check")
    v.add_argument("--workers", type=int, default=default_workers, help="reading and decoding processes")
    v.add_argument("--quiet", action="store_true", help="no progress bar")

    i = commands.add_parser("info", help="print a summary of a shard folder")
    i.add_argument("out", metavar="OUT", help="shard folder to describe")

    pairs = commands.add_parser("pairs", help="draw an LFW-style pairs file (View 2 format) from identity folders SRC")
    pairs.add_argument("src", metavar="SRC", help="identity folders SRC/<identity>/<image>")
    pairs.add_argument("out", metavar="OUT", help="pairs file to write (e.g. pairs.txt)")
    pairs.add_argument("--folds", type=int, default=10, help="folds, each with identities of its own")
    pairs.add_argument("--per-fold", type=int, default=300, help="same pairs, and as many different pairs, per fold")
    pairs.add_argument("--seed", type=int, default=0, help="the same seed draws the same pairs")

    packed = commands.add_parser("bin", help="pack a pairs file and its image folder into an InsightFace .bin")
    packed.add_argument("out", metavar="OUT", help=".bin file to write (e.g. lfw.bin)")
    packed.add_argument("--pairs", required=True, help="pairs file (LFW's pairs.txt format)")
    packed.add_argument("--images", required=True, help="DIR/<identity>/<image>: LFW's Name_0001.jpg or any names")
    packed.add_argument("--align", action="store_true", help="store 5-point aligned crops (raw photos)")
    packed.add_argument("--size", type=int, default=112, help="side of the aligned crops (--align)")
    packed.add_argument(
        "--skip-missing", action="store_true", help="drop (and list) pairs with a missing image or no face found"
    )
    return parser


def _pairs(args: argparse.Namespace) -> None:
    from facedist.data.pairs import draw_pairs, write_pairs

    drawn = draw_pairs(args.src, args.folds, args.per_fold, args.seed)
    write_pairs(args.out, drawn, args.folds, args.per_fold)
    print(f"wrote {len(drawn)} pairs ({args.folds} folds x {args.per_fold} same + different) to {args.out}")


def _bin(args: argparse.Namespace) -> None:
    from facedist.evaluation.bins import write_bin_from_pairs

    align_size = args.size if args.align else 0
    written, dropped = write_bin_from_pairs(args.pairs, args.images, args.out, align_size, args.skip_missing)
    for line in dropped:
        print(f"facedist-shards bin: dropped {line}", file=sys.stderr)
    print(f"wrote {written} pairs to {args.out}" + (f" ({len(dropped)} dropped, listed above)" if dropped else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `facedist-shards` console script."""
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "align", False):
            require_aligner()
        if args.command == "synth":
            from facedist.data.synth import write_synthetic_tree

            count = write_synthetic_tree(
                args.out, args.identities, args.images_per_identity, args.size, args.seed, args.format, args.workers
            )
            print(f"wrote {count} images of {args.identities} identities to {args.out}")
        elif args.command == "build":
            options = BuildOptions(
                size=args.size,
                format=args.format,
                quality=args.quality,
                max_samples=args.max_samples,
                max_bytes=args.max_bytes,
                val_identities=args.val_identities,
                test_identities=args.test_identities,
                min_images=args.min_images,
                min_size=args.min_size,
                seed=args.seed,
                align=args.align,
            )
            build(args.src, args.out, options, workers=args.workers, progress=not args.quiet)
        elif args.command == "verify":
            problems = verify(args.out, workers=args.workers, progress=not args.quiet)
            for problem in problems[:50]:
                print(f"facedist-shards verify: {problem}", file=sys.stderr)
            if problems:
                print(f"facedist-shards verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
                return 1
            print(f"{args.out}: OK")
        elif args.command == "pairs":
            _pairs(args)
        elif args.command == "bin":
            _bin(args)
        else:
            summary, damaged = info(args.out)
            print(summary)
            if damaged:  # as verify: a folder a training cannot open is not a success
                return 1
    except (ShardError, ValueError, AlignerMissingError) as error:
        print(f"facedist-shards {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
