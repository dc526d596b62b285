"""1:1 verification: exact metrics over all genuine and all impostor pairs in bounded memory, and
best-threshold accuracy / average precision on balanced pair lists.

Scores. Embeddings are L2-normalised (in float64) and quantised to integers q = round(e * 2^24); a score is
the integer dot product q_a . q_b computed by a float64 matrix product, times 2^-48. By Cauchy-Schwarz every
partial sum is an integer of magnitude <= |q_a| |q_b| < 2^53, so each score is computed exactly: the same
bits on CPU or GPU, for any chunking, blocking or summation order. Ties are real ties and the chunked
computation equals the all-in-memory one exactly. (Quantisation moves a score by < 2e-6 for D <= 512.)

All pairs. Genuine pairs (same identity, sum of n_c(n_c-1)/2) are few: their scores are kept, sorted, as
unique values u_0 < u_1 < ... with multiplicities. Impostor pairs are never stored: the upper triangle of
the N x N score matrix is scored in row chunks, each score is located among the u with `searchsorted`, and
two exact counts per u are accumulated with `bincount`: pairs strictly between u_{m-1} and u_m, and pairs
equal to u_m (the genuine pairs themselves are then subtracted). Peak memory of that pass is about
33 bytes x chunk_size x N on the device holding the embeddings (chunk_size rows; by default chunk_size =
2^24 / N, ~0.5 GiB), plus the genuine scores (16 bytes each) and the quantised embeddings (8 N D bytes).

Across ranks (split_across_ranks=True, every rank holding all N embeddings): the triangle's rows are split
into W contiguous blocks of about N(N-1)/2W pairs each (`triangle_share`: row i holds N-1-i pairs, so equal
row counts would leave rank 0 most of the work), each rank bins its block on its own device and the bin
counts and histograms (integers) are all-reduced: the same counts, hence the same metrics, for any W.
`should_stop`, when given, is asked by every rank after each chunk (a collective); True abandons the
evaluation (EvaluationAbandoned on every rank).

From the counts, exactly:
- ROC AUC = P(genuine > impostor) + 0.5 P(genuine = impostor), sklearn's `roc_auc_score` with ties.
- A pair is accepted when score >= t. TAR only changes at genuine scores, so every ROC corner is at
  t = u_m. TAR@FAR=f (step rule, no interpolation): the largest TAR over thresholds that accept at most
  floor(f x I) of the I impostor pairs; the reported threshold is that u_m, the highest threshold with that
  TAR (so FAR <= f holds on this data). Reported only when f x I >= 10, else None ("not resolvable": too few
  impostor pairs to measure f); 0.0 with threshold None when no genuine score qualifies.
- EER: where the ROC polyline (all thresholds; ties as diagonal segments, as sklearn's `roc_curve` with
  drop_intermediate=False) crosses FAR = 1 - TAR, linearly interpolated on the segment crossing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from facedist import distributed

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
MIN_IMPOSTORS_AT_FAR = 10  # a FAR is measured only when it allows at least this many impostor pairs
QUANTISATION_BITS = 24  # q = round(e * 2^24): |q_a . q_b| < 2^53, exact in float64
SCORE_SCALE = 2.0 ** (-2 * QUANTISATION_BITS)
CHUNK_ELEMENTS = 2**24  # default chunk: this many scores (~33 bytes each at peak)
_FAR_SLACK = 1e-12  # f x I is computed in floating point: 1e-2 x 1000 must allow 10 impostors


class EvaluationAbandoned(Exception):
    """`should_stop` answered True (a stop signal): the evaluation was given up on every rank."""


def far_key(far: float) -> str:
    """1e-2 -> "1e-02", the key of tar_at_far and thresholds_at_far."""
    return f"{far:.0e}"


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def quantise(embeddings) -> torch.Tensor:
    """L2-normalised, integer-valued float64 embeddings (on the input's device); see the module docstring."""
    emb = _as_tensor(embeddings)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {tuple(emb.shape)}")
    emb = emb.to(torch.float64)
    finite = torch.isfinite(emb).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"embeddings row {int((~finite).nonzero()[0])} contains NaN or inf")
    return torch.round(torch.nn.functional.normalize(emb, dim=1) * 2.0**QUANTISATION_BITS)


