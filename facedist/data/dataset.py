"""Images from shards for training and evaluation: read, decode, one warp (CPU); batches travel as uint8.

Training: a worker reads and decodes each image and applies its ONE geometric warp (facedist/data/augment.py),
so a batch leaves the worker as uint8 planes [B, 3, S, S] with each item's photometric factors; photometric
augmentation, float conversion and normalisation run on the whole batch on the training device
(facedist/data/device_augment.py). With `data.decode=gpu` the worker only reads: the encoded JPEGs and
their warp go to the device (facedist/data/gpu_decode.py). Randomness comes only from the item's aug_seed
(see sampler.py), never from a worker's or rank's RNG, so a batch is the same whatever `data.num_workers`
and however many processes train. Evaluation items are un-augmented normalised floats, as inference makes them.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
import threading
from multiprocessing import forkserver, popen_forkserver, spawn
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facedist.config import AugmentConfig, DataConfig
from facedist.data import augment as aug
from facedist.data.decode import DecodeError, decode_rgb, to_model_size
from facedist.data.sampler import make_batch_sampler
from facedist.data.shards import ShardError

# Workers are forked from a clean single-threaded server, not from the trainer: a fork while another
# thread holds CPython's thread-state lock (TensorBoard's writer, queue feeders, tqdm's monitor) left an
# evaluation loader's worker deadlocked in PyOS_AfterFork_Child and the run hung (seen, Python 3.11).
#
# Stop signals: Slurm signals every process of a job step, workers and the fork server included; only
# the trainer may decide to stop (facedist.preemption), so both ignore SIGUSR1/SIGTERM, and SIGINT (Ctrl-C
# reaches the whole foreground process group). A hung worker is still ended by the DataLoader's terminate(),
# which sends SIGKILL here instead of the ignored SIGTERM.
# A worker's parent is the fork server, which lives as long as any worker does, so neither torch's
# watchdog (it watches the parent) nor PR_SET_PDEATHSIG notice a dead trainer: each worker watches the
# trainer itself (a pidfd) and exits with it.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class _WorkerPopen(popen_forkserver.Popen):
    def terminate(self) -> None:  # workers ignore SIGTERM: the DataLoader's and multiprocessing's exit-time
        self.kill()  # terminate() of a live or hung worker must still end it

    def _launch(self, process_obj) -> None:
        prepare = spawn.get_preparation_data
        spawn.get_preparation_data = functools.partial(_without_main_module, prepare)
        try:
            super()._launch(process_obj)
        finally:
            spawn.get_preparation_data = prepare


def _without_main_module(prepare, name: str) -> dict:
    """A worker's start-up data without the main module: a worker runs facedist's own classes, which the fork
    server has imported (`set_forkserver_preload`); by default each worker would run the main module again,
    importing everything the trainer imports (timm, accelerate, DeepSpeed: seconds and memory per worker, at
    every loader's start: each evaluation's). Python 3.11's fork server cannot preload `__main__` itself."""
    data = prepare(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


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
    forkserver.set_forkserver_preload([__name__])  # torch, numpy, OpenCV: imported once, forked into each worker
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
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "multiprocessing_context": WORKER_CONTEXT if num_workers > 0 else None,
        "worker_init_fn": functools.partial(_init_worker, trainer=os.getpid()) if num_workers > 0 else None,
    }


