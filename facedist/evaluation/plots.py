"""Evaluation figures (matplotlib Figure objects on the Agg canvas: no pyplot state, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from facedist.durable import write_atomic


def _figure(width: float = 5.5, height: float = 4.5):
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def roc_figure(roc: dict, tar_at_far: dict, num_impostor: int) -> Figure:
    """TAR against FAR on a log FAR axis (down to one impostor pair), with the reported TAR@FAR points."""
    figure, ax = _figure()
    far, tar = np.asarray(roc["far"]), np.asarray(roc["tar"])
    ax.step(far[far > 0], tar[far > 0], where="post", lw=1.5)
    points = [(float(key), value) for key, value in tar_at_far.items() if value is not None]
    if points:
        ax.plot(*zip(*points), "o", ms=4, color="C3", label="TAR@FAR (reported)")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlim(max(1.0 / num_impostor, 1e-7), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"ROC over all pairs ({num_impostor:,} impostor)")
    ax.grid(True, which="both", alpha=0.3)
    return figure


def pr_figure(pr: dict, average_precision: float, num_pairs: int) -> Figure:
    """Precision against recall on the balanced pair list."""
    figure, ax = _figure()
    ax.step(pr["recall"], pr["precision"], where="post", lw=1.5)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("recall (same-identity pairs accepted)")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall, {num_pairs:,} balanced pairs (AP {average_precision:.4f})")
    ax.grid(True, alpha=0.3)
    return figure


def score_histogram_figure(histogram: dict) -> Figure:
    """Genuine and impostor score distributions over all pairs (fraction per bin, log axis for the tails)."""
    figure, ax = _figure(6.5, 4.0)
    edges = np.asarray(histogram["edges"])
    for name, color in (("genuine", "C2"), ("impostor", "C3")):
        counts = np.asarray(histogram[name], dtype=np.float64)
        ax.stairs(counts / max(counts.sum(), 1.0), edges, color=color, lw=1.5, label=f"{name} ({int(counts.sum()):,})")
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs")
    ax.set_title("score distributions, all pairs")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return figure


def tsne_figure(embeddings: np.ndarray, labels: np.ndarray, max_points: int = 2000, seed: int = 0) -> Figure:
    """2-D t-SNE (sklearn, cosine metric) of up to max_points embeddings, whole identities in a seeded
    random order, one colour per identity (tab20 colours repeat beyond 20)."""
    from sklearn.manifold import TSNE

    identities = np.random.default_rng(seed).permutation(np.unique(labels))
    counts = np.array([(labels == c).sum() for c in identities])
    chosen = identities[: max(1, int(np.searchsorted(np.cumsum(counts), max_points, side="right")))]
    keep = np.isin(labels, chosen)
    points, point_labels = embeddings[keep], labels[keep]
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(
        points
    )
    figure, ax = _figure(6.0, 6.0)
    colour = np.searchsorted(np.sort(chosen), point_labels) % 20
    ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab20", vmin=0, vmax=19, s=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(points):,} embeddings, {len(chosen)} identities")
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write the figure as PNG atomically."""
    path = Path(path)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight"))
    return path
