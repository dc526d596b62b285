"""Images from shards for training and evaluation: decode, augment (keyed randomness), normalise, batch.

Decoding and augmentation run in DataLoader workers. Augmentation randomness comes only from the
item's aug_seed (see sampler.py), never from a worker's or rank's RNG, so a batch is the same tensor
whatever `data.num_workers` and however many processes train.
"""

from __future__ import annotations

import functools
import io
import os
import select
import signal
import threading
from multiprocessing import forkserver, popen_forkserver
from multiprocessing.context import ForkServerContext, ForkServerProcess

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import facedist  # noqa: F401  (torchvision compat before torchvision)
from torchvision.transforms import v2

from facedist.config import AugmentConfig, DataConfig
from facedist.data.sampler import ClassBalancedBatchSampler

# Workers are forked from a clean single-threaded server, not from the trainer: a fork while another
# thread holds CPython's thread-state lock (TensorBoard's writer, queue feeders, tqdm's monitor) left an
# evaluation loader's worker deadlocked in PyOS_AfterFork_Child and the run hung (seen, Python 3.11).
#
# Stop signals: Slurm signals every process of a job step, workers and the fork server included; only
# the trainer may decide to stop (facedist.preemption), so both ignore SIGUSR1/SIGTERM. A hung worker is
# still ended by the DataLoader's terminate(), which sends SIGKILL here instead of the ignored SIGTERM.
# A worker's parent is the fork server, which lives as long as any worker does, so neither torch's
# watchdog (it watches the parent) nor PR_SET_PDEATHSIG notice a dead trainer: each worker watches the
# trainer itself (a pidfd) and exits with it.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class _WorkerPopen(popen_forkserver.Popen):
    def terminate(self) -> None:  # workers ignore SIGTERM: the DataLoader's and multiprocessing's exit-time
        self.kill()  # terminate() of a live or hung worker must still end it


class _WorkerProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _WorkerPopen(process_obj)


class _WorkerContext(ForkServerContext):
    Process = _WorkerProcess


WORKER_CONTEXT = _WorkerContext()


def _start_fork_server() -> None:
    """Start the fork server with the stop signals ignored: it inherits SIG_IGN across exec, its workers
    across fork. They are blocked meanwhile, so one that reaches the trainer then waits, it is not lost."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exit_with(trainer: int) -> None:
    try:
        select.select([os.pidfd_open(trainer)], [], [])  # readable once the trainer has exited
    except ProcessLookupError:  # already gone
        pass
    os._exit(1)


def _init_worker(worker_id: int, trainer: int) -> None:
    for sig in STOP_SIGNALS:  # also under another start method; torch had set its own SIGTERM handler
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(trainer,), daemon=True, name="exit-with-trainer").start()


def loader_kwargs(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` worker processes (forkserver, stop signals ignored: see above).
    Every DataLoader facedist creates takes these."""
    if num_workers > 0:
        _start_fork_server()
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "multiprocessing_context": WORKER_CONTEXT if num_workers > 0 else None,
            "worker_init_fn": functools.partial(_init_worker, trainer=os.getpid()) if num_workers > 0 else None}


def build_transforms(augment: AugmentConfig, image_size: int, mean, std, train: bool) -> v2.Compose:
    """Train: random resized crop, flip, rotation, colour jitter; eval: resize. Both normalise."""
    steps: list = [v2.ToImage()]
    if train:
        steps.append(v2.RandomResizedCrop(image_size, scale=(augment.crop_scale_min, 1.0), antialias=True))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.rotation > 0:
            steps.append(v2.RandomRotation(augment.rotation))
        if augment.color_jitter > 0:
            steps.append(v2.ColorJitter(augment.color_jitter, augment.color_jitter, augment.color_jitter))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class FaceDataset(Dataset):
    """Map-style over a ShardIndex; an item is a sample index, or (sample index, aug_seed) when augmenting."""

    def __init__(self, index, transform):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, item):
        sample, aug_seed = item if isinstance(item, tuple) else (item, None)
        image = Image.open(io.BytesIO(self.index.read_image_bytes(sample))).convert("RGB")
        if aug_seed is None:
            tensor = self.transform(image)
        else:
            # torchvision draws from the global CPU RNG: key it, then restore it. Seed the CPU generator
            # only (torch.manual_seed would also reseed CUDA's RNG, which fork_rng(devices=[]) leaves changed)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(aug_seed)
                tensor = self.transform(image)
        return tensor, int(self.index.labels[sample])


def make_train_loader(index, cfg: DataConfig, preprocessing: dict, world_size: int, rank: int, seed: int,
                      start_step: int = 0) -> DataLoader:
    """Endless loader of this rank's (images, labels) per step, starting at `start_step`."""
    sampler = ClassBalancedBatchSampler(index.class_offsets, cfg.classes_per_batch, cfg.images_per_class,
                                        world_size, rank, seed, start_step)
    transform = build_transforms(cfg.augment, preprocessing["image_size"], preprocessing["mean"],
                                 preprocessing["std"], train=True)
    return DataLoader(FaceDataset(index, transform), batch_sampler=sampler,
                      prefetch_factor=4 if cfg.num_workers else None, **loader_kwargs(cfg.num_workers))


class _EvalItems(Dataset):
    def __init__(self, faces: FaceDataset, samples: np.ndarray):
        self.faces, self.samples = faces, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        image, label = self.faces[int(self.samples[i])]
        return image, label, int(self.samples[i])


def eval_samples(index, world_size: int, rank: int, max_images: int = 0) -> np.ndarray:
    """This rank's contiguous block of the split's samples (the first `max_images` when > 0)."""
    count = index.num_samples if max_images <= 0 else min(max_images, index.num_samples)
    return np.array_split(np.arange(count), world_size)[rank]


def make_eval_loader(index, preprocessing: dict, batch_size: int, world_size: int = 1, rank: int = 0,
                     max_images: int = 0, num_workers: int = 0, samples=None) -> DataLoader:
    """(images, labels, sample indices) of this rank's share of the split (or of `samples` when given),
    un-augmented; gather across ranks after."""
    transform = build_transforms(AugmentConfig(), preprocessing["image_size"], preprocessing["mean"],
                                 preprocessing["std"], train=False)
    if samples is None:
        samples = eval_samples(index, world_size, rank, max_images)
    items = _EvalItems(FaceDataset(index, transform), np.asarray(samples))
    return DataLoader(items, batch_size=batch_size, **loader_kwargs(num_workers))
