"""Sharded margin head: memory per rank and step time for 10k..1M identities, as JSON.

    python -m facedist.bench head [--classes 10000,100000,1000000] [--rates 1.0,0.1] [--world-sizes 1,2]
                                  [--dim 512] [--batch 128] [--steps 5] [--device cpu|cuda] [--out FILE]
                                  [--backbone tf_efficientnetv2_b0 --image-size 224]

For each world size W (gloo processes on CPU; NCCL, one GPU per process, on CUDA), number of classes C
and sample rate: one head step (forward, backward, optimizer step) on random embeddings of a global batch
of --batch, W processes each holding C / W centres. Per rank:
- state_mb: centres + their gradient + optimizer state (exact bytes of the tensors), proportional to C / W;
- logits_mb: one [global batch, kept local classes] fp32 matrix (the step holds a few of them);
- peak_mb (CUDA only): peak allocated memory of the step;
- step_ms: median step time (slowest rank), split into forward / backward / optimizer;
- softmax_overhead_ms: step_ms minus local_step_ms, the same step without collectives (every rank at once
  holding its C / W classes and the whole global batch): what distributing the softmax costs (gathers,
  all-reduces, choosing the sampled classes from the global labels).
With --backbone, also the whole training step around the head, on random images of --image-size (global
batch --batch split over the ranks, backbone in DDP when W > 1, both optimizers stepped):
- train_step_ms: its median time (slowest rank), and softmax_overhead_pct = 100 x softmax_overhead_ms /
  train_step_ms, the share of the training step that distributing the softmax costs;
- train_peak_mb: peak memory of that step, head state included (CUDA: the allocator's peak; CPU: the peak
  of live tensor bytes as torch's MemTracker counts them, the same tensors a GPU would hold).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facedist.cli_common import DefaultsHelpFormatter
from facedist.config import Config, load_config
from facedist.heads import MATMUL_DTYPES, build_head
from facedist.model import build_model
from facedist.optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(head, optimizer) -> int:
    tensors = [head.weight, head.weight.grad] + [v for v in optimizer.state[head.weight].values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(
    cfg: Config,
    classes: int,
    batch: int,
    world_size: int,
    rank: int,
    device: torch.device,
    steps: int,
    warmup: int,
    with_train_step: bool = False,
) -> dict:
    """One configuration on this rank: memory and median times of `steps` timed head steps (and training steps)."""
    head, optimizer = build_head(cfg, classes, world_size, rank, device)
    local_batch = batch // world_size
    g = torch.Generator().manual_seed(rank)
    times = {"forward": [], "backward": [], "optimizer": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kept_local = head.row_stop - head.row_start
    for step in range(warmup + steps):
        embeddings = torch.randn(local_batch, cfg.model.embedding_dim, generator=g).to(device).requires_grad_()
        labels = torch.randint(0, classes, (local_batch,), generator=g).to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = head(embeddings, labels, step)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        if step == 0:
            kept_local = kept_local if head.touched_rows is None else head.touched_rows.numel()
            state_bytes = _state_bytes(head, optimizer)
        optimizer.zero_grad(set_to_none=True)  # as training does: the next backward's gradient becomes .grad
        if step >= warmup:
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(seconds * 1e3)
    result = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    result["step_ms"] = sum(result.values())
    result.update(
        rows=head.row_stop - head.row_start, state_mb=state_bytes / 2**20, logits_mb=batch * kept_local * 4 / 2**20
    )
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if with_train_step:
        result.update(train_step(cfg, head, optimizer, local_batch, world_size, device, steps, warmup))
    return result


def train_step(
    cfg: Config, head, head_optimizer, local_batch: int, world_size: int, device: torch.device, steps: int, warmup: int
) -> dict:
    """Median time and peak memory of the training step around `head`: images -> backbone -> head -> both steps."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = build_model(cfg.model, device).train()
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer, _ = build_optimizer(model.parameters(), cfg.optim, max_steps=warmup + steps + 1)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    size = cfg.model.image_size
    images = torch.randn(local_batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, head.num_classes, (local_batch,), generator=g).to(device)
    dtype = MATMUL_DTYPES[cfg.train.mixed_precision]

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            embeddings = model(images)
        loss, _ = head(embeddings.float(), labels, index)
        loss.backward()
        optimizer.step()
        head_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)

    times = []
    for index in range(warmup + steps):
        if index == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        step(index)
        _sync(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # one more step, counted tensor by tensor (too slow to time)
        tracker = MemTracker()
        for param in model.parameters():  # MemTracker hooks every parameter and raises on frozen ones (IResNet's
            param.requires_grad_(True)  # embedding BN scale); this last step is only measured, never used
        tracker.track_external(model, head, optimizer, head_optimizer, images, labels)
        with tracker:
            step(warmup + steps)
        peak = sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
    return {"train_step_ms": statistics.median(times), "train_peak_mb": peak / 2**20}


def _config(args, rate: float) -> Config:
    return load_config(
        None,
        [
            f"model.embedding_dim={args.dim}",
            f"loss.head={args.head}",
            f"loss.sample_rate={rate}",
            f"optim.name={args.optim}",
            f"train.mixed_precision={args.mixed_precision}",
            f"model.backbone={args.backbone}",
            f"model.image_size={args.image_size}",
        ],
    )


def _rank_main(rank: int, world_size: int, port: int, args, out_dir: str) -> None:
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        results = [
            measure(
                _config(args, rate),
                classes,
                args.batch,
                world_size,
                rank,
                device,
                args.steps,
                args.warmup,
                with_train_step=bool(args.backbone),
            )
            for classes, rate in _grid(args)
        ]
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # The same work without collectives: every rank at once, its C / W classes, the whole global batch. Run
    # side by side, the ranks share the machine's cores and memory bandwidth as in the distributed step, so
    # the difference is what the collectives cost (one process alone would also credit them with contention).
    for result, (_, rate) in zip(results, _grid(args)):
        result["local_step_ms"] = measure(
            _config(args, rate), result["rows"], args.batch, 1, 0, device, args.steps, args.warmup
        )["step_ms"]
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)


