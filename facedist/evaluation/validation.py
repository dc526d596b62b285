"""Evaluation during training: the validation split embedded and scored by every rank, within the timeouts.

Each rank embeds its block of the split (a rank may have none) and, after the gather, scores its share of
the all-pairs and 1:N work on its own device (metrics.py, identification.py), so the exact metrics come
out the same for any number of processes while the time divides by about W. What stays on rank 0 (the
balanced-pair accuracy, plots, TensorBoard) runs while the others wait on a gloo group with its own long
timeout (`eval.timeout_s`), not in the next training collective (`train.timeout_s`). Every rank asks
`should_stop` between batches and chunks, so a stop signal abandons the evaluation (None) in seconds.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from facedist import distributed
from facedist.config import Config
from facedist.data.dataset import eval_samples, make_eval_loader
from facedist.data.index import ShardIndex
from facedist.data.shards import ShardError, load_manifest
from facedist.evaluation.metrics import EvaluationAbandoned, check_stop
from facedist.evaluation.report import evaluate_embeddings
from facedist.inference import embed_batch


def validation_index(cfg: Config) -> ShardIndex | None:
    """The validation split when `eval.every > 0`; a missing split says what to do."""
    if cfg.eval.every <= 0:
        return None
    splits = load_manifest(cfg.data.shards)["splits"]
    if cfg.data.split_val not in splits:
        raise ShardError(
            f"{cfg.data.shards}: no split {cfg.data.split_val!r} to evaluate on (has {', '.join(splits)}); "
            "set eval.every=0, or rebuild the shards with --val-identities"
        )
    return ShardIndex(cfg.data.shards, cfg.data.split_val)


def wait_group(timeout_s: int):
    """A gloo group with a long timeout for the ranks waiting on rank 0's share (None without a process group).
    Every rank must call it (it is a collective); NCCL has no per-call timeout, hence gloo."""
    if not distributed.is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def embed_split(
    model: torch.nn.Module,
    index: ShardIndex,
    cfg: Config,
    preprocessing: dict,
    device,
    autocast,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, labels) of the split on every rank: each embeds its block, then all are gathered. Every rank
    steps as many batches as the largest block needs, so the stop checks line up."""
    world, rank = distributed.world_size(), distributed.rank()
    blocks = [len(eval_samples(index, world, r, cfg.eval.max_images)) for r in range(world)]
    steps = max(math.ceil(n / cfg.eval.batch_size) for n in blocks)
    loader = make_eval_loader(
        index, preprocessing, cfg.eval.batch_size, world, rank, cfg.eval.max_images, num_workers=cfg.data.num_workers
    )
    batches = iter(loader)
    embeddings = [torch.zeros(0, cfg.model.embedding_dim, device=device)]  # a rank may contribute zero rows
    labels = [torch.zeros(0, dtype=torch.int64, device=device)]
    with torch.no_grad(), autocast():
        for _ in range(steps):
            batch = next(batches, None)
            if batch is not None:
                images, batch_labels, _ = batch
                embeddings.append(
                    embed_batch(model, images.to(device), preprocessing.get("flip", False), normalize=False)
                )
                labels.append(batch_labels.to(device))
            check_stop(should_stop)
    return distributed.gather_rows(torch.cat(embeddings)), distributed.gather_rows(torch.cat(labels))


def evaluate_validation(
    model: torch.nn.Module,
    index: ShardIndex,
    cfg: Config,
    preprocessing: dict,
    device,
    autocast,
    step: int,
    tb_writer,
    group,
    should_stop: Callable[[], bool] | None = None,
) -> dict | None:
    """The validation metrics for metrics.jsonl (rank 0; {} elsewhere), with `val_time_s`; None on every rank
    when a stop was requested meanwhile. TensorBoard gets everything (the projector at the last step only)."""
    started = time.perf_counter()
    try:
        embeddings, labels = embed_split(model, index, cfg, preprocessing, device, autocast, should_stop)
        projector = cfg.eval.projector_points if step == cfg.train.max_steps else 0
        metrics = evaluate_embeddings(
            embeddings,
            labels,
            tb_writer=tb_writer,
            step=step,
            tag="val",
            projector_points=projector,
            split_across_ranks=True,
            should_stop=should_stop,
        )
    except EvaluationAbandoned:
        return None
    if group is not None:
        dist.barrier(group=group)  # the others wait here, under eval.timeout_s, while rank 0 finishes its share
    if metrics is None:
        return {}
    return {
        "val_auc": metrics["auc"],
        "val_eer": metrics["eer"],
        "val_tar@far=1e-2": metrics["tar_at_far"]["1e-02"],
        "val_tar@far=1e-3": metrics["tar_at_far"]["1e-03"],
        "val_accuracy": metrics["accuracy_kfold"]["mean"],
        "val_rank1": metrics["cmc"]["rank1"],
        "val_time_s": round(time.perf_counter() - started, 3),
    }


class Validator:
    """Evaluation during training: the validation split (`evaluate_validation`) and `eval.bins`, every
    `eval.every` steps and at the last one; disabled (never due) without a validation split."""

    def __init__(self, cfg: Config, index: ShardIndex | None, group, preprocessing: dict, device, autocast, bins):
        self.cfg, self.index, self.group, self.preprocessing = cfg, index, group, preprocessing
        self.device, self.autocast, self.bins = device, autocast, bins

    @property
    def enabled(self) -> bool:
        return self.index is not None

    def is_due(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.eval.every == 0 or step == self.cfg.train.max_steps)

    def __call__(self, model: torch.nn.Module, step: int, tb_writer, should_stop=None) -> dict | None:
        """Validation and bin metrics (rank 0; {} elsewhere), or None when a stop came meanwhile (abandoned)."""
        metrics = evaluate_validation(
            model,
            self.index,
            self.cfg,
            self.preprocessing,
            self.device,
            self.autocast,
            step,
            tb_writer,
            self.group,
            should_stop,
        )
        return None if metrics is None else {**metrics, **self.bins(model)}
