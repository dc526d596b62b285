"""The trained comparison's scores on the photos both aligners found (`trained.sh`, this folder's README): each
run's test embeddings (facedist-embed's .npz of YuNet-aligned photos, and of Haar crops) kept to the photos, by
identity and file name, that are in both, and scored by `facedist.evaluation.protocol.score`. One JSON line per
run, with how many of its photos were kept.

    python launch/experiments/aligners/common_photos.py YUNET/test.npz HAAR/test.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from facedist.evaluation.protocol import read_embeddings, score


def photo_keys(identities, paths) -> list[tuple[str, str]]:
    """(identity, file name without extension): Haar crops are written as JPEG under the photo's own stem."""
    return [(str(identity), Path(path).stem) for identity, path in zip(identities, paths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("embeddings", nargs="+", help="facedist-embed .npz files of the same photos, aligned each way")
    args = parser.parse_args()
    runs = [read_embeddings(path) for path in args.embeddings]
    common = set.intersection(*(set(photo_keys(identities, paths)) for _, identities, paths in runs))
    for path, (vectors, identities, paths) in zip(args.embeddings, runs):
        kept = np.array([key in common for key in photo_keys(identities, paths)])
        scores = score(vectors[kept], identities[kept], paths[kept])
        print(json.dumps({"run": path, "photos": len(kept), "common": int(kept.sum()), **scores}))


if __name__ == "__main__":
    main()
