"""ShardedMarginHead: a margin softmax over C classes whose centres are split across W ranks.

Rank r owns the contiguous class block [r*C//W, (r+1)*C//W) (C need not divide by W). One step:

1. all-gather the local embeddings (normalised, fp32) into the global batch X [N, D]. The gather is
   differentiable: its backward sums every rank's gradient of X (each holds the part that flows through
   its own classes) and hands rank r the rows of its own samples, multiplied by `gather_grad_scale`
   (= W by default, because DDP then averages the backbone's gradients over the W ranks). `forward` takes
   any row counts per rank; the training step gathers once for head and pair loss with fixed-size
   `distributed.gather_step_batch` (its backward a reduce-scatter) and calls `global_loss`;
2. choose the classes of this step: all of them, or with loss.sample_rate < 1 every class of the global
   batch plus random negatives up to ceil(rate * C), a pure function of (seed, step, global labels), so
   every rank and any W pick the same set;
3. local logits s * cos(X, kept local centres) -- the one matmul, which may run in bf16/fp16;
4. the rank owning a sample's class recomputes its target cosine in fp32, applies the margin
   (facedist.heads.margins) and puts s * margin(cos) in place of the target logit (selected by masks,
   not index lists, so nothing waits on the host);
5. cross-entropy with a global softmax: the row max is all-reduced (max), the sum of exponentials and the
   target logits are all-reduced (sum, one [2, N] tensor) with an identity backward, so every rank holds the same global
   mean loss and each rank's backward yields exact gradients for its own centres and its share of X.
Dynamic AdaCos takes its statistics (mean negative exp-sum, median target angle) over all ranks.

Without a process group (or W = 1) it is the plain full softmax. Master weights stay fp32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from facedist import distributed
from facedist.distributed import SumOverRanks
from facedist.heads import margins
from facedist.heads.checkpoint import RowShardedModule

INIT_STD = 0.01  # class centres start as small Gaussians (only their direction matters to the cosine)
_INIT_CHUNK = 8192  # centres are drawn in fixed chunks of rows keyed by the seed: identical for any W


def row_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the contiguous block of rows rank `rank` owns; sizes differ by at most one."""
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def derived_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from integer keys (seed, purpose, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def generator(device: torch.device, *keys: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))


