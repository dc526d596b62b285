"""AdaRand (Yamaguchi et al., CVPR 2024): adaptive random-feature regularisation for fine-tuning.

Each class c has a Gaussian N(mu_c, diag(sigma_c^2)) in feature space, initialised from the pretrained
backbone's features of that class (`init_from_features`). Every step a random feature z_i is drawn from
the Gaussian of sample i's class and the features are pulled toward it:

    loss = lambda * mean_i ||f_i - z_i||^2 / D          (gradient to the backbone only; z is a sample)

The means then follow the features and keep classes apart, updated by their own optimizer on

    prior = mean over batch classes of (1 - cos(mu_c, momentum * mu_c + (1 - momentum) * batch mean_c))
          + mean over class pairs c != c' of cos(mu_c, mu_c')

(sigma stays at its initial value). The pair term is exact over all C classes at O(C D) cost:
sum_{c != c'} cos = ||sum_c mu_c/||mu_c||||^2 - C.

Sharding and memory: the means and sigmas are split over ranks like the margin head's centres (rank r
owns the same contiguous class block). Per rank: means + sigma + the optimizer's two moments + the
gradient = 5 * (C / W) * D * 4 bytes (C = 1M, D = 512: 10 GB on one rank, 1.25 GB each on 8). Per step,
the features (detached) and labels are all-gathered, the owners of the batch classes draw the random
features (noise keyed by seed and step, so any W draws the same), and an [N, D] all-reduce hands them out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from facedist import distributed
from facedist.distributed import SumOverRanks
from facedist.heads.checkpoint import RowShardedModule
from facedist.heads.sharded_softmax import gather_batch, generator, row_range

NOISE_PURPOSE = 2  # derived_seed(seed, purpose, step): 0 = head init, 1 = class sampling


class AdaRand(RowShardedModule):
    """Class-conditional random-feature regulariser; `forward(features, labels, step)` -> (loss, value).

    The loss combines lambda * MSE (scaled by W for DDP's averaging, like the margin head) and the prior
    objective of this rank's means; value is the global lambda * MSE, identical on every rank.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        lam: float,
        momentum: float = 0.5,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        self.num_rows, self.rank, self.world_size = num_classes, rank, world_size
        self.row_start, self.row_stop = row_range(num_classes, world_size, rank)
        self.lam, self.momentum, self.seed = lam, momentum, seed
        rows = self.row_stop - self.row_start
        self.means = torch.nn.Parameter(torch.zeros(rows, embedding_dim))
        self.register_buffer("std", torch.ones(rows, embedding_dim))

    def own_samples(self, class_offsets) -> range:
        """Indices of the samples of this rank's classes (samples are sorted by class: one contiguous range)."""
        return range(int(class_offsets[self.row_start]), int(class_offsets[self.row_stop]))

    @torch.no_grad()
    def init_from_features(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set mean and std of each own class from (features, labels) batches of the pretrained backbone;
        every label must be one of this rank's classes (see `own_samples`) and each class must appear."""
        rows, dim = self.means.shape
        sums = torch.zeros(rows, dim, dtype=torch.float64, device=self.means.device)
        squares, counts = torch.zeros_like(sums), torch.zeros(rows, dtype=torch.float64, device=sums.device)
        for features, labels in batches:
            local = labels.to(sums.device).long() - self.row_start
            if local.numel() and (local.min() < 0 or local.max() >= rows):
                raise ValueError(
                    f"AdaRand init: labels outside this rank's classes [{self.row_start}, {self.row_stop})"
                )
            features = features.to(sums)
            sums.index_add_(0, local, features)
            squares.index_add_(0, local, features * features)
            counts.index_add_(0, local, torch.ones_like(local, dtype=sums.dtype))
        if (counts == 0).any():
            missing = int(torch.nonzero(counts == 0)[0]) + self.row_start
            raise ValueError(f"AdaRand init: class {missing} has no features")
        mean = sums / counts[:, None]
        self.means.copy_(mean)
        self.std.copy_((squares / counts[:, None] - mean * mean).clamp_min(0).sqrt())

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (any count per rank); the training step gathers once for every loss instead and
        calls `global_loss`."""
        x, y, own = gather_batch(features.detach().float(), labels.long(), 1.0)
        return self.global_loss(features, x, y, own, step)

    def global_loss(
        self, features: torch.Tensor, x: torch.Tensor, y: torch.Tensor, own: slice, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, value): this rank's features (with gradient), the gathered global batch x [N, D] (detached)
        with labels y [N], and this rank's slice of it. Masks select the rows of this rank's classes, so
        nothing waits on the host; two all-reduces."""
        x = x.float()
        count, dim = x.shape
        owned = (y >= self.row_start) & (y < self.row_stop)
        local = (y - self.row_start).clamp(0, self.means.shape[0] - 1)

        # random features of the global batch: drawn by the owners of the classes, summed to everyone
        noise = torch.randn(count, dim, device=x.device, generator=generator(x.device, self.seed, NOISE_PURPOSE, step))
        drawn = torch.where(owned[:, None], self.means.detach()[local] + self.std[local] * noise, 0.0)
        random_features = distributed.all_reduce(drawn, "sum")[own]
        squared_error = (features.float() - random_features).pow(2).mean(1)
        regulariser = self.lam * squared_error.sum() / count

        # the prior: pull each batch class's mean toward its running feature mean; push all class means apart
        counts = torch.zeros(self.means.shape[0], device=x.device).index_add_(0, local, owned.float())
        sums = torch.zeros_like(self.means).index_add_(0, local, torch.where(owned[:, None], x, 0.0))
        target = self.momentum * self.means.detach() + (1 - self.momentum) * sums / counts.clamp_min(1)[:, None]
        distance = torch.where(counts > 0, 1 - F.cosine_similarity(self.means, target, dim=1), 0.0)
        # one all-reduce for the unit means' sum (with its gradient), the batch class count and the logged error
        summed = SumOverRanks.apply(
            torch.cat(
                [
                    F.normalize(self.means, dim=1).sum(0),
                    torch.stack([(counts > 0).sum().float(), squared_error.detach().sum()]),
                ]
            )
        )
        total, num_present, error_sum = summed[:dim], summed[dim], summed[dim + 1]
        intra = distance.sum() / num_present.clamp_min(1)
        classes = self.num_rows
        inter = (total.pow(2).sum() - classes) / (classes * (classes - 1))
        return regulariser * self.world_size + intra + inter, self.lam * error_sum / count
