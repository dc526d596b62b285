"""1:1 verification throughput: all pairs scored per second by `verification_metrics`.

`python -m facedist.bench eval [--sizes 10000,50000] [--dim 512] [--per-identity 10] [--devices cpu,cuda]
[--world-sizes 1,2]` prints one JSON object. With --world-sizes, the all-pairs pass is split across that many
processes (gloo on CPU, one GPU each with NCCL), as evaluation during training does; the time is rank 0's.
Embeddings are random identity centres plus noise (so genuine and impostor scores
look like a trained model's, which matters for the searchsorted access pattern), created on the device
before timing. The time covers the whole exact computation: quantisation, genuine scores, the chunked
all-pairs pass and the ROC metrics. CUDA is timed when available, after one small warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facedist.cli_common import DefaultsHelpFormatter
from facedist.evaluation.metrics import chunk_rows, verification_metrics


def _embeddings(n: int, dim: int, per_identity: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // per_identity
    centres = torch.randn(int(labels[-1]) + 1, dim, generator=generator)
    embeddings = centres[labels] + 2.0 * torch.randn(n, dim, generator=generator)
    return embeddings.to(device), labels.to(device)


def _time(n: int, args, device: str, world_size: int = 1) -> dict:
    embeddings, labels = _embeddings(n, args.dim, args.per_identity, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if world_size > 1:
        dist.barrier()
    started = time.perf_counter()
    metrics = verification_metrics(embeddings, labels, chunk_size=args.chunk_size, split_across_ranks=world_size > 1)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    pairs = n * (n - 1) // 2
    result = {
        "device": device,
        "world_size": world_size,
        "images": n,
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds),
        "chunk_rows": chunk_rows(n, args.chunk_size),
        "num_genuine": metrics["num_genuine"],
        "auc": round(metrics["auc"], 6),
    }
    if device == "cuda":
        result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def _rank_main(rank: int, world_size: int, port: int, n: int, args, device: str, out: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    result = _time(n, args, device, world_size)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _time_split(n: int, args, device: str, world_size: int) -> dict:
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(world_size, port, n, args, device, out), nprocs=world_size, join=True)
        with open(out) as f:
            return json.load(f)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench eval", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,50000", help="comma-separated numbers of embeddings")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--per-identity", type=int, default=10, help="images per identity")
    parser.add_argument("--devices", default=None, help="comma-separated, default: cpu and cuda when available")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: 2^24 scores / N)")
    parser.add_argument("--world-sizes", default="1", help="comma-separated process counts splitting the pairs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        if device == "cuda":
            _time(2000, args, device)  # warm-up: CUDA context, cuBLAS handles
        results += [
            _time(int(n), args, device) if w == 1 else _time_split(int(n), args, device, w)
            for n in args.sizes.split(",")
            for w in world_sizes
        ]
    print(
        json.dumps(
            {
                "benchmark": "eval",
                "dim": args.dim,
                "per_identity": args.per_identity,
                "cpu_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "results": results,
            },
            indent=1,
        )
    )
    return 0
