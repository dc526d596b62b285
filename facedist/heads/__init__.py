"""Classification heads over many identities: the sharded margin softmax, its optimizer, AdaRand.

head, head_optimizer = build_head(cfg, num_classes, world_size, rank, device)
loss, value = head(embeddings, labels, step)   # global mean loss; backward under DDP averaging
grad_norm_squared(list(head.parameters()))   # this rank's shard; summed over ranks in the step's flags
head.checkpoint_files("head", head_optimizer) / head.load_checkpoint(dir / "head", head_optimizer)
"""

from __future__ import annotations

import torch

from facedist.config import Config

MATMUL_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_head(cfg: Config, num_classes: int, world_size: int, rank: int, device: torch.device | str = "cpu"):
    """(ShardedMarginHead of `cfg.loss.head` on `device`, its optimizer). Refuses ScheduleFree + sampling."""
    from facedist.heads.optim import build_head_optimizer
    from facedist.heads.sharded_softmax import build_margin_head

    head = build_margin_head(
        cfg.loss,
        num_classes,
        cfg.model.embedding_dim,
        world_size,
        rank,
        cfg.train.seed,
        matmul_dtype=MATMUL_DTYPES[cfg.train.mixed_precision],
    ).to(device)
    optimizer = build_head_optimizer(head.parameters(), cfg, touched_rows=lambda: head.touched_rows)
    return head, optimizer


def build_adarand(cfg: Config, num_classes: int, world_size: int, rank: int, device: torch.device | str = "cpu"):
    """(AdaRand regulariser, the optimizer of its class means); initialise it with `init_from_features`."""
    from facedist.heads.adarand import AdaRand
    from facedist.heads.optim import build_head_optimizer

    adarand = AdaRand(
        num_classes,
        cfg.model.embedding_dim,
        cfg.loss.adarand_lambda,
        seed=cfg.train.seed,
        world_size=world_size,
        rank=rank,
    ).to(device)
    return adarand, build_head_optimizer(adarand.parameters(), cfg)
