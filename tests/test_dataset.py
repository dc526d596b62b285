import io
import itertools
import os
import signal
import subprocess
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facedist.config import AugmentConfig, DataConfig
from facedist.data.dataset import (WORKER_CONTEXT, FaceDataset, build_transforms, loader_kwargs, make_eval_loader,
                                   make_train_loader)
from facedist.data.index import ShardIndex
from facedist.inference import preprocess

PREP = {"image_size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class FakeIndex:
    """ShardIndex's reading API over PNGs made here: 6 identities, uneven image counts."""

    def __init__(self):
        sizes = [3, 5, 2, 4, 6, 3]
        self.labels = np.repeat(np.arange(len(sizes)), sizes)
        self.class_offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_samples, self.num_classes = len(self.labels), len(sizes)
        rng = np.random.default_rng(0)
        self._images = []
        for _ in range(self.num_samples):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
            self._images.append(buffer.getvalue())

    def read_image_bytes(self, i):
        return self._images[i]


def test_augmentation_is_keyed_by_aug_seed_only():
    index = FakeIndex()
    dataset = FaceDataset(index, build_transforms(AugmentConfig(), 24, PREP["mean"], PREP["std"], train=True))
    a, label = dataset[(4, 123)]
    torch.manual_seed(999)  # the global RNG must not matter
    state = torch.get_rng_state()
    b, _ = dataset[(4, 123)]
    assert torch.equal(torch.get_rng_state(), state)  # nor be disturbed
    c, _ = dataset[(4, 124)]
    assert a.shape == (3, 24, 24) and label == 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_transform_resizes_and_normalises_like_inference():
    index = FakeIndex()
    dataset = FaceDataset(index, build_transforms(AugmentConfig(), 24, PREP["mean"], PREP["std"], train=False))
    image, _ = dataset[0]
    decoded = Image.open(io.BytesIO(index.read_image_bytes(0)))
    raw = torch.from_numpy(np.array(decoded.resize((24, 24), Image.BILINEAR)))
    assert image.shape == (3, 24, 24)
    expected = (raw.permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert (image - expected).abs().mean() < 0.05
    # the model is evaluated during training on exactly the tensors inference will feed it
    torch.testing.assert_close(image, preprocess(decoded, PREP), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_same_tensors_for_any_workers_and_world_size(workers):
    index = FakeIndex()
    single = make_train_loader(index, DataConfig(classes_per_batch=4, images_per_class=2, num_workers=0), PREP, 1, 0, 7)
    expected = [batch for _, batch in zip(range(3), single)]
    cfg = DataConfig(classes_per_batch=2, images_per_class=2, num_workers=workers)
    ranks = [make_train_loader(index, cfg, PREP, 2, r, 7) for r in range(2)]
    for (images, labels), parts in zip(expected, zip(*ranks)):
        assert torch.equal(images, torch.cat([p[0] for p in parts]))
        assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_train_loader_resumes_at_start_step():
    index = FakeIndex()
    cfg = DataConfig(classes_per_batch=2, images_per_class=2, num_workers=0)
    straight = [b for _, b in zip(range(4), make_train_loader(index, cfg, PREP, 1, 0, 3))]
    resumed = [b for _, b in zip(range(2), make_train_loader(index, cfg, PREP, 1, 0, 3, start_step=2))]
    for (a, la), (b, lb) in zip(straight[2:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_loader_covers_each_sample_once(world):
    index = FakeIndex()
    whole = torch.cat([images for images, _, _ in make_eval_loader(index, PREP, 4)])
    seen = []
    for rank in range(world):
        for images, labels, samples in make_eval_loader(index, PREP, 4, world, rank):
            assert torch.equal(labels, torch.as_tensor(index.labels[samples.numpy()]))
            assert torch.equal(images, whole[samples])  # the same tensors whichever rank embeds them
            seen += samples.tolist()
    assert sorted(seen) == list(range(index.num_samples))
    limited = [s for _, _, b in make_eval_loader(index, PREP, 4, 1, 0, max_images=7) for s in b.tolist()]
    assert limited == list(range(7))


def test_real_shards_train_and_eval(synth_shards):
    train, val = ShardIndex(synth_shards, "train"), ShardIndex(synth_shards, "val")
    prep = {**PREP, "image_size": train.image_size}
    loader = make_train_loader(train, DataConfig(classes_per_batch=3, images_per_class=2, num_workers=2), prep, 2, 1, 5)
    images, labels = next(iter(loader))  # decoded in worker processes from the tars
    items = loader.batch_sampler.batch(0)
    assert labels.tolist() == [int(train.labels[s]) for s, _ in items]
    assert torch.equal(images, torch.stack([loader.dataset[item][0] for item in items]))  # same as in-process
    seen = [s for rank in range(2) for _, _, b in make_eval_loader(val, prep, 5, 2, rank) for s in b.tolist()]
    assert sorted(seen) == list(range(val.num_samples))


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """True once `pid` has exited (it may be another process's child: look at /proc, zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_loader_workers_and_fork_server_survive_stop_signals_and_end_with_the_loader(synth_shards, kind):
    """Slurm signals every process of a step: the workers and their fork server must go on; shutdown ends them."""
    if kind == "train":
        loader = make_train_loader(ShardIndex(synth_shards, "train"), DataConfig(classes_per_batch=2, images_per_class=2,
                                                                                 num_workers=2), PREP, 1, 0, seed=0)
    else:
        loader = make_eval_loader(ShardIndex(synth_shards, "val"), PREP, batch_size=2, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in batches._workers]
    for pid in [*workers, forkserver._forkserver._forkserver_pid]:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)  # signals are delivered asynchronously
    assert len(list(itertools.islice(batches, 8))) == 8  # every worker served again (eval: 11 batches left)
    assert all(not _gone(pid, timeout=0) for pid in workers)
    del batches  # the DataLoader's shutdown still ends them
    assert all(_gone(pid) for pid in workers)


def test_a_hung_worker_is_still_ended_by_terminate():
    loader_kwargs(1)  # the fork server, started with the stop signals blocked
    worker = WORKER_CONTEXT.Process(target=time.sleep, args=(60,))
    worker.start()
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(1.0)
    assert worker.is_alive()  # SIGTERM does not end a worker...
    worker.terminate()  # ...what the DataLoader sends a hung one does
    worker.join(10.0)
    assert worker.exitcode == -signal.SIGKILL


_ORPHAN = """
import os, signal, sys
from facedist.data.dataset import make_eval_loader
from facedist.data.index import ShardIndex
batches = iter(make_eval_loader(ShardIndex(sys.argv[1], "val"), {PREP!r}, batch_size=2, num_workers=2))
next(batches)
print(" ".join(str(w.pid) for w in batches._workers), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_the_trainer_dies(synth_shards):
    proc = subprocess.run([sys.executable, "-c", _ORPHAN.format(PREP=PREP), str(synth_shards)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    workers = [int(pid) for pid in proc.stdout.split()]
    assert len(workers) == 2 and all(_gone(pid) for pid in workers)
