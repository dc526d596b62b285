"""Pair losses over the global batch (masks, chunked anchors) and the combined training objective.

The triplet (all triplets, or PML's semihard / hard mining), contrastive and multi-similarity losses of
pytorch-metric-learning on cosine similarity, written again because PML's versions cannot run in a GPU
step at scale: they select pairs and triplets with `nonzero`/boolean indexing (host reads) and the
triplet loss builds an N x N x N mask (N = 1,024: 1 GB). Here each rank takes the anchors of its own
rows against the whole gathered batch, in chunks of anchors, so memory per rank is O(local rows x N):

- triplet: for anchor a and positive p, the negatives n that count are those whose similarity lies in
  an interval set by s_ap (all: s_an > s_ap - margin; semihard: s_ap - margin < s_an < s_ap; hard: s_an >=
  s_ap). With each anchor's negative similarities sorted, `searchsorted` finds the interval's ends and a
  prefix sum gives sum(s_an - s_ap + margin) over it: O(N log N) per anchor, no N x N per anchor.
- reductions as in PML: mean over non-zero terms (triplet; contrastive, positive and negative parts
  separately), mean over all anchors (multi-similarity). The partial sums and counts of all ranks are
  added by one all-reduce whose backward is the identity, and the gathered rows' backward (a
  reduce-scatter) hands each rank the gradient of its own rows: loss and gradients equal the
  single-process loss of the same global batch (tests/test_losses.py checks them against PML).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facedist import distributed
from facedist.config import LossConfig

CHUNK_ELEMENTS = 1 << 22  # anchors per chunk x N similarities: bounds the temporaries of one chunk
MS_ALPHA, MS_BETA, MS_BASE = 2.0, 50.0, 0.5  # PML's MultiSimilarityLoss defaults
CONTRASTIVE_POS_MARGIN = 1.0  # positives pulled to cosine 1


def _triplet_terms(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float, miner: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the counted triplets' s_an - s_ap + margin, their number) for the anchors of `sim` [c, N]."""
    keys, order = torch.where(neg, sim, -torch.inf).sort(dim=1)  # non-negatives first, never inside an interval
    values = torch.where(neg.gather(1, order), sim.gather(1, order), 0.0)
    prefix = F.pad(values.cumsum(1), (1, 0))  # prefix[:, k] = sum of the k smallest
    ap = sim.detach()
    lo = torch.searchsorted(keys, (ap - margin).contiguous(), right=True)  # first s_an > s_ap - margin
    if miner == "hard":
        lo = torch.maximum(lo, torch.searchsorted(keys, ap.contiguous()))  # first s_an >= s_ap
    hi = torch.full_like(lo, sim.shape[1])
    if miner == "semihard":
        hi = torch.searchsorted(keys, ap.contiguous())  # past the last s_an < s_ap
    count = torch.where(pos, (hi - lo).clamp(min=0), 0)
    total = prefix.gather(1, torch.maximum(hi, lo)) - prefix.gather(1, lo) - count * (sim - margin)
    return torch.where(pos, total, 0.0).sum(), count.sum()


def _contrastive_terms(sim, pos, neg, margin: float) -> list[torch.Tensor]:
    pos_loss = torch.where(pos, F.relu(CONTRASTIVE_POS_MARGIN - sim), 0.0)
    neg_loss = torch.where(neg, F.relu(sim - margin), 0.0)
    return [pos_loss.sum(), (pos_loss > 0).sum(), neg_loss.sum(), (neg_loss > 0).sum()]