def cosine_scores(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Exact scores of every row of `qa` with every row of `qb` (both from `quantise`)."""
    return (qa @ qb.T) * SCORE_SCALE


def pair_scores(embeddings, index_a, index_b) -> np.ndarray:
    """Exact scores of the listed pairs (embeddings[index_a[k]], embeddings[index_b[k]])."""
    q = quantise(embeddings)
    a = _as_tensor(index_a).long().to(q.device)
    b = _as_tensor(index_b).long().to(q.device)
    return ((q[a] * q[b]).sum(1) * SCORE_SCALE).cpu().numpy()


def _triangle_block(q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the strict upper triangle of the integer score matrix (scores / SCORE_SCALE,
    unscaled in the hot loop): [rows, start:] with j <= i set to +inf."""
    block = q[start:stop] @ q[start:].T
    below_diagonal = torch.ones(stop - start, stop - start, dtype=torch.bool, device=q.device).tril()
    block[:, : stop - start].masked_fill_(below_diagonal, math.inf)
    return block


def _triangle_blocks(q: torch.Tensor, chunk_size: int):
    """The whole strict upper triangle, chunk_size rows at a time."""
    for start in range(0, len(q), chunk_size):
        yield _triangle_block(q, start, min(start + chunk_size, len(q)))


def triangle_share(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of the strict upper triangle of an n x n matrix that `rank` scores: contiguous
    blocks of about n(n-1)/2 / world_size pairs each (row i holds n-1-i pairs)."""
    pairs_before = np.concatenate([[0], np.cumsum(np.arange(n - 1, -1, -1, dtype=np.int64))])  # rows < i
    bounds = np.searchsorted(pairs_before, np.arange(world_size + 1) * pairs_before[-1] // world_size)
    bounds[-1] = n
    return int(bounds[rank]), int(bounds[rank + 1])


def _chunk_starts(n: int, chunk_size: int, split_across_ranks: bool) -> tuple[range, int]:
    """This rank's chunk start rows and the most chunks any rank has (every rank steps that many times, so
    collective stop checks line up)."""
    world, rank = (distributed.world_size(), distributed.rank()) if split_across_ranks else (1, 0)
    shares = [triangle_share(n, world, r) for r in range(world)]
    counts = [math.ceil((stop - start) / chunk_size) for start, stop in shares]
    start, stop = shares[rank]
    return range(start, stop, chunk_size), max(counts)


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise EvaluationAbandoned("a stop was requested during the evaluation")


def dense_labels(labels, n: int, device) -> torch.Tensor:
    """Identity labels (ints or names, numpy or torch) as 0..C-1 in sorted order, checked against N."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like the embeddings, got {labels.shape}")
    return torch.as_tensor(np.unique(labels, return_inverse=True)[1].reshape(-1), device=device)