def normalise(pixels: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """uint8 [3, S, S] -> float, scaled to [0, 1] and normalised with the checkpoint's mean / std."""
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


_warned_resize: set = set()


def warn_if_resized(root, image_size: int, size: int) -> None:
    """One line, once per shard folder and size, when shards are not at the model's size."""
    if image_size != size and (str(root), size) not in _warned_resize:
        _warned_resize.add((str(root), size))
        print(
            f"facedist: {root} holds {image_size}x{image_size} images, the model takes {size}x{size}: each image "
            f"is resized as the shard builder does (centre crop, bicubic); rebuild the shards at {size} px "
            "to save that work",
            file=sys.stderr,
        )


class TrainBatch(NamedTuple):
    """One rank's batch as it leaves the loader (pinned when CUDA is there); None: not used by this path."""

    images: torch.Tensor | None  # [B, 3, S, S] uint8, already warped (CPU decode)
    encoded: list | None  # B encoded JPEGs, uint8 tensors (GPU decode)
    theta: torch.Tensor | None  # [B, 2, 3] float32 affine_grid theta of each warp (GPU decode)
    labels: torch.Tensor  # [B] int64
    photometric: torch.Tensor  # [B, 6] float32 factors (augment.PHOTOMETRIC), shading slopes
    gamma_tables: torch.Tensor | None  # [B, 256] uint8 (when data.augment.gamma > 0)
    samples: torch.Tensor  # [B] int64 sample indices (to name a bad image)


class FaceDataset(Dataset):
    """Map-style over a ShardIndex. Item `sample`: (normalised float [3, S, S], label), un-augmented;
    item `(sample, aug_seed)`: a training item for `collate_train` (warped uint8, or encoded bytes)."""

    def __init__(self, index, preprocessing: dict, augment: AugmentConfig | None = None, gpu_decode: bool = False):
        self.index, self.preprocessing, self.gpu_decode = index, preprocessing, gpu_decode
        self.augment = augment or AugmentConfig()
        self.size = int(preprocessing["image_size"])

    def __len__(self) -> int:
        return self.index.num_samples

    def sample_name(self, sample: int) -> str:
        return self.index.sample_name(sample)

    def decode(self, sample: int) -> np.ndarray:
        """RGB uint8 [H, W, 3] of `sample`; one ShardError naming shard, sample and cause when it is damaged."""
        try:
            return decode_rgb(self.index.read_image_bytes(sample))
        except DecodeError as err:
            raise ShardError(f"{self.sample_name(sample)}: {err}") from None

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            pixels = to_model_size(self.decode(item), self.size)
            return normalise(torch.from_numpy(pixels).permute(2, 0, 1), self.preprocessing), int(
                self.index.labels[item]
            )
        sample, aug_seed = item
        label = int(self.index.labels[sample])
        if self.gpu_decode:
            source = (self.index.image_size, self.index.image_size)
            draw = aug.draw(aug_seed, self.augment, source, self.size)
            encoded = torch.frombuffer(bytearray(self.index.read_image_bytes(sample)), dtype=torch.uint8)
            return None, encoded, aug.grid_theta(draw.matrix, source, self.size), label, draw, sample
        # the image-size rule first (as eval and inference do), then the warp at the model's size
        pixels = to_model_size(self.decode(sample), self.size)
        draw = aug.draw(aug_seed, self.augment, pixels.shape[:2], self.size)
        return aug.warp(pixels, draw.matrix, self.size), None, None, label, draw, sample


def collate_train(items) -> TrainBatch:
    images, encoded, theta, labels, draws, samples = zip(*items)
    gamma = (
        torch.from_numpy(np.stack([aug.gamma_table(d.photometric[3]) for d in draws]))
        if any(d.photometric[3] != 1 for d in draws)
        else None
    )
    return TrainBatch(
        images=torch.from_numpy(np.stack(images)) if images[0] is not None else None,
        encoded=list(encoded) if encoded[0] is not None else None,
        theta=torch.from_numpy(np.stack(theta)).float() if theta[0] is not None else None,
        labels=torch.tensor(labels, dtype=torch.int64),
        photometric=torch.from_numpy(np.stack([d.photometric for d in draws])),
        gamma_tables=gamma,
        samples=torch.tensor(samples, dtype=torch.int64),
    )


def make_train_loader(
    index, cfg: DataConfig, preprocessing: dict, world_size: int, rank: int, seed: int, start_step: int = 0
) -> DataLoader:
    """Endless loader of this rank's TrainBatch per step, starting at `start_step`; turn each into model
    input with `device_augment.DeviceAugment(loader.dataset, device)`."""
    from facedist.data import gpu_decode

    sampler = make_batch_sampler(index, cfg, world_size, rank, seed, start_step)
    use_gpu = cfg.decode == "gpu" and gpu_decode.use_gpu_decode(index.image_format)
    warn_if_resized(index.root, index.image_size, int(preprocessing["image_size"]))
    dataset = FaceDataset(index, preprocessing, cfg.augment, gpu_decode=use_gpu)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_train,
        prefetch_factor=4 if cfg.num_workers else None,
        **loader_kwargs(cfg.num_workers),
    )


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


def make_eval_loader(
    index,
    preprocessing: dict,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    max_images: int = 0,
    num_workers: int = 0,
    samples=None,
) -> DataLoader:
    """(images, labels, sample indices) of this rank's share of the split (or of `samples` when given),
    un-augmented; gather across ranks after."""
    warn_if_resized(index.root, index.image_size, int(preprocessing["image_size"]))
    if samples is None:
        samples = eval_samples(index, world_size, rank, max_images)
    items = _EvalItems(FaceDataset(index, preprocessing), np.asarray(samples))
    return DataLoader(items, batch_size=batch_size, **loader_kwargs(num_workers))