def _masked_log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + sum over the mask of exp(values)), per row (0 for an empty mask)."""
    return torch.logsumexp(F.pad(torch.where(mask, values, -torch.inf), (0, 1)), dim=1)


def _multi_similarity_terms(sim, pos, neg) -> torch.Tensor:
    pos_loss = _masked_log1p_sum_exp(-MS_ALPHA * (sim - MS_BASE), pos) / MS_ALPHA
    neg_loss = _masked_log1p_sum_exp(MS_BETA * (sim - MS_BASE), neg) / MS_BETA
    return (pos_loss + neg_loss).sum()


class PairLoss(nn.Module):
    """`forward(x, y, own)`: loss of the global batch x [N, D] (normalised, fp32), labels y [N], from the
    anchors `own` (this rank's rows); returns (loss, value), the same global loss on every rank."""

    def __init__(self, cfg: LossConfig, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        self.kind, self.margin, self.miner = cfg.pair, cfg.pair_margin, cfg.miner
        self.chunk_elements = chunk_elements

    def forward(self, x: torch.Tensor, y: torch.Tensor, own: slice) -> tuple[torch.Tensor, torch.Tensor]:
        count = x.shape[0]
        chunk = max(1, self.chunk_elements // count)
        columns = torch.arange(count, device=x.device)
        parts = []
        for start in range(own.start, own.stop, chunk):
            anchors = slice(start, min(start + chunk, own.stop))
            sim = x[anchors] @ x.T
            same = y[anchors, None] == y[None, :]
            pos = same & (columns[None, :] != columns[anchors, None])
            parts.append(self._terms(sim, pos, ~same))
        stats = distributed.SumOverRanks.apply(
            torch.stack([torch.stack([t.to(x.dtype) for t in p]) for p in parts]).sum(0)
            if parts
            else x.new_zeros(self._num_stats)
        )
        loss = self._reduce(stats, count)
        return loss, loss.detach()

    @property
    def _num_stats(self) -> int:
        return {"triplet": 2, "contrastive": 4, "multi_similarity": 1}[self.kind]

    def _terms(self, sim, pos, neg) -> list[torch.Tensor]:
        if self.kind == "triplet":
            return list(_triplet_terms(sim, pos, neg, self.margin, self.miner))
        if self.kind == "contrastive":
            return _contrastive_terms(sim, pos, neg, self.margin)
        return [_multi_similarity_terms(sim, pos, neg)]

    def _reduce(self, stats: torch.Tensor, count: int) -> torch.Tensor:
        if self.kind == "triplet":
            return stats[0] / stats[1].clamp(min=1)
        if self.kind == "contrastive":
            return stats[0] / stats[1].clamp(min=1) + stats[2] / stats[3].clamp(min=1)
        return stats[0] / count


class Objective(nn.Module):
    """pair_weight * pair loss + head_weight * margin-head loss (+ AdaRand), both over the global batch.

    The local embeddings are gathered once (fixed size: every rank holds P x M rows) for the pair loss,
    the head (both on the gathered rows normalised) and AdaRand (on them as they are, detached); the
    gather's backward hands each rank W x its rows' gradient, which DDP's averaging divides back.
    Returns (loss to backward, the global values to log: device tensors).
    """

    def __init__(self, cfg: LossConfig, head: nn.Module | None = None, adarand: nn.Module | None = None):
        super().__init__()
        self.pair = PairLoss(cfg) if cfg.pair != "none" else None
        self.head, self.adarand = head, adarand
        self.pair_weight, self.head_weight = cfg.pair_weight, cfg.head_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        total, logged = embeddings.new_zeros((), dtype=torch.float32), {}
        rows, y, own = distributed.gather_step_batch(embeddings.float(), labels.long(), float(distributed.world_size()))
        x = F.normalize(rows, dim=1)
        if self.pair is not None:
            loss, value = self.pair(x, y, own)
            total = total + self.pair_weight * loss
            logged["pair_loss"] = value
        if self.head is not None:
            loss, value = self.head.global_loss(x, y, step)
            total = total + self.head_weight * loss
            logged["head_loss"] = value
        if self.adarand is not None:
            loss, value = self.adarand.global_loss(embeddings, rows.detach(), y, own, step)
            total = total + loss
            logged["adarand_loss"] = value
        logged["loss"] = sum(
            w * logged[k]
            for k, w in (("pair_loss", self.pair_weight), ("head_loss", self.head_weight), ("adarand_loss", 1.0))
            if k in logged
        )
        return total, logged
