"""How much of a run's error is its own: the test protocol on several runs' embeddings of the same photos, each run
alone and all together (each run's embeddings L2-normalised and concatenated, so a pair's score is the mean of the
runs' cosine similarities). If an ensemble of two seeds scores well above either seed, the runs' errors are
largely independent, and what varies from run to run (the new embedding layer's start, the batches) costs more
than what every run shares.

    python launch/experiments/wild_recipe/ensemble.py RUN1/test.npz RUN2/test.npz [...]

Prints one JSON line a run, then one for the ensemble (facedist.evaluation.protocol's figures: all-pairs AUC,
TAR@FAR, rank-1). The runs must have embedded the same photos (facedist-embed of the same folder).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from facedist.evaluation.protocol import read_embeddings, score


def ensemble(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The runs' L2-normalised embeddings side by side, scaled so that a dot product is their mean cosine."""
    _, identities, paths = runs[0]
    for _, other_identities, other_paths in runs[1:]:
        if not (np.array_equal(other_paths, paths) and np.array_equal(other_identities, identities)):
            raise ValueError("the runs embedded different photos (or in a different order)")
    unit = [vectors / np.linalg.norm(vectors, axis=1, keepdims=True) for vectors, _, _ in runs]
    return np.concatenate(unit, axis=1) / np.sqrt(len(unit))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: ensemble.py RUN1/test.npz RUN2/test.npz [...]", file=sys.stderr)
        return 2
    try:
        runs = [read_embeddings(path) for path in argv]
        together = ensemble(runs)
    except (OSError, KeyError, ValueError) as error:  # a missing or foreign file, or other photos: one line
        print(f"ensemble.py: {error}", file=sys.stderr)
        return 2
    for path, (vectors, identities, paths) in zip(argv, runs):
        print(json.dumps({"run": path, **score(vectors, identities, paths)}))
    print(json.dumps({"run": "ensemble", **score(together, runs[0][1], runs[0][2])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
