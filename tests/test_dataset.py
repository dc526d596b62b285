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
from facedist.data.dataset import (
    WORKER_CONTEXT,
    FaceDataset,
    collate_train,
    loader_kwargs,
    make_eval_loader,
    make_train_loader,
)
from facedist.data.device_augment import DeviceAugment
from facedist.data.index import ShardIndex
from facedist.data.shards import ShardError
from facedist.inference import preprocess

PREP = {"image_size": 24, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
# every option on: warp (crop, shift, rotation, flip) and all photometric factors, gamma's table and shading included
FULL = AugmentConfig(
    crop_scale_min=0.8,
    translate=0.05,
    rotation=15,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    gamma=0.2,
    shading=0.7,
)


class FakeIndex:
    """ShardIndex's reading API over PNGs made here: 6 identities, uneven image counts, 24 px like PREP."""

    root, image_size, image_format = "fake", 24, "png"

    def __init__(self):
        sizes = [3, 5, 2, 4, 6, 3]
        self.labels = np.repeat(np.arange(len(sizes)), sizes)
        self.class_offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_samples, self.num_classes = len(self.labels), len(sizes)
        rng = np.random.default_rng(0)
        self._images = []
        for _ in range(self.num_samples):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
            self._images.append(buffer.getvalue())

    def read_image_bytes(self, i):
        return self._images[i]

    def sample_name(self, i):
        return f"fake sample {i}"


def _model_input(loader_or_dataset, batch):
    dataset = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    return DeviceAugment(dataset, "cpu")(batch)


def test_augmentation_is_keyed_by_aug_seed_only():
    dataset = FaceDataset(FakeIndex(), PREP, FULL)
    a = _model_input(dataset, collate_train([dataset[(4, 123)]]))[0]
    torch.manual_seed(999)  # the global RNG must not matter
    np.random.seed(5)
    state = torch.get_rng_state()
    b, labels = _model_input(dataset, collate_train([dataset[(4, 123)]]))
    assert torch.equal(torch.get_rng_state(), state)  # nor be disturbed
    c = _model_input(dataset, collate_train([dataset[(4, 124)]]))[0]
    assert a.shape == (1, 3, 24, 24) and labels.tolist() == [1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_items_are_normalised_exactly_like_inference():
    index = FakeIndex()
    image, _ = FaceDataset(index, PREP)[0]
    decoded = Image.open(io.BytesIO(index.read_image_bytes(0)))
    raw = torch.from_numpy(np.array(decoded)).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(PREP["mean"]).view(3, 1, 1)) / torch.tensor(PREP["std"]).view(3, 1, 1)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    # the model is evaluated during training on exactly the tensors inference will feed it
    assert torch.equal(image, preprocess(decoded, PREP))


def test_un_augmented_training_batch_is_the_eval_tensor():
    index = FakeIndex()
    dataset = FaceDataset(index, PREP, AugmentConfig(hflip=False))
    images, _ = _model_input(dataset, collate_train([dataset[(3, 9)], dataset[(5, 1)]]))
    torch.testing.assert_close(images, torch.stack([dataset[3][0], dataset[5][0]]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_train_loader_same_tensors_for_any_workers_and_world_size(workers):
    index = FakeIndex()
    single = make_train_loader(
        index, DataConfig(classes_per_batch=4, images_per_class=2, num_workers=0, augment=FULL), PREP, 1, 0, 7
    )
    expected = [_model_input(single, batch) for _, batch in zip(range(3), single)]
    cfg = DataConfig(classes_per_batch=2, images_per_class=2, num_workers=workers, augment=FULL)
    ranks = [make_train_loader(index, cfg, PREP, 2, r, 7) for r in range(2)]
    for (images, labels), parts in zip(expected, zip(*ranks)):
        parts = [_model_input(ranks[0], p) for p in parts]
        assert parts[0][0].dtype == torch.float32
        assert torch.equal(images, torch.cat([p[0] for p in parts]))  # bit-exact, photometric included
        assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_batches_travel_as_uint8():
    loader = make_train_loader(
        FakeIndex(), DataConfig(classes_per_batch=2, images_per_class=2, num_workers=0, augment=FULL), PREP, 1, 0, 1
    )
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 24, 24)
    assert batch.gamma_tables.dtype == torch.uint8 and batch.photometric.shape == (4, 6)


def test_train_loader_resumes_at_start_step():
    index = FakeIndex()
    cfg = DataConfig(classes_per_batch=2, images_per_class=2, num_workers=0, augment=FULL)
    straight = [b for _, b in zip(range(4), make_train_loader(index, cfg, PREP, 1, 0, 3))]
    resumed = [b for _, b in zip(range(2), make_train_loader(index, cfg, PREP, 1, 0, 3, start_step=2))]
    for a, b in zip(straight[2:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.photometric, b.photometric)


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


@pytest.mark.integration
def test_real_shards_train_and_eval(synth_shards):
    train, val = ShardIndex(synth_shards, "train"), ShardIndex(synth_shards, "val")
    prep = {**PREP, "image_size": train.image_size}
    loader = make_train_loader(train, DataConfig(classes_per_batch=3, images_per_class=2, num_workers=2), prep, 2, 1, 5)
    batch = next(iter(loader))  # decoded in worker processes from the tars
    items = loader.batch_sampler.batch(0)
    assert batch.labels.tolist() == [int(train.labels[s]) for s, _ in items]
    in_process = collate_train([loader.dataset[item] for item in items])
    assert torch.equal(batch.images, in_process.images)
    seen = [s for rank in range(2) for _, _, b in make_eval_loader(val, prep, 5, 2, rank) for s in b.tolist()]
    assert sorted(seen) == list(range(val.num_samples))


def test_other_size_shards_are_resized_alike_in_train_eval_and_inference(synth_shards, capsys):
    from facedist.inference import ImageDataset, ShardImages

    val = ShardIndex(synth_shards, "val")  # 32 px shards, a 48 px model
    prep = {**PREP, "image_size": 48}
    evaluated = torch.cat([images for images, _, _ in make_eval_loader(val, prep, 8)])
    images = ShardImages(val, 48)
    inferred = torch.stack([ImageDataset(images, prep)[i][0] for i in range(len(images))])
    assert evaluated.shape[-2:] == (48, 48) and torch.equal(evaluated, inferred)
    loader = make_train_loader(
        val,
        DataConfig(classes_per_batch=2, images_per_class=2, num_workers=0, augment=AugmentConfig(hflip=False)),
        prep,
        1,
        0,
        0,
    )
    batch = next(iter(loader))
    trained = _model_input(loader, batch)[0]  # un-augmented training input = the eval tensor of the same sample
    torch.testing.assert_close(trained, evaluated[batch.samples], rtol=0, atol=1e-5)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "resized" in line]
    assert len(warnings) == 1 and "32x32" in warnings[0]  # once, whoever resizes


def test_corrupt_image_names_shard_sample_and_cause(synth_shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(synth_shards, copy)
    index = ShardIndex(copy, "train")
    row = index._rows[5]
    path = copy / f"train-{int(row['shard']):06d}.tar"
    data = bytearray(path.read_bytes())
    offset, size = int(row["offset"]), int(row["size"])
    data[offset + size // 2 : offset + size] = b"\0" * (size - size // 2)  # the second half of the JPEG zeroed
    path.write_bytes(bytes(data))
    dataset = FaceDataset(ShardIndex(copy, "train"), {**PREP, "image_size": 32}, FULL)
    for item in (5, (5, 1)):  # eval and train items
        with pytest.raises(ShardError) as err:
            dataset[item]
        message = str(err.value)
        assert str(path) in message and "sample 5" in message and "corrupt JPEG" in message and "\n" not in message


def test_gpu_decode_falls_back_to_the_cpu_with_one_line(capsys):
    index = FakeIndex()  # png shards, and no CUDA here: either reason falls back
    cfg = DataConfig(classes_per_batch=2, images_per_class=2, num_workers=0, augment=FULL)
    gpu = make_train_loader(index, DataConfig(**{**cfg.__dict__, "decode": "gpu"}), PREP, 1, 0, 3)
    lines = [line for line in capsys.readouterr().err.splitlines() if "data.decode=gpu" in line]
    assert len(lines) == 1 and "decoding on the CPU" in lines[0]
    cpu = make_train_loader(index, cfg, PREP, 1, 0, 3)
    for a, b in zip(gpu, cpu):
        assert torch.equal(_model_input(gpu, a)[0], _model_input(cpu, b)[0])
        break


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
@pytest.mark.integration
def test_loader_workers_and_fork_server_survive_stop_signals_and_end_with_the_loader(synth_shards, kind):
    """Slurm signals every process of a step: the workers and their fork server must go on; shutdown ends them."""
    if kind == "train":
        loader = make_train_loader(
            ShardIndex(synth_shards, "train"),
            DataConfig(classes_per_batch=2, images_per_class=2, num_workers=2),
            PREP,
            1,
            0,
            seed=0,
        )
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


@pytest.mark.integration
def test_workers_exit_when_the_trainer_dies(synth_shards):
    proc = subprocess.run(
        [sys.executable, "-c", _ORPHAN.format(PREP=PREP), str(synth_shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    workers = [int(pid) for pid in proc.stdout.split()]
    assert len(workers) == 2 and all(_gone(pid) for pid in workers)


def test_undecodable_image_reason_holds_no_object_repr():
    from facedist.data.decode import DecodeError, decode_rgb

    with pytest.raises(DecodeError) as err:
        decode_rgb(b"\x89PNG but not really an image")
    assert "object at 0x" not in str(err.value) and "Pillow cannot identify it" in str(err.value)


_MAIN = """
import sys
with open(sys.argv[2], "a") as runs:  # once per process that runs this file as a module
    print("ran", file=runs)
if __name__ == "__main__":
    from facedist.data.dataset import make_eval_loader
    from facedist.data.index import ShardIndex
    for _ in range(2):  # two loaders: workers are started twice, as each evaluation does
        assert len(list(make_eval_loader(ShardIndex(sys.argv[1], "val"), {PREP!r}, batch_size=2, num_workers=2))) > 1
"""


@pytest.mark.integration
def test_workers_do_not_run_the_main_module_again(synth_shards, tmp_path):
    """A worker needs facedist's modules only: re-running the trainer's main module in each (Python's default
    under forkserver) imported timm, Accelerate and DeepSpeed again, seconds at every loader's start."""
    main, runs = tmp_path / "trainer_main.py", tmp_path / "runs.txt"
    main.write_text(_MAIN.format(PREP=PREP))
    proc = subprocess.run([sys.executable, str(main), str(synth_shards), str(runs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert runs.read_text().splitlines() == ["ran"]
