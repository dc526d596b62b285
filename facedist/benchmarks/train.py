"""Training throughput: model only, data only, end to end, and a plain baseline loop, as JSON.

    python -m facedist.bench train --config configs/demo.yaml [--steps 30] [--folder FACES] [key=value ...]

- model only: forward + loss + backward + optimizer step on random tensors already on the device.
- data only: the facedist loader (shards -> decode -> warp) and the device step (photometric, normalise) for
  one process, no model.
- end to end: the real trainer (`facedist/train.py`) for --steps steps; images/s from its metrics.jsonl.
- baseline: the same model in the loop most people write first: torchvision ImageFolder + PIL
  transforms + pytorch-metric-learning's MPerClassSampler + fp32 + AdamW, from the identity folders.
Goals: end to end >= 0.9 x model only; >= 5x the baseline on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from facedist.cli_common import DefaultsHelpFormatter
from facedist.config import load_config
from facedist.data.dataset import make_train_loader
from facedist.data.device_augment import DeviceAugment
from facedist.data.index import ShardIndex
from facedist.losses import Objective
from facedist.model import build_model, preprocessing
from facedist.optim import build_optimizer


def device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _timed(step, steps: int, warmup: int, images_per_step: int, device: torch.device) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_step * steps / (time.perf_counter() - start)


def model_only(cfg, device, steps, warmup) -> float:
    model = build_model(cfg.model, device).train()
    if cfg.model.compile:
        model = torch.compile(model)
    head = head_optimizer = None
    if cfg.loss.head != "none":  # a margin head over the batch's P classes (the head's own cost: bench head)
        from facedist.heads import build_head

        head, head_optimizer = build_head(cfg, cfg.data.classes_per_batch, 1, 0, device)
    objective = Objective(cfg.loss, head)
    optimizer, _ = build_optimizer(model.parameters(), cfg.optim, cfg.train.max_steps)
    batch, size = cfg.data.images_per_step(), cfg.model.image_size
    images = torch.randn(batch, 3, size, size, device=device)  # NCHW, as DeviceAugment gives it
    labels = torch.arange(batch, device=device) % cfg.data.classes_per_batch  # P x M, or P classes at random
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embeddings = model(images)
        loss, _ = objective(embeddings, labels, 0)
        loss.backward()
        for opt in (optimizer, head_optimizer) if head_optimizer is not None else (optimizer,):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return _timed(step, steps, warmup, batch, device)


def data_only(cfg, device, steps, warmup) -> float:
    index = ShardIndex(cfg.data.shards, cfg.data.split_train)
    model = build_model(cfg.model, "cpu")
    loader = make_train_loader(index, cfg.data, preprocessing(model, cfg.model.image_size), 1, 0, cfg.train.seed, 0)
    to_model_input, batches = DeviceAugment(loader.dataset, device), iter(loader)
    return _timed(lambda: to_model_input(next(batches)), steps, warmup, cfg.data.images_per_step(), device)


def end_to_end(config, overrides, steps) -> float:
    from facedist.train import main as train

    with tempfile.TemporaryDirectory() as out:
        train(
            [
                "--config",
                config,
                *overrides,
                f"train.max_steps={steps}",
                "train.log_every=1",
                "eval.every=0",
                "checkpoint.every=0",
                f"output_dir={out}",
            ]
        )
        rates = [json.loads(line)["images_per_s"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[len(rates) // 4 :])  # skip start-up steps (worker spin-up, allocator warm-up)


def baseline(cfg, folder: Path, device, steps, warmup) -> float:
    import torchvision
    from pytorch_metric_learning import distances, losses, samplers
    from torchvision import transforms as T

    model = build_model(cfg.model, device).train()
    prep = preprocessing(model, cfg.model.image_size)
    transform = T.Compose(
        [
            T.RandomResizedCrop(cfg.model.image_size, scale=(cfg.data.augment.crop_scale_min, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomRotation(cfg.data.augment.rotation),
            T.ColorJitter(cfg.data.augment.brightness, cfg.data.augment.contrast, cfg.data.augment.saturation),
            T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    P, M = cfg.data.classes_per_batch, cfg.data.images_per_class
    sampler = samplers.MPerClassSampler(dataset.targets, m=M, batch_size=P * M, length_before_new_iter=10**7)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=P * M, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True
    )
    loss_fn = losses.TripletMarginLoss(margin=cfg.loss.pair_margin, distance=distances.CosineSimilarity())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    batches = iter(loader)

    def step():
        images, labels = next(batches)
        loss = loss_fn(model(images.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return _timed(step, steps, warmup, P * M, device)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench train", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--config", required=True, help="training config YAML, e.g. configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (model only, data only, baseline)")
    parser.add_argument("--folder", help="identity folders for the baseline (default: synthetic faces drawn now)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.mixed_precision=bf16")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "config": args.config,
        "overrides": args.overrides,
        **device_info(device),
        "mixed_precision": cfg.train.mixed_precision,
        "channels_last": cfg.model.channels_last,
        "compile": cfg.model.compile,
        "batch": cfg.data.images_per_step(),
        "sampler": cfg.data.sampler,
        "image_size": cfg.model.image_size,
        "backbone": cfg.model.backbone,
    }
    result["model_only_images_per_s"] = model_only(cfg, device, args.steps, args.warmup)
    result["data_only_images_per_s"] = data_only(cfg, device, args.steps, args.warmup)
    result["end_to_end_images_per_s"] = end_to_end(args.config, args.overrides, args.steps + args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else None
        if folder is None:
            from facedist.data.synth import write_synthetic_tree

            folder = Path(tmp) / "faces"
            write_synthetic_tree(
                folder,
                identities=max(2 * cfg.data.classes_per_batch, 32),
                images_per_identity=8,
                size=cfg.model.image_size,
                progress=False,
            )
        result["baseline_images_per_s"] = baseline(cfg, folder, device, args.steps, args.warmup)
    result["end_to_end_over_model_only"] = result["end_to_end_images_per_s"] / result["model_only_images_per_s"]
    result["end_to_end_over_baseline"] = result["end_to_end_images_per_s"] / result["baseline_images_per_s"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
