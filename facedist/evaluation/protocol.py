"""The fine-tuning recipe's test protocol on a folder's embeddings (a facedist-embed .npz or .parquet).

    python -m facedist.evaluation.protocol E.npz [--gallery 5] [--pairs PAIRS.txt --images DIR] [--out metrics.json]

Verification over all pairs of the images (ROC AUC, TAR@FAR, EER: `metrics.verification_metrics`), and
closed-set rank-1 with each identity's first `gallery` images by file name averaged into one template,
the rest probes (`identification.identification_metrics`). With `--pairs`, also the k-fold accuracy of an
LFW-style pairs file over the same embeddings (the file's images in DIR, found as `facedist-eval --pairs` finds
them; pairs with an image that has no embedding, e.g. no face found, are dropped and counted): the numbers
`facedist-eval --pairs` gives, without embedding the photos a second time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from facedist.data.pairs import PairsError, pair_images
from facedist.evaluation.identification import identification_metrics
from facedist.evaluation.metrics import kfold_accuracy, pair_scores, verification_metrics


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [N, D], identity [N], path [N]) from facedist-embed's .npz or .parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        return vectors, np.asarray(table.column("identity").to_pylist()), np.asarray(table.column("path").to_pylist())
    with np.load(path, allow_pickle=False) as data:
        return data["embeddings"], data["identity"], data["path"]


def score(embeddings: np.ndarray, identities, paths, gallery: int = 5) -> dict:
    """{"auc", "eer", "tar@far=1e-2", "tar@far=1e-3", "rank1", "images", "identities", ...}."""
    identities, paths = np.asarray(identities), np.asarray(paths)
    names = sorted(set(identities.tolist()))
    if len(names) < 2:
        raise ValueError(f"the protocol needs >= 2 identities, got {len(names)}")
    # identities together, each one's images by file name: the identity's first `gallery` are enrolled
    order = np.lexsort(([Path(p).name for p in paths], identities))
    labels = np.searchsorted(np.asarray(names), identities[order])
    vectors = np.asarray(embeddings, dtype=np.float32)[order]
    verification = verification_metrics(vectors, labels)
    identification = identification_metrics(vectors, labels, gallery_per_identity=gallery)
    return {
        "auc": verification["auc"],
        "eer": verification["eer"],
        "tar@far=1e-2": verification["tar_at_far"]["1e-02"],
        "tar@far=1e-3": verification["tar_at_far"]["1e-03"],
        "rank1": identification["cmc"]["rank1"] if identification["cmc"] else None,
        "images": len(vectors),
        "identities": len(names),
        "probes": identification["num_probes"],
    }


def pairs_accuracy(paths, embeddings: np.ndarray, pairs_file: str | Path, images: str | Path, folds: int = 10) -> dict:
    """{"pairs_accuracy", "pairs_accuracy_std", "pairs", "pairs_dropped"}: k-fold accuracy (the file's own folds,
    in its order) of the pairs whose both images are among `paths` (rows of `embeddings`)."""
    row_of = {os.path.realpath(p): row for row, p in enumerate(paths)}
    files, _, index_a, index_b, same = pair_images(pairs_file, images)
    rows = np.array([row_of.get(os.path.realpath(f), -1) for f in files])
    a, b = rows[index_a], rows[index_b]
    kept = (a >= 0) & (b >= 0)
    vectors = np.asarray(embeddings, dtype=np.float32)
    accuracy = kfold_accuracy(pair_scores(vectors, a[kept], b[kept]), same[kept], folds)
    return {
        "pairs_accuracy": accuracy["mean"],
        "pairs_accuracy_std": accuracy["std"],
        "pairs": int(kept.sum()),
        "pairs_dropped": int((~kept).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("embeddings", help="facedist-embed output (.npz or .parquet)")
    parser.add_argument("--gallery", type=int, default=5, help="images per identity averaged into its template")
    parser.add_argument("--pairs", help="LFW-style pairs file over the embedded images: add its k-fold accuracy")
    parser.add_argument("--images", help="the image folder the pairs file names (with --pairs)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if bool(args.pairs) != bool(args.images):
        parser.error("--pairs and --images go together")
    vectors, identities, paths = read_embeddings(args.embeddings)
    metrics = score(vectors, identities, paths, args.gallery)
    if args.pairs:
        try:
            metrics.update(pairs_accuracy(paths, vectors, args.pairs, args.images))
        except PairsError as err:
            parser.exit(2, f"facedist protocol: {err}\n")
    result = json.dumps(metrics)
    if args.out:
        Path(args.out).write_text(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
