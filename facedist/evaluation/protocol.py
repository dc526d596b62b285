"""The fine-tuning recipe's test protocol on a folder's embeddings (a facedist-embed .npz or .parquet).

    python -m facedist.evaluation.protocol E.npz [--gallery 5] [--out metrics.json]

Verification over all pairs of the images (ROC AUC, TAR@FAR, EER: `metrics.verification_metrics`), and
closed-set rank-1 with each identity's first `gallery` images by file name averaged into one template,
the rest probes (`identification.identification_metrics`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from facedist.evaluation.identification import identification_metrics
from facedist.evaluation.metrics import verification_metrics


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("embeddings", help="facedist-embed output (.npz or .parquet)")
    parser.add_argument("--gallery", type=int, default=5, help="images per identity averaged into its template")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    vectors, identities, paths = read_embeddings(args.embeddings)
    result = json.dumps(score(vectors, identities, paths, args.gallery))
    if args.out:
        Path(args.out).write_text(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
