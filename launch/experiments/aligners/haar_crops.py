"""Haar-aligned crops of an identity folder, for training and testing a recipe on the aligner facedist had before
YuNet (`trained.sh`, this folder's README): every photo of SRC/ID/ aligned by
`facedist.benchmarks.align.HaarAligner` at 112 px and written to OUT/ID/ under its own name (JPEG, quality 95);
photos without a Haar face are left out and listed in OUT.missed.json. The YuNet side of the comparison aligns
the same photos inside `facedist-shards build --align` and `facedist-embed --align`.

    python launch/experiments/aligners/haar_crops.py SRC OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from facedist.align import NoFaceError
from facedist.benchmarks.align import HaarAligner
from facedist.inference import list_images, load_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="identity folders of raw photos")
    parser.add_argument("out", type=Path, help="where the crops go (OUT/ID/NAME)")
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()
    aligner = HaarAligner(args.size)
    paths, _ = list_images(args.src)
    missed = []
    for path in tqdm(paths, desc="haar", mininterval=10):
        relative = path.relative_to(args.src)
        try:
            crop = aligner.align(load_image(path))[0]
        except NoFaceError:
            missed.append(str(relative))
            continue
        (args.out / relative.parent).mkdir(parents=True, exist_ok=True)
        crop.save(args.out / relative.with_suffix(".jpg"), quality=95)
    args.out.with_suffix(".missed.json").write_text(json.dumps(missed, indent=1))
    print(f"{args.src}: {len(paths) - len(missed)} of {len(paths)} photos with a Haar face -> {args.out}")


if __name__ == "__main__":
    main()
