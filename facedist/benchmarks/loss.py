"""Pair losses over a large global batch: peak memory and time per rank, as JSON.

    python -m facedist.bench loss [--batch 1024,4096] [--world-size 8] [--losses triplet,...] [--pml]

One rank's share of the step: the loss of its N / W anchors against the whole global batch of N
normalised embeddings (D = 512 by default, P x M with M = 4), forward and backward, without the
collectives (one all-gather and one reduce-scatter of N x D, one all-reduce of a few numbers). Peak memory
is what that step allocates on top of its inputs (CUDA: the allocator's peak; CPU: live tensor bytes
counted by torch's MemTracker, the tensors a GPU would hold). `--pml` also runs pytorch-metric-learning's
loss on the whole batch in one process, as the old trainer did on every rank (triplet: an N x N x N mask,
and above ~1,290 rows a per-anchor loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from facedist.benchmarks.head import _sync
from facedist.cli_common import DefaultsHelpFormatter
from facedist.config import LossConfig
from facedist.losses import PairLoss

VARIANTS = {
    "triplet": ("triplet", "none"),
    "triplet_semihard": ("triplet", "semihard"),
    "triplet_hard": ("triplet", "hard"),
    "contrastive": ("contrastive", "none"),
    "multi_similarity": ("multi_similarity", "none"),
}


def _pml(name: str):
    from pytorch_metric_learning import distances, losses, miners

    pair, miner = VARIANTS[name]
    cosine = distances.CosineSimilarity()
    loss = {
        "triplet": lambda: losses.TripletMarginLoss(margin=0.1, distance=cosine),
        "contrastive": lambda: losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.1, distance=cosine),
        "multi_similarity": lambda: losses.MultiSimilarityLoss(distance=cosine),
    }[pair]()
    mine = miners.TripletMarginMiner(margin=0.1, type_of_triplets=miner, distance=cosine) if miner != "none" else None
    return lambda x, y: loss(x, y, mine(x, y) if mine is not None else None)


def measure(step, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """Median ms of `step(x, y)` (forward + backward) and its peak memory above the inputs, in MB."""
    device = x.device
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step(x, y).backward()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        x.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(x, y).backward()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(x, y)
        with tracker:
            step(x, y).backward()
        peak = sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
        peak -= x.numel() * x.element_size() * 2 + y.numel() * y.element_size()  # inputs and their gradient
    x.grad = None
    return {"ms": statistics.median(times), "peak_mb": peak / 2**20}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench loss", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--batch", default="1024,4096", help="global batch sizes N")
    parser.add_argument("--world-size", type=int, default=8, help="ranks sharing the global batch (W)")
    parser.add_argument(
        "--losses",
        default="triplet,triplet_semihard,contrastive,multi_similarity",
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--images-per-class", type=int, default=4, help="M: images of each identity in the batch")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per loss; the median is reported")
    parser.add_argument("--pml", action="store_true", help="also PML's loss on the whole batch (slow)")
    parser.add_argument("--out", help="also write the JSON here")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for n in (int(v) for v in args.batch.split(",")):
        g = torch.Generator().manual_seed(n)
        x = F.normalize(torch.randn(n, args.dim, generator=g), dim=1).to(device).requires_grad_()
        y = torch.arange(n // args.images_per_class).repeat_interleave(args.images_per_class).to(device)
        local = n // args.world_size
        for name in args.losses.split(","):
            pair, miner = VARIANTS[name]
            loss = PairLoss(LossConfig(pair=pair, miner=miner, pair_margin=0.1))
            row = {
                "loss": name,
                "global_batch": n,
                "world_size": args.world_size,
                "local_rows": local,
                **measure(lambda x, y: loss(x, y, slice(0, local))[0], x, y, args.repeats),  # noqa: B023 (called at once)
            }
            if args.pml:
                row.update({f"pml_one_process_{k}": v for k, v in measure(_pml(name), x, y, 1).items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "benchmark": "loss",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dim": args.dim,
        "rows": rows,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
