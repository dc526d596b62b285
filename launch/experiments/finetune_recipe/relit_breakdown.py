"""Where a relit-ORL test fails: the genuine pairs of one ORL photo under two lights, and those of two photos.

    python launch/experiments/finetune_recipe/relit_breakdown.py E.npz   # facedist-embed output, relit test set

Relit ORL names its images sNN/PP_V.png (relight_orl.py, next to this script: photo PP under light V). A genuine
pair of the same photo differs only in lighting, as every pair of a person in a set photographed under many
lights; a pair of two photos also differs in pose, expression and glasses. Each group of genuine pairs is scored
against all impostor pairs: ROC AUC, TAR at the threshold where FAR = 1e-2 (sklearn's ROC). One JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from facedist.evaluation.protocol import read_embeddings


def photo_of(path: str) -> str:
    """'.../s07/03_5.png' -> 's07/03' (identity and ORL photo)."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem.split('_')[0]}"


def breakdown(embeddings: np.ndarray, identities, paths, far: float = 1e-2) -> dict:
    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    identities, photos = np.asarray(identities), np.asarray([photo_of(p) for p in paths])
    first, second = np.triu_indices(len(vectors), 1)
    scores = np.einsum("ij,ij->i", vectors[first], vectors[second])
    genuine = identities[first] == identities[second]
    same_photo = photos[first] == photos[second]
    impostor = scores[~genuine]
    result = {}
    for name, group in (("same_photo", genuine & same_photo), ("other_photo", genuine & ~same_photo)):
        if not group.any():
            raise ValueError(f"no genuine pairs of {name.replace('_', ' ')}: not a relit-ORL folder's embeddings?")
        labels = np.r_[np.ones(group.sum()), np.zeros(len(impostor))]
        values = np.r_[scores[group], impostor]
        false_accepts, true_accepts, _ = roc_curve(labels, values)
        result[name] = {
            "auc": float(roc_auc_score(labels, values)),
            f"tar@far={far:.0e}": float(np.interp(far, false_accepts, true_accepts)),
            "pairs": int(group.sum()),
        }
    result["impostor_pairs"] = int(len(impostor))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("embeddings", help="facedist-embed output (.npz or .parquet) of a relit-ORL folder")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(breakdown(*read_embeddings(args.embeddings))))
    except ValueError as err:
        raise SystemExit(f"{args.embeddings}: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