def _grid(args) -> list[tuple[int, float]]:
    return [(c, r) for c in args.classes for r in args.rates]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(args, world_size: int) -> list[list[dict]]:
    """Per configuration, the results of every rank of a `world_size`-process run."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world_size, _free_port(), args, out_dir), nprocs=world_size, join=True)
        per_rank = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"{r}.json")) as f:
                per_rank.append(json.load(f))
    return [list(configuration) for configuration in zip(*per_rank)]


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench head", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--classes", type=_csv(int), default="10000,100000,1000000", help="comma-separated identity counts C"
    )
    parser.add_argument("--rates", type=_csv(float), default="1.0,0.1", help="loss.sample_rate values")
    parser.add_argument(
        "--world-sizes",
        type=_csv(int),
        help="comma-separated process counts (default: 1,2 on CPU; 1..GPU count on CUDA)",
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    parser.add_argument("--head", default="arcface", help="loss.head")
    parser.add_argument("--optim", default="adamw_cosine", help="optim.name (ScheduleFree needs --rates 1.0)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="train.mixed_precision")
    parser.add_argument(
        "--backbone", default="", help="timm name: also time the whole training step around it (default: head only)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="with --backbone (112 for iresnet*/mobilefacenet)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="where to run (default: cuda when available, else cpu)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.world_sizes is None:
        args.world_sizes = list(range(1, torch.cuda.device_count() + 1)) if args.device == "cuda" else [1, 2]
    if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"--world-sizes {max(args.world_sizes)}: only {torch.cuda.device_count()} GPU(s)")

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    rows = []
    for world_size in args.world_sizes:
        distributed_runs = run_world(args, world_size) if world_size > 1 else None
        for index, (classes, rate) in enumerate(_grid(args)):
            cfg = _config(args, rate)
            if distributed_runs is None:
                ranks = [
                    measure(
                        cfg,
                        classes,
                        args.batch,
                        1,
                        0,
                        device,
                        args.steps,
                        args.warmup,
                        with_train_step=bool(args.backbone),
                    )
                ]
            else:
                ranks = distributed_runs[index]
            slowest = max(ranks, key=lambda r: r["step_ms"])
            row = {
                "world_size": world_size,
                "classes": classes,
                "sample_rate": rate,
                "rows_per_rank": max(r["rows"] for r in ranks),
                "state_mb_per_rank": round(max(r["state_mb"] for r in ranks), 1),
                "logits_mb_per_rank": round(max(r["logits_mb"] for r in ranks), 1),
                **{k: round(v, 2) for k, v in slowest.items() if k.endswith("_ms")},
            }
            if "peak_mb" in slowest:
                row["peak_mb_per_rank"] = round(max(r["peak_mb"] for r in ranks), 1)
            if args.backbone:
                row["train_step_ms"] = round(max(r["train_step_ms"] for r in ranks), 1)
                row["train_peak_mb_per_rank"] = round(max(r["train_peak_mb"] for r in ranks), 1)
            if world_size > 1:
                local_step_ms = max(r["local_step_ms"] for r in ranks)
                row["local_step_ms"] = round(local_step_ms, 2)
                row["softmax_overhead_ms"] = round(row["step_ms"] - local_step_ms, 2)
                if args.backbone:
                    row["softmax_overhead_pct"] = round(100 * row["softmax_overhead_ms"] / row["train_step_ms"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "head",
        "device": str(device),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "dim": args.dim,
        "global_batch": args.batch,
        "head": args.head,
        "optim": args.optim,
        "mixed_precision": args.mixed_precision,
        "backbone": args.backbone or None,
        "image_size": args.image_size if args.backbone else None,
        "results": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
