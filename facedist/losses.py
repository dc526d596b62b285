"""Pair losses from pytorch-metric-learning, gathered across ranks, and the combined training objective.

Pair losses see the whole global batch: PML's DistributedLossWrapper / DistributedMinerWrapper
(efficient=False) all-gather embeddings (other ranks' copies detached) so negatives from every rank count.
The wrapper returns `loss * world_size`, which DDP's gradient averaging divides back: the parameter
gradient equals the single-process gradient of the same global batch. The value to log is `loss / W`.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import distributed as pml_dist
from torch import nn

from facedist import distributed
from facedist.config import LossConfig


def _pair_loss(cfg: LossConfig) -> nn.Module | None:
    cosine = distances.CosineSimilarity()
    if cfg.pair == "triplet":
        return losses.TripletMarginLoss(margin=cfg.pair_margin, distance=cosine)
    if cfg.pair == "contrastive":  # on cosine similarity: positives pulled to 1, negatives pushed below margin
        return losses.ContrastiveLoss(pos_margin=1.0, neg_margin=cfg.pair_margin, distance=cosine)
    if cfg.pair == "multi_similarity":
        return losses.MultiSimilarityLoss(distance=cosine)
    return None


def _miner(cfg: LossConfig) -> nn.Module | None:
    if cfg.miner == "none":
        return None
    return miners.TripletMarginMiner(margin=cfg.pair_margin, type_of_triplets=cfg.miner,
                                     distance=distances.CosineSimilarity())


class PairLoss(nn.Module):
    """A PML pair loss (+ optional miner) over the global batch; `forward` returns (to backward, to log)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.loss, self.miner = _pair_loss(cfg), _miner(cfg)
        self.world_size = distributed.world_size()
        if self.world_size > 1:  # PML's wrappers require an initialised process group
            self.loss = pml_dist.DistributedLossWrapper(self.loss, efficient=False)
            self.miner = self.miner and pml_dist.DistributedMinerWrapper(self.miner, efficient=False)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = embeddings.float()  # similarities and margins in fp32 under autocast
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices)
        return loss, loss.detach() / self.world_size


class Objective(nn.Module):
    """pair_weight * pair loss + head_weight * margin-head loss (+ AdaRand), both over the global batch.

    Returns (loss to backward under DDP averaging, the global loss value to log).
    """

    def __init__(self, cfg: LossConfig, head: nn.Module | None = None, adarand: nn.Module | None = None):
        super().__init__()
        self.pair = PairLoss(cfg) if cfg.pair != "none" else None
        self.head, self.adarand = head, adarand
        self.pair_weight, self.head_weight = cfg.pair_weight, cfg.head_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        total, logged = embeddings.new_zeros((), dtype=torch.float32), {}
        if self.pair is not None:
            loss, value = self.pair(embeddings, labels)
            total = total + self.pair_weight * loss
            logged["pair_loss"] = value
        if self.head is not None:
            loss, value = self.head(embeddings, labels, step)
            total = total + self.head_weight * loss
            logged["head_loss"] = value
        if self.adarand is not None:
            loss, value = self.adarand(embeddings, labels, step)
            total = total + loss
            logged["adarand_loss"] = value
        logged["loss"] = sum(w * logged[k] for k, w in (("pair_loss", self.pair_weight),
                                                          ("head_loss", self.head_weight),
                                                          ("adarand_loss", 1.0)) if k in logged)
        return total, logged