def chunk_rows(n: int, chunk_size: int | None) -> int:
    """Rows per chunk against n columns: chunk_size, or by default CHUNK_ELEMENTS // n."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(n, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


@dataclass
class ScoreCounts:
    """Everything the ROC needs. values: unique genuine scores ascending (float64); genuine: their
    multiplicities; impostor_below / impostor_equal: impostor pairs scoring < / == each value; num_impostor."""

    values: np.ndarray
    genuine: np.ndarray
    impostor_below: np.ndarray
    impostor_equal: np.ndarray
    num_impostor: int


def count_scores(genuine, impostor) -> ScoreCounts:
    """ScoreCounts of explicit score lists (small sets: balanced pairs, identification searches)."""
    genuine = np.sort(np.asarray(genuine, dtype=np.float64))
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    values, multiplicity = np.unique(genuine, return_counts=True)
    below = np.searchsorted(impostor, values, side="left")
    equal = np.searchsorted(impostor, values, side="right") - below
    return ScoreCounts(values, multiplicity, below, equal, len(impostor))


def all_pairs_counts(
    embeddings,
    labels,
    chunk_size: int | None = None,
    histogram_bins: int = 0,
    split_across_ranks: bool = False,
    should_stop: Callable[[], bool] | None = None,
):
    """ScoreCounts over all N(N-1)/2 pairs, chunked (memory bound in the module docstring), and, when
    histogram_bins > 0, (edges, genuine counts, impostor counts) of all scores on [-1, 1] for plotting.
    split_across_ranks / should_stop: see the module docstring (every rank calls it with all embeddings)."""
    q = quantise(embeddings)
    labels = dense_labels(labels, len(q), q.device)
    chunk_size = chunk_rows(len(q), chunk_size)
    order = torch.argsort(labels, stable=True)
    class_sizes = torch.bincount(labels).cpu().tolist()
    genuine, start = [], 0
    for size in class_sizes:
        if size > 1:  # genuine pairs: the upper triangle of each identity's own block
            members = q[order[start : start + size]]
            genuine += [block[torch.isfinite(block)] for block in _triangle_blocks(members, chunk_size)]
        start += size
    if not genuine:
        raise ValueError("verification needs at least one identity with two or more images")
    values, multiplicity = torch.unique(torch.cat(genuine), sorted=True, return_counts=True)
    num_genuine = int(multiplicity.sum())
    num_impostor = len(q) * (len(q) - 1) // 2 - num_genuine
    if num_impostor == 0:
        raise ValueError("verification needs at least two identities")

    # bin 2k: all pairs strictly between values[k-1] and values[k]; bin 2k+1: pairs equal to values[k]
    padded = torch.cat([values, values.new_full((1,), math.nan)])  # the +inf entries land on NaN: never equal
    bins = torch.zeros(2 * len(padded), dtype=torch.int64, device=q.device)
    histogram = torch.zeros(histogram_bins, dtype=torch.float64, device=q.device)
    starts, steps = _chunk_starts(len(q), chunk_size, split_across_ranks)
    for k in range(steps):
        if k < len(starts):
            block = _triangle_block(q, starts[k], min(starts[k] + chunk_size, starts.stop))
            position = torch.searchsorted(values, block)
            equal = padded[position] == block
            bins += torch.bincount(position.mul_(2).add_(equal).view(-1), minlength=len(bins))
            del position, equal
            if histogram_bins:
                histogram += torch.histc(block, histogram_bins, -1 / SCORE_SCALE, 1 / SCORE_SCALE)  # not +inf
            del block
        check_stop(should_stop)
    if split_across_ranks:
        distributed.all_reduce(bins)
        distributed.all_reduce(histogram)
    bins = bins.cpu().numpy()
    multiplicity = multiplicity.cpu().numpy()
    impostor_equal = bins[1:-2:2] - multiplicity
    if (impostor_equal < 0).any():  # impossible with exact scores; guards against an inexact matmul
        raise RuntimeError("all-pairs scores differ from the genuine scores: the float64 matmul is not exact here")
    between = bins[0:-2:2]
    impostor_below = np.cumsum(between) + np.concatenate([[0], np.cumsum(impostor_equal)[:-1]])
    counts = ScoreCounts(values.cpu().numpy() * SCORE_SCALE, multiplicity, impostor_below, impostor_equal, num_impostor)
    if not histogram_bins:
        return counts, None
    genuine_histogram = torch.histc(
        values.repeat_interleave(torch.as_tensor(multiplicity, device=values.device)),
        histogram_bins,
        -1 / SCORE_SCALE,
        1 / SCORE_SCALE,
    )
    edges = np.linspace(-1.0, 1.0, histogram_bins + 1)
    return counts, (edges, genuine_histogram.cpu().numpy(), (histogram - genuine_histogram).cpu().numpy())


def _roc_polyline(c: ScoreCounts):
    """Impostor and genuine pairs accepted at the ROC vertices, from the highest threshold to the lowest:
    (0, 0), then per genuine value u (descending) just above u and at u, then (I, G)."""
    num_genuine = int(c.genuine.sum())
    genuine_at_or_above = num_genuine - np.concatenate([[0], np.cumsum(c.genuine)[:-1]])
    impostor_at_or_above = c.num_impostor - c.impostor_below
    above = np.stack([impostor_at_or_above - c.impostor_equal, genuine_at_or_above - c.genuine], 1)
    at = np.stack([impostor_at_or_above, genuine_at_or_above], 1)
    vertices = np.stack([above, at], 1)[::-1].reshape(-1, 2)
    return np.concatenate([[[0, 0]], vertices, [[c.num_impostor, num_genuine]]]).astype(np.int64)


def _downsample(far: np.ndarray, points: int) -> np.ndarray:
    """Indices of ~points ROC vertices: even in index and even in log FAR (the low-FAR end matters)."""
    even = np.linspace(0, len(far) - 1, points // 2).round().astype(np.int64)
    grid = np.logspace(-9, 0, points // 2)
    logarithmic = np.minimum(np.searchsorted(far, grid), len(far) - 1)
    return np.unique(np.concatenate([even, logarithmic, [0, len(far) - 1]]))


def rates_at_far(c: ScoreCounts, fars=FARS) -> tuple[dict, dict]:
    """TAR and threshold at each FAR by the step rule (module docstring): ({far_key: TAR or None},
    {far_key: threshold or None})."""
    num_genuine, num_impostor = int(c.genuine.sum()), c.num_impostor
    impostor_at_or_above = num_impostor - c.impostor_below
    genuine_at_or_above = num_genuine - np.concatenate([[0], np.cumsum(c.genuine)[:-1]])
    tar_at_far, thresholds_at_far = {}, {}
    for f in fars:
        allowed = f * num_impostor * (1 + _FAR_SLACK)
        key = far_key(f)
        if allowed < MIN_IMPOSTORS_AT_FAR:
            tar_at_far[key] = thresholds_at_far[key] = None
            continue
        ok = impostor_at_or_above <= math.floor(allowed)  # true from some index upwards (counts fall)
        if not ok.any():
            tar_at_far[key], thresholds_at_far[key] = 0.0, None
            continue
        best = int(np.argmax(ok))  # lowest qualifying threshold: the most genuine pairs accepted
        tar_at_far[key] = float(genuine_at_or_above[best] / num_genuine)
        thresholds_at_far[key] = float(c.values[best])
    return tar_at_far, thresholds_at_far


def roc_metrics(c: ScoreCounts, fars=FARS, roc_points: int = 2000) -> dict:
    """auc, eer, tar_at_far, thresholds_at_far, num_genuine, num_impostor and a downsampled ROC (far, tar)."""
    num_genuine, num_impostor = int(c.genuine.sum()), c.num_impostor
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"ROC needs genuine and impostor pairs, got {num_genuine} and {num_impostor}")
    # Mann-Whitney with ties counted half, in exact integers
    wins = int(np.sum(c.genuine.astype(object) * (2 * c.impostor_below + c.impostor_equal).astype(object)))
    auc = wins / (2 * num_genuine * num_impostor)  # int / int: correctly rounded

    vertices = _roc_polyline(c)
    far, tar = vertices[:, 0] / num_impostor, vertices[:, 1] / num_genuine
    # FAR + TAR grows along the polyline from 0 to 2; the EER point is where it equals 1 (FAR = FRR)
    far_plus_tar = far + tar
    end = int(np.argmax(far_plus_tar >= 1.0))
    s0, s1 = far_plus_tar[end - 1], far_plus_tar[end]
    eer = float(far[end - 1] + (1.0 - s0) / (s1 - s0) * (far[end] - far[end - 1]))

    tar_at_far, thresholds_at_far = rates_at_far(c, fars)
    keep = _downsample(far, roc_points)
    return {
        "auc": auc,
        "eer": eer,
        "tar_at_far": tar_at_far,
        "thresholds_at_far": thresholds_at_far,
        "num_genuine": num_genuine,
        "num_impostor": num_impostor,
        "roc": {"far": far[keep].tolist(), "tar": tar[keep].tolist()},
    }


def verification_metrics(
    embeddings,
    labels,
    fars=FARS,
    chunk_size: int | None = None,
    roc_points: int = 2000,
    histogram_bins: int = 0,
    split_across_ranks: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Exact 1:1 verification over all pairs of [N, D] embeddings (torch on any device, or numpy) with
    identity labels [N]: see `roc_metrics` for the keys; with histogram_bins, also "score_histogram"
    {"edges", "genuine", "impostor"} (pair counts). Memory bound, rules and splitting across ranks in the
    module docstring."""
    counts, histogram = all_pairs_counts(
        embeddings, labels, chunk_size, histogram_bins, split_across_ranks, should_stop
    )
    result = roc_metrics(counts, fars, roc_points)
    if histogram is not None:
        result["score_histogram"] = dict(zip(("edges", "genuine", "impostor"), (h.tolist() for h in histogram)))
    return result


