"""Training input pipeline per core: today's path against the pipeline it replaced, side by side, as JSON.

    python -m facedist.bench data --config CFG --shards DIR --image-size S --device cpu|cuda \
        [--batches 8] [--rounds 5] [key=value ...]

One core (`torch.set_num_threads(1)`, OpenCV single-threaded, no loader workers), the whole path from the
pread to the normalised float batch on the device (device work included, so on a CPU it is counted):
- `images_per_s`: the facedist loader (read, decode, one warp, uint8 collate) + DeviceAugment (photometric,
  float, normalise), timed as training runs it; `stages_us`: microseconds per image of each stage.
- `decode_floor_images_per_s`: read + decode only, what no augmentation can beat.
- `previous_images_per_s`: the pipeline before this one (Pillow decode, torchvision v2 RandomResizedCrop,
  flip, RandomRotation, ColorJitter, ToDtype, Normalize in the worker, float32 batches), kept here only
  for this comparison, with the same augmentation strengths.
Each path is timed in each of `--rounds` interleaved rounds and the medians are reported.
glibc's allocator keeps freed memory (mallopt) for both paths: on the VM this was measured on, touching
fresh pages cost more than the arithmetic, which would measure the kernel, not the pipelines.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import statistics
import time

import cv2
import torch
from PIL import Image

import facedist  # noqa: F401  (torchvision compat before torchvision)
from facedist.benchmarks.train import device_info
from facedist.cli_common import DefaultsHelpFormatter
from facedist.config import load_config
from facedist.data import augment as aug
from facedist.data.dataset import collate_train, make_train_loader
from facedist.data.decode import decode_rgb, to_model_size
from facedist.data.device_augment import DeviceAugment
from facedist.data.index import ShardIndex
from facedist.durable import write_bytes_atomic


def previous_transform(augment, size: int, mean, std):
    """The replaced per-image path (facedist before the single-warp pipeline), for comparison only."""
    from torchvision.transforms import v2

    jitter = (augment.brightness, augment.contrast, augment.saturation)
    steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(augment.crop_scale_min, 1.0), antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if augment.hflip else []
    steps += [v2.RandomRotation(augment.rotation)] if augment.rotation > 0 else []
    steps += [v2.ColorJitter(*jitter)] if any(jitter) else []
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def keep_freed_memory() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 1 << 30))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    except OSError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench data", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--config", required=True, help="training config YAML: its data and augmentation sections")
    parser.add_argument("--shards", required=True, help="shard folder to read (its train split)")
    parser.add_argument("--image-size", type=int, required=True, help="model input side, pixels")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the device step runs")
    parser.add_argument("--batches", type=int, default=8, help="batches timed per path and round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; medians reported")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.augment.rotation=10")
    return parser


def _previous_path(index: ShardIndex, transform, device: torch.device):
    """The replaced pipeline as a function of one batch: Pillow decode and torchvision v2 per image."""

    def previous(batch):
        images = []
        for sample, augment_seed in batch:
            image = Image.open(io.BytesIO(index.read_image_bytes(sample))).convert("RGB")
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(augment_seed)
                images.append(transform(image))
        torch.stack(images).to(device)

    return previous


def _paths(cfg, index: ShardIndex, device: torch.device, size: int, batch_count: int) -> tuple[dict, int]:
    """{name: (function of one batch, its batches)} for every path and stage timed, and the batch size."""
    prep = {"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    loader = make_train_loader(index, cfg.data, prep, 1, 0, cfg.train.seed)
    to_model_input = DeviceAugment(loader.dataset, device)
    items = [item for step in range(batch_count + 1) for item in loader.batch_sampler.batch(step)]
    per_batch = len(items) // (batch_count + 1)
    batches = [items[k * per_batch : (k + 1) * per_batch] for k in range(batch_count + 1)]
    dataset = loader.dataset
    encoded = {s: index.read_image_bytes(s) for s, _ in items}
    pixels = {s: to_model_size(decode_rgb(encoded[s]), size) for s, _ in items}
    draws = {item: aug.draw(item[1], cfg.data.augment, pixels[item[0]].shape[:2], size) for item in items}
    prepared = [collate_train([dataset[item] for item in b]) for b in batches]
    transform = previous_transform(cfg.data.augment, size, prep["mean"], prep["std"])
    paths = {
        "new": (lambda b: to_model_input(collate_train([dataset[item] for item in b])), batches),
        "previous": (_previous_path(index, transform, device), batches),
        "read": (lambda b: [index.read_image_bytes(s) for s, _ in b], batches),
        "decode": (lambda b: [decode_rgb(encoded[s]) for s, _ in b], batches),
        "warp": (lambda b: [aug.warp(pixels[s], draws[(s, a)].matrix, size) for s, a in b], batches),
        "device": (to_model_input, prepared),
    }
    return paths, per_batch


def _interleaved_rounds(paths: dict, rounds: int, per_batch: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per image of each path in each round, the first batch of each timing as warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, batches) -> float:
        fn(batches[0])
        sync()
        start = time.perf_counter()
        for batch in batches[1:]:
            fn(batch)
        sync()
        return (time.perf_counter() - start) / (len(batches[1:]) * per_batch)

    # rounds interleave the paths, so a slower spell of a shared machine falls on all of them alike
    seconds = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (fn, fn_batches) in paths.items():
            seconds[name].append(timed(fn, fn_batches))
    return seconds


def _stages(seconds: dict[str, list[float]]) -> dict:
    """The medians as the result's speeds and per-stage microseconds."""
    names = ("new", "previous", "read", "decode", "warp", "device")
    new, old, read, decode, warp, device_step = (statistics.median(seconds[name]) for name in names)
    return {
        "images_per_s": 1 / new,
        "previous_images_per_s": 1 / old,
        "speedup": old / new,
        "speedup_per_round": [o / n for o, n in zip(seconds["previous"], seconds["new"])],
        "decode_floor_images_per_s": 1 / (read + decode),
        "stages_us": {
            "read": 1e6 * read,
            "decode": 1e6 * decode,
            "warp": 1e6 * warp,
            "device_photometric_normalise": 1e6 * device_step,
            "rest (collate, draws, resize)": 1e6 * (new - read - decode - warp - device_step),
        },
        "previous_us_per_image": 1e6 * old,
    }


def main(argv=None) -> int:
    """Entry point of `python -m facedist.bench data`: prints (and with --out writes) the JSON result."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    allocator_kept = keep_freed_memory()
    cfg = load_config(
        args.config,
        [*args.overrides, f"data.shards={args.shards}", "data.num_workers=0", f"model.image_size={args.image_size}"],
    )
    device = torch.device(args.device)
    index = ShardIndex(cfg.data.shards, cfg.data.split_train)
    paths, per_batch = _paths(cfg, index, device, args.image_size, args.batches)
    seconds = _interleaved_rounds(paths, args.rounds, per_batch, device)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "shards": str(args.shards),
        "shard_image_size": index.image_size,
        "image_format": index.image_format,
        "image_size": args.image_size,
        "augment": cfg.data.augment.__dict__,
        "batch": per_batch,
        "batches": args.batches,
        "rounds": args.rounds,
        **device_info(device),
        "allocator_keeps_freed_memory": allocator_kept,
        **_stages(seconds),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_bytes_atomic(args.out, (text + "\n").encode("utf-8"))
    return 0