def init_rows(start: int, stop: int, dim: int, seed: int, purpose: int) -> torch.Tensor:
    """Rows [start, stop) of a seeded N(0, INIT_STD^2) [num_rows, dim] matrix, without building the rest."""
    rows = torch.empty(stop - start, dim)
    for chunk in range(start // _INIT_CHUNK, -(-stop // _INIT_CHUNK)):
        block = torch.randn(_INIT_CHUNK, dim, generator=generator(torch.device("cpu"), seed, purpose, chunk))
        lo, hi = max(start, chunk * _INIT_CHUNK), min(stop, (chunk + 1) * _INIT_CHUNK)
        rows[lo - start : hi - start] = block[lo - chunk * _INIT_CHUNK : hi - chunk * _INIT_CHUNK]
    return rows.mul_(INIT_STD)


class GatherRows(torch.autograd.Function):
    """All-gather rows (counts may differ per rank); backward: sum over ranks, own rows, times grad_scale."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, start: int, stop: int, grad_scale: float) -> torch.Tensor:
        ctx.start, ctx.stop, ctx.grad_scale = start, stop, grad_scale
        return distributed.gather_rows(rows.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = distributed.all_reduce(grad.contiguous().clone(), "sum")
        return grad[ctx.start : ctx.stop] * ctx.grad_scale, None, None, None


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, grad_scale: float):
    """(global rows [N, ...], global labels [N], this rank's slice of them) in rank order; any row counts."""
    counts = distributed.gather_rows(torch.tensor([embeddings.shape[0]], device=labels.device))
    start = int(counts[: distributed.rank()].sum())
    own = slice(start, start + embeddings.shape[0])
    if distributed.world_size() == 1:
        return embeddings, labels, own
    return GatherRows.apply(embeddings, own.start, own.stop, grad_scale), distributed.gather_rows(labels), own


def sampled_class_mask(
    labels: torch.Tensor, num_classes: int, sample_rate: float, seed: int, step: int
) -> torch.Tensor:
    """Bool [C]: every class in `labels` plus random others, max(batch classes, ceil(rate * C)) in all,
    chosen on the device without a host read (a fixed-size top-k, then a mask of its first `count`)."""
    device = labels.device
    target = math.ceil(sample_rate * num_classes)
    if target >= num_classes:
        return torch.ones(num_classes, dtype=torch.bool, device=device)
    present = torch.zeros(num_classes, dtype=torch.bool, device=device).index_fill_(0, labels, True)
    scores = torch.rand(num_classes, device=device, generator=generator(device, seed, 1, step))
    scores = torch.where(present, 2.0, scores)  # above any random score: batch classes are always kept
    top = torch.topk(scores, min(num_classes, max(target, labels.numel()))).indices  # descending scores
    count = present.sum().clamp(min=target)
    return torch.zeros_like(present).index_put_((top,), torch.arange(len(top), device=device) < count)


class ShardedMarginHead(RowShardedModule):
    """Margin softmax head over `num_classes` centres, this rank holding its block of rows.

    `forward(embeddings, labels, step)` takes this rank's embeddings [n, D] (any float dtype) and labels
    [n] and returns (loss, loss value): the mean loss over the global batch, identical on every rank,
    whose backward gives exact gradients to the local centres and W x the gradient of the local
    embeddings (undone by DDP's averaging; see `gather_grad_scale`). After a forward, `touched_rows`
    holds the local rows that entered the softmax (None: all), for the row-sparse optimizer.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: margins.Margin,
        scale: float | None,
        adacos_dynamic: bool = False,
        sample_rate: float = 1.0,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        matmul_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if num_classes < max(2, world_size):
            raise ValueError(f"a sharded softmax head needs at least max(2, W={world_size}) classes, got {num_classes}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"loss.sample_rate={sample_rate} must be in (0, 1]")
        self.num_rows, self.embedding_dim, self.rank, self.world_size = num_classes, embedding_dim, rank, world_size
        self.row_start, self.row_stop = row_range(num_classes, world_size, rank)
        self.margin, self.sample_rate, self.seed, self.matmul_dtype = margin, sample_rate, seed, matmul_dtype
        self.adacos_dynamic = adacos_dynamic
        self.gather_grad_scale = float(world_size)  # DDP divides the backbone's gradients by W
        self.weight = torch.nn.Parameter(init_rows(self.row_start, self.row_stop, embedding_dim, seed, purpose=0))
        initial_scale = scale if scale is not None else margins.adacos_fixed_scale(num_classes)
        # only dynamic AdaCos' scale is training state; a fixed one follows the config on resume
        self.register_buffer("scale", torch.tensor(float(initial_scale)), persistent=adacos_dynamic)
        self.touched_rows: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.num_rows

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (any count per rank); the training step gathers once for every loss instead and
        calls `global_loss`."""
        x, y, _ = gather_batch(F.normalize(embeddings.float(), dim=1), labels.long(), self.gather_grad_scale)
        return self.global_loss(x, y, step)

    def global_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, value) of the gathered global batch: x [N, D] normalised fp32, labels y [N]. Masks select the
        targets this rank owns, so nothing waits on the host (with class sampling: one read of the kept counts);
        two all-reduces (row max; exp-sum and targets)."""
        start, stop = self.row_start, self.row_stop
        kept, num_kept = None, self.num_classes
        if self.sample_rate < 1:
            mask = sampled_class_mask(y, self.num_classes, self.sample_rate, self.seed, step)
            # the one host read sampling needs: how many columns this rank's logits have
            num_kept, num_local = torch.stack([mask.sum(), mask[start:stop].sum()]).tolist()
            kept = torch.nonzero_static(mask[start:stop], size=num_local).squeeze(1)
        self.touched_rows = kept
        centres = self.weight if kept is None else self.weight[kept]
        # columns divided by the centre norms: cheaper than normalising (and back-propagating through) [C/W, D]
        inverse_norm = centres.norm(dim=1).clamp_min(1e-12).reciprocal()
        cos = (x.to(self.matmul_dtype) @ centres.to(self.matmul_dtype).T).float() * inverse_norm  # [N, kept local]

        # targets this rank owns (a mask, not an index list): cosine recomputed in fp32, margin applied here
        owned = (y >= start) & (y < stop)
        target_row = (y - start).clamp(0, stop - start - 1)
        target_col = (
            target_row if kept is None else torch.searchsorted(kept, target_row).clamp(max=max(len(kept) - 1, 0))
        )
        target_cos = (x * self.weight[target_row]).sum(1) * self.weight[target_row].norm(dim=1).clamp_min(
            1e-12
        ).reciprocal()
        is_target = owned[:, None] & (torch.arange(cos.shape[1], device=y.device) == target_col[:, None])

        if self.adacos_dynamic:
            self._update_adacos_scale(cos, is_target, owned, target_cos, num_kept)
        s = self.scale
        target_logit = s * self.margin(target_cos, step)
        logits = torch.where(is_target, target_logit[:, None], s * cos)

        # global softmax cross-entropy: log sum_j exp(l_j) - l_target, summed over the ranks' columns
        local_max = logits.detach().amax(1) if logits.shape[1] else logits.new_full((logits.shape[0],), -math.inf)
        row_max = distributed.all_reduce(local_max, "max")
        exp_sum, target = SumOverRanks.apply(
            torch.stack([torch.exp(logits - row_max[:, None]).sum(1), torch.where(owned, target_logit, 0.0)])
        )
        loss = (torch.log(exp_sum) + row_max - target).mean()
        return loss, loss.detach()

    @torch.no_grad()
    def _update_adacos_scale(self, cos, is_target, owned, target_cos, num_kept: int) -> None:
        """AdaCos' dynamic s from global statistics. With sampling, each sample saw num_kept - 1 of its C - 1
        negatives: their exp-sum is scaled up by (C - 1) / (num_kept - 1)."""
        negatives = torch.where(is_target, 0.0, torch.exp(self.scale * cos))
        exp_sum, target = distributed.all_reduce(
            torch.stack([negatives.sum(1), torch.where(owned, target_cos, 0.0)]), "sum"
        )
        mean_exp_sum = exp_sum.mean() * (self.num_classes - 1) / max(num_kept - 1, 1)
        median_angle = torch.median(torch.acos(target.clamp(-1.0, 1.0)))
        self.scale.copy_(margins.adacos_dynamic_scale(mean_exp_sum, median_angle))


def build_margin_head(
    loss_cfg,
    num_classes: int,
    embedding_dim: int,
    world_size: int,
    rank: int,
    seed: int,
    matmul_dtype: torch.dtype = torch.float32,
) -> ShardedMarginHead:
    """The ShardedMarginHead of `loss_cfg.head` (arcface, cosface, sphereface, combined, adacos[_fixed])."""
    adacos = loss_cfg.head in ("adacos", "adacos_fixed")
    return ShardedMarginHead(
        num_classes,
        embedding_dim,
        margins.build_margin(loss_cfg),
        scale=None if adacos else loss_cfg.scale,
        adacos_dynamic=loss_cfg.head == "adacos",
        sample_rate=loss_cfg.sample_rate,
        seed=seed,
        world_size=world_size,
        rank=rank,
        matmul_dtype=matmul_dtype,
    )