def _pair_from_index(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair number p -> (i, j), i < j, in the order (0,1), (0,2), (1,2), (0,3), ...: p = j(j-1)/2 + i."""
    j = np.floor((1 + np.sqrt(1 + 8 * index.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > index  # float sqrt may be one off either way
    j += (j + 1) * j // 2 <= index
    return index - j * (j - 1) // 2, j


def balanced_pairs(labels, pairs_per_side: int = 3000, seed: int = 0):
    """A seeded balanced pair list: min(pairs_per_side, #genuine, #impostor) distinct genuine pairs and as
    many distinct impostor pairs, each drawn uniformly without replacement, in a seeded random order.
    Returns (index_a, index_b, same) like a pairs file."""
    labels = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels)
    per_class = sizes * (sizes - 1) // 2
    num_genuine = int(per_class.sum())
    num_all = len(labels) * (len(labels) - 1) // 2
    n = min(pairs_per_side, num_genuine, num_all - num_genuine)
    if n == 0:
        raise ValueError("balanced pairs need at least one genuine and one impostor pair")
    # genuine: a pair number over all identities -> identity (cumulative counts) -> pair inside it
    chosen = rng.choice(num_genuine, n, replace=False)
    first_pair = np.concatenate([[0], np.cumsum(per_class)])
    identity = np.searchsorted(first_pair, chosen, side="right") - 1
    i, j = _pair_from_index(chosen - first_pair[identity])
    first_member = np.concatenate([[0], np.cumsum(sizes)])[identity]
    genuine = np.stack([order[first_member + i], order[first_member + j]], 1)
    # impostors: distinct pairs of all images, drawn in batches until n are of different identities
    impostor, drawn = np.empty((0, 2), np.int64), 2 * n * num_all // (num_all - num_genuine) + 16
    while len(impostor) < n:
        a, b = _pair_from_index(rng.choice(num_all, min(drawn, num_all), replace=False))
        impostor = np.stack([a, b], 1)[labels[a] != labels[b]]
        drawn *= 2
    pairs = np.concatenate([genuine, impostor[:n]])
    same = np.repeat([True, False], n)
    shuffle = rng.permutation(2 * n)
    return pairs[shuffle, 0], pairs[shuffle, 1], same[shuffle]


def kfold_accuracy(scores, same, folds: int = 10) -> dict:
    """LFW protocol: split the pair list into `folds` consecutive folds (a pairs file's own folds); for each,
    the threshold with the best accuracy on the other folds (over every training score, accept >= t; the
    highest of equally good ones) is applied to it. Returns {"mean", "std", "threshold"} (std over folds;
    threshold: mean of the folds')."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    folds = min(folds, len(scores))
    if folds < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 pairs, got {len(scores)}")
    accuracies, thresholds = [], []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = np.ones(len(scores), dtype=bool)
        train[test] = False
        positives, negatives = same[train].sum(), (~same[train]).sum()
        if positives == 0 or negatives == 0:  # one-sided training folds: accept everything or nothing
            threshold = -math.inf if positives else math.inf
        else:
            fpr, tpr, candidates = roc_curve(same[train], scores[train], drop_intermediate=False)
            correct = np.rint(tpr * positives) + np.rint((1 - fpr) * negatives)  # counts: ties compare exactly
            threshold = candidates[int(np.argmax(correct))]
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
        thresholds.append(threshold)
    return {
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "threshold": float(np.mean(np.clip(thresholds, -1.0, 1.0))),
    }


def pair_list_metrics(scores, same, folds: int = 10) -> dict:
    """Metrics only meaningful on a balanced pair list: k-fold best-threshold accuracy, average precision
    (sklearn), and the precision-recall curve for plotting."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("the pair list needs both same-identity and different-identity pairs")
    precision, recall, _ = precision_recall_curve(same, scores)
    return {
        "accuracy_kfold": kfold_accuracy(scores, same, folds),
        "average_precision": float(average_precision_score(same, scores)),
        "num_pairs": int(len(same)),
        "num_same_pairs": int(same.sum()),
        "pr": {"precision": precision.tolist(), "recall": recall.tolist()},
    }
