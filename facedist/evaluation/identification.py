"""1:N identification: who is this among the enrolled people?

Enrolment: per identity the first `gallery_per_identity` images (in the given order) form its template
(the normalised mean of their normalised embeddings); the identity's other images are probes (searches).
Scores are the exact cosine scores of `metrics` (same bits on any device or chunking).

- Closed set (every identity enrolled): the rank of a probe's own identity is 1 + the number of other
  templates scoring >= its own (ties count against it); CMC rank-r = fraction of probes with rank <= r.
- Open set: a seeded `distractor_fraction` of the identities is held out of the gallery; all their images
  are non-mated searches, the probes of the enrolled identities are mated searches. At threshold t (a
  candidate is returned when its score >= t), FPIR = fraction of non-mated searches whose top score >= t,
  FNIR = fraction of mated searches whose own identity is not the unique top candidate with score >= t.
  FNIR at FPIR=f uses the step rule of TAR@FAR (FNIR = 1 - TAR with mated hits as genuine and non-mated
  top scores as impostors), reported only when f x (non-mated searches) >= 10, else None.
Memory: probes are scored in chunks against all templates, ~CHUNK_ELEMENTS scores (x ~17 bytes) at a time.
Across ranks (split_across_ranks=True, every rank holding all embeddings): each rank searches a contiguous
share of the probes and the per-probe results are gathered in order, so the metrics equal one process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from facedist import distributed
from facedist.evaluation.metrics import (
    check_stop,
    chunk_rows,
    cosine_scores,
    count_scores,
    dense_labels,
    quantise,
    rates_at_far,
)

RANKS = (1, 5)
FPIRS = (1e-1, 1e-2, 1e-3)


def enrolment(labels: torch.Tensor, gallery_per_identity: int) -> torch.Tensor:
    """Boolean mask of the gallery images: the first `gallery_per_identity` images of each identity."""
    order = torch.argsort(labels, stable=True)
    first_of_class = torch.searchsorted(labels[order], labels[order], right=False)
    position = torch.empty_like(labels)
    position[order] = torch.arange(len(labels), device=labels.device) - first_of_class
    return position < gallery_per_identity


def open_set_split(num_identities: int, distractor_fraction: float, seed: int) -> list[int]:
    """The identities held out of the open-set gallery: a seeded round(fraction x C) of them, at least one
    and leaving at least one enrolled (sorted)."""
    held_out = max(1, min(num_identities - 1, round(distractor_fraction * num_identities)))
    return sorted(np.random.default_rng(seed).permutation(num_identities)[:held_out].tolist())


def _templates(q: torch.Tensor, labels: torch.Tensor, enrolled: torch.Tensor, identities: torch.Tensor):
    """One quantised template per identity in `identities` (mean of its enrolled normalised embeddings)."""
    column = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64, device=q.device)
    column[identities] = torch.arange(len(identities), device=q.device)
    members = enrolled & (column[labels] >= 0)
    sums = torch.zeros(len(identities), q.shape[1], dtype=torch.float64, device=q.device)
    sums.index_add_(0, column[labels[members]], q[members])
    return quantise(sums), column


def _search(
    q_probes: torch.Tensor,
    templates: torch.Tensor,
    own_column: torch.Tensor,
    chunk_size: int | None,
    split_across_ranks: bool = False,
    should_stop: Callable[[], bool] | None = None,
):
    """Per probe: top score, and the rank of its own template (0 when it has none in the gallery)."""
    world, me = (distributed.world_size(), distributed.rank()) if split_across_ranks else (1, 0)
    shares = np.array_split(np.arange(len(q_probes)), world)
    rows = chunk_rows(len(templates), chunk_size)
    steps = max(math.ceil(len(share) / rows) for share in shares)  # the same on every rank: stop checks line up
    q_probes, own_column = q_probes[shares[me]], own_column[shares[me]]
    top = [torch.empty(0, dtype=torch.float64, device=q_probes.device)]
    rank = [torch.empty(0, dtype=torch.int64, device=q_probes.device)]
    for start in range(0, steps * rows, rows):
        if start < len(q_probes):
            scores = cosine_scores(q_probes[start : start + rows], templates)
            own = own_column[start : start + rows]
            own_score = scores.gather(1, own.clamp(min=0)[:, None])
            top.append(scores.max(1).values)
            rank.append(torch.where(own >= 0, (scores >= own_score).sum(1), 0))
        check_stop(should_stop)
    top, rank = torch.cat(top), torch.cat(rank)
    if split_across_ranks:
        top, rank = distributed.gather_rows(top), distributed.gather_rows(rank)
    return top.cpu().numpy(), rank.cpu().numpy()


def identification_metrics(
    embeddings,
    labels,
    gallery_per_identity: int = 1,
    ranks=RANKS,
    fpirs=FPIRS,
    distractor_fraction: float = 0.5,
    seed: int = 0,
    chunk_size: int | None = None,
    split_across_ranks: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """{"cmc": {"rank1", "rank5"}, "fnir_at_fpir": {far_key: FNIR or None}, "thresholds_at_fpir", and the
    counts behind them}. CMC is None without probes; open-set values are None with fewer than 2 identities.
    split_across_ranks, should_stop: as in metrics.verification_metrics (module docstring)."""
    split = {"split_across_ranks": split_across_ranks, "should_stop": should_stop}
    if gallery_per_identity < 1:
        raise ValueError(f"gallery_per_identity must be >= 1, got {gallery_per_identity}")
    if not 0.0 < distractor_fraction < 1.0:
        raise ValueError(f"distractor_fraction must be in (0, 1), got {distractor_fraction}")
    q = quantise(embeddings)
    labels = dense_labels(labels, len(q), q.device)
    enrolled = enrolment(labels, gallery_per_identity)
    probes = ~enrolled
    num_identities = int(labels.max()) + 1
    result = {"num_gallery_identities": num_identities, "num_probes": int(probes.sum())}

    templates, column = _templates(q, labels, enrolled, torch.arange(num_identities, device=q.device))
    _, rank = _search(q[probes], templates, column[labels[probes]], chunk_size, **split)
    result["cmc"] = {f"rank{r}": float(np.mean(rank <= r)) for r in ranks} if len(rank) else None

    if num_identities < 2:
        result.update(fnir_at_fpir=None, thresholds_at_fpir=None, num_mated_searches=0, num_nonmated_searches=0)
        return result
    distractor = torch.zeros(num_identities, dtype=torch.bool, device=q.device)
    distractor[open_set_split(num_identities, distractor_fraction, seed)] = True
    templates, column = _templates(q, labels, enrolled, torch.nonzero(~distractor)[:, 0])
    mated = probes & ~distractor[labels]
    nonmated = distractor[labels]
    mated_top, mated_rank = _search(q[mated], templates, column[labels[mated]], chunk_size, **split)
    nonmated_top, _ = _search(q[nonmated], templates, column[labels[nonmated]], chunk_size, **split)
    result.update(num_mated_searches=len(mated_top), num_nonmated_searches=len(nonmated_top))
    if not len(mated_top):
        result.update(fnir_at_fpir=None, thresholds_at_fpir=None)
        return result
    hits = np.where(mated_rank == 1, mated_top, -math.inf)  # a miss is never a correct return
    tpir, thresholds = rates_at_far(count_scores(hits, nonmated_top), fpirs)
    result["fnir_at_fpir"] = {k: None if v is None else 1.0 - v for k, v in tpir.items()}
    result["thresholds_at_fpir"] = thresholds
    return result
