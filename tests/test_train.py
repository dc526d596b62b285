"""The trainer end to end: distributed equivalence, step-exact resume, bad configs, non-finite stops."""

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import TINY_MODEL_OVERRIDES

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "facedist" / "train.py")
TINY = [
    *TINY_MODEL_OVERRIDES,
    "data.num_workers=0",
    "train.log_every=1",
    "eval.every=0",
    "checkpoint.every=0",
    "optim.lr=1e-3",
]


def _synth_shards(root, identities, images, size, seed, *build):
    """root/shards from `facedist-shards synth` + `build` (png, no test split)."""
    cli = [sys.executable, "-m", "facedist.data.cli"]
    subprocess.run(
        [
            *cli,
            "synth",
            str(root / "faces"),
            "--identities",
            str(identities),
            "--images-per-identity",
            str(images),
            "--size",
            str(size),
            "--seed",
            str(seed),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *cli,
            "build",
            str(root / "faces"),
            str(root / "shards"),
            "--size",
            str(size),
            "--format",
            "png",
            "--test-identities",
            "0",
            "--quiet",
            *build,
        ],
        check=True,
        capture_output=True,
    )
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _synth_shards(tmp_path_factory.mktemp("train_data"), 24, 5, 32, 3, "--val-identities", "6")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONHASHSEED": "0"}


def _launcher(nproc: int) -> list[str]:
    """The command that starts the trainer: itself for one process, torch's launcher for several."""
    if nproc == 1:
        return [sys.executable, TRAIN]
    distributed = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_port())]
    return [sys.executable, *distributed, TRAIN]


def train(args, nproc=1, check=True):
    launcher = _launcher(nproc)
    proc = subprocess.run([*launcher, *args], env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _port():
    from dist_utils import free_port

    return free_port()


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    latest = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
    return load_file(str(latest / "train_model.safetensors")), load_file(str(latest / "model.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "optim",
    [["optim.name=adamw_cosine", "optim.ema_decay=0.9"], ["optim.name=radam_schedulefree"]],
    ids=["adamw_cosine_ema", "radam_schedulefree"],
)
def test_two_processes_equal_one_with_the_same_global_batch(shards, tmp_path, optim):
    common = [
        *TINY,
        f"data.shards={shards}",
        "model.bn=frozen",
        "data.images_per_class=3",
        "train.max_steps=4",
        *optim,
        "loss.miner=semihard",
        "loss.pair_margin=0.3",
        # Adam-type steps normalise tiny gradients, so summation-order noise can move a weight by up
        # to ~lr: a small lr keeps that below atol while real errors (e.g. a x W gradient) are not
        "optim.lr=1e-4",
    ]
    train([*common, "data.classes_per_batch=4", f"output_dir={tmp_path / 'one'}"])
    train([*common, "data.classes_per_batch=2", f"output_dir={tmp_path / 'two'}"], nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert len({r["loss"] for r in one}) > 1  # the loss moves: the comparison means something
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        # Adam ignores a constant gradient scale, so compare the gradient itself: a loss mis-scaled by W
        # (see test_losses.py::test_mis_scaled_loss_is_caught) shows up here as a W-fold norm
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for weights_one, weights_two in zip(final_weights(tmp_path / "one"), final_weights(tmp_path / "two")):
        for key in weights_one:
            torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_mid_epoch_is_step_exact(shards, tmp_path):
    """2N steps straight vs N steps + resume from the step-N checkpoint, with workers and evaluation on."""
    common = [
        *TINY,
        f"data.shards={shards}",
        "data.num_workers=2",
        "data.classes_per_batch=4",
        "data.images_per_class=2",
        "train.max_steps=10",
        "eval.every=3",
        "checkpoint.every=5",
        "eval.bn_recal_batches=2",
    ]
    straight = tmp_path / "straight"
    train([*common, f"output_dir={straight}"])
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000010")  # as if killed after the step-5 checkpoint
    out = train([*common, f"output_dir={resumed}", "--resume", "auto"])
    assert "resumed from" in out.stdout + out.stderr and "step 5" in out.stdout + out.stderr

    def stable(records):  # timing fields differ between runs
        return [
            {k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_fraction", "memory_mb", "val_time_s")}
            for r in records
        ]

    a, b = stable(metrics(straight)), stable(metrics(resumed))
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no duplicated steps from the first run
    assert any("val_auc" in r for r in a if r["step"] > 5)
    assert a == b
    for x, y in zip(final_weights(straight), final_weights(resumed)):
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_the_weight_average_is_exported_and_resumes_exactly(shards, tmp_path):
    """optim.ema_decay: the checkpoint's embedding weights are the average, and a resumed run continues it."""
    common = [
        *TINY,
        f"data.shards={shards}",
        "optim.name=adamw_cosine",
        "optim.ema_decay=0.9",
        "data.classes_per_batch=4",
        "data.images_per_class=2",
        "train.max_steps=6",
        "checkpoint.every=3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train([*common, f"output_dir={straight}"])
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    out = train([*common, f"output_dir={resumed}", "--resume", "auto"])
    assert "at step 3" in out.stdout + out.stderr
    trained, exported = final_weights(straight)
    assert any(not torch.equal(exported[k], trained[k]) for k in trained)
    for x, y in zip(final_weights(straight), final_weights(resumed)):
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.slow
def test_compiled_model_trains_like_eager(shards, tmp_path):
    common = [*TINY, f"data.shards={shards}", "train.max_steps=3", "eval.every=3"]
    train([*common, f"output_dir={tmp_path / 'eager'}"])
    train([*common, "model.compile=true", f"output_dir={tmp_path / 'compiled'}"])
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")):
        for key in ("loss", "grad_norm", "val_auc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


def test_non_finite_steps_stop_training(shards, tmp_path):
    proc = train(
        [
            *TINY,
            f"data.shards={shards}",
            "optim.name=sgd_schedulefree",
            "optim.lr=1e30",
            "train.max_nonfinite_steps=2",
            "train.max_steps=8",
            f"output_dir={tmp_path}",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "2 non-finite steps in a row" in proc.stderr
    assert "step skipped (1 in a row)" in proc.stdout + proc.stderr


def test_bf16_mixed_precision_trains(shards, tmp_path):
    # 4 x 2 images a step: bfloat16 convolutions on a CPU are slow (31 s at the default 8 x 4, 7 s here)
    small = ["data.classes_per_batch=4", "data.images_per_class=2", "train.max_steps=3"]
    train([*TINY, *small, f"data.shards={shards}", "train.mixed_precision=bf16", f"output_dir={tmp_path}"])
    records = metrics(tmp_path)
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    train_weights, _ = final_weights(tmp_path)
    assert all(v.dtype == torch.float32 for k, v in train_weights.items() if v.is_floating_point())


@pytest.mark.distributed
def test_adarand_fine_tuning_is_the_same_on_two_processes_and_after_resharding(shards, tmp_path):
    """AdaRand from a pretrained file: 4 steps on 1 process == 3 steps on 2 + resume on 1 (its sharded
    class means and their optimizer saved by 2 ranks, loaded by 1)."""
    import timm

    pretrained = tmp_path / "pretrained.pt"
    torch.manual_seed(7)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), pretrained)
    common = [
        *TINY,
        f"data.shards={shards}",
        "model.bn=frozen",
        "data.images_per_class=3",
        "optim.lr=1e-4",
        f"model.pretrained={pretrained}",
        "loss.adarand=true",
        "loss.adarand_lambda=0.5",
        "checkpoint.every=3",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train([*common, "data.classes_per_batch=4", "train.max_steps=4", f"output_dir={straight}"])
    train([*common, "data.classes_per_batch=2", "train.max_steps=3", f"output_dir={split}"], nproc=2)
    assert (split / "checkpoints" / "step_00000003" / "adarand" / "rank_00001.safetensors").is_file()
    out = train([*common, "data.classes_per_batch=4", "train.max_steps=4", f"output_dir={split}", "--resume", "auto"])
    assert "resumed from" in out.stdout + out.stderr
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(r["adarand_loss"] > 0 for r in a) and len({r["adarand_loss"] for r in a}) > 1
    for x, y in zip(a, b):
        for key in ("loss", "pair_loss", "adarand_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def _train_fp16_on_cpu(args, init_scale):
    runner = [sys.executable, str(REPO / "tests" / "fp16_on_cpu.py"), str(init_scale)]
    proc = subprocess.run([*runner, *args], env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def test_fp16_with_loss_scaling_tracks_fp32_and_skips_overflows_without_counting_them(shards, tmp_path):
    """Accelerate's fp16 path (float16 autocast + GradScaler), run on the CPU by tests/fp16_on_cpu.py, with
    the sharded head: close to fp32 but not equal (fp16 really ran); with a huge initial scale the first
    steps overflow and are skipped by the scaler, never counted as non-finite steps, and training goes on."""
    # 2 x 2 images a step: float16 convolutions on a CPU are slow (this test: 330 s at 8 x 4, 76 s at 2 x 2)
    common = [
        *TINY,
        f"data.shards={shards}",
        "loss.head=arcface",
        "loss.scale=16",
        "train.max_nonfinite_steps=2",
        "data.classes_per_batch=2",
        "data.images_per_class=2",
    ]
    train([*common, "train.max_steps=5", f"output_dir={tmp_path / 'fp32'}"])
    _train_fp16_on_cpu(
        [*common, "train.mixed_precision=fp16", "train.max_steps=5", f"output_dir={tmp_path / 'fp16'}"],
        init_scale=2.0**8,
    )
    fp32, fp16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "fp16")
    # RAdam leaves the weights alone for its first steps: there only the forward's precision differs
    for a, b in zip(fp32[:4], fp16[:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=2e-2
        )
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32, fp16))
    state = torch.load(
        sorted((tmp_path / "fp16" / "checkpoints").glob("step_*"))[-1] / "train_state.pt", weights_only=True
    )
    assert state["scaler"]["scale"] == 2.0**8  # no overflow at this scale, and the scaler's state is saved
    train_weights, _ = final_weights(tmp_path / "fp16")
    assert all(v.dtype == torch.float32 for v in train_weights.values() if v.is_floating_point())

    out = _train_fp16_on_cpu(
        [*common, "train.mixed_precision=fp16", "train.max_steps=16", f"output_dir={tmp_path / 'overflow'}"],
        init_scale=2.0**24,
    )
    records = metrics(tmp_path / "overflow")
    assert len(records) == 16 and "non-finite" not in out.stdout + out.stderr
    assert all(r["nonfinite_in_a_row"] == 0 for r in records)
    skipped = [r["step"] for r in records if not math.isfinite(r["grad_norm"])]
    assert skipped[:1] == [1] and len(skipped) < 16  # the first steps overflow, then training steps
    state = torch.load(
        sorted((tmp_path / "overflow" / "checkpoints").glob("step_*"))[-1] / "train_state.pt", weights_only=True
    )
    assert state["scaler"]["scale"] == 2.0 ** (24 - len(skipped))  # halved once per skipped step


# --- the fine-tuning recipe (configs/faces_finetune.yaml): its own loss, augmentation and flip TTA, a tiny network


def test_faces_finetune_recipe_trains_and_its_checkpoint_embeds_with_flip(shards, tmp_path):
    import numpy as np

    from facedist.inference_cli import embed_main

    out = tmp_path / "run"
    train(
        [
            "--config",
            str(REPO / "configs" / "faces_finetune.yaml"),
            f"data.shards={shards}",
            *TINY_MODEL_OVERRIDES,
            "model.channels_last=false",
            "data.num_workers=0",
            "train.max_steps=6",
            "train.log_every=1",
            "eval.every=0",
            f"output_dir={out}",
        ]
    )
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) and v > 0 for v in losses)
    assert any((out / "checkpoints").glob("step_*/head"))  # the margin head's rows are checkpointed
    vectors = {}
    for name, args in (("default", []), ("flip", ["--flip"]), ("plain", ["--no-flip"])):
        embed_main(
            [
                "--checkpoint",
                str(out),
                "--folder",
                str(shards.parent / "faces"),
                "--out",
                str(tmp_path / f"{name}.npz"),
                "--num-workers",
                "0",
                "--cpu",
                *args,
            ]
        )
        vectors[name] = np.load(tmp_path / f"{name}.npz")["embeddings"]
    assert np.array_equal(vectors["default"], vectors["flip"])  # the recipe's eval.flip, recorded in the checkpoint
    assert not np.allclose(vectors["default"], vectors["plain"])


# --- the InsightFace recipe (configs/ms1mv3_r50.yaml) on CPU: a 1/8-width IResNet-18, synthetic faces, a .bin

RECIPE = str(REPO / "configs" / "ms1mv3_r50.yaml")


@pytest.fixture(scope="module")
def recipe_run(shards, tmp_path_factory):
    """The recipe's config, only what a CPU needs changed: the network, the data, the length, fp32."""
    from facedist.evaluation.bins import write_bin_from_folder

    root = tmp_path_factory.mktemp("recipe")
    lfw = write_bin_from_folder(shards.parent / "faces", root / "lfw.bin", num_pairs=40, seed=1)
    out = root / "run"
    overrides = [
        f"data.shards={shards}",
        "model.backbone=iresnet18_narrow",
        "data.batch_size=16",
        "data.num_workers=0",
        "train.max_steps=12",
        "train.log_every=1",
        "train.mixed_precision=no",
        "eval.every=12",
        "eval.max_images=0",
        f"eval.bins=[{lfw}]",
        "checkpoint.every=0",
        f"output_dir={out}",
    ]
    proc = train(["--config", RECIPE, *overrides])
    return out, overrides, proc


def test_recipe_smoke_run_learns_and_logs_a_bin_accuracy(recipe_run):
    out, _, _ = recipe_run
    records = metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses  # falling
    final = records[-1]
    assert final["step"] == 12 and 0.0 <= final["lfw_acc"] <= 1.0 and "val_auc" in final
    assert records[1]["lr"] == pytest.approx(0.1 * (1 - 1 / 12) ** 2)  # logged after step 1: polynomial decay


def test_init_from_starts_a_new_run_from_the_evaluation_weights_and_resume_wins(recipe_run, tmp_path):
    source, overrides, _ = recipe_run
    fine_tune = [
        *overrides[:-1],
        "train.max_steps=1",
        "eval.every=1",
        f"output_dir={tmp_path / 'ft'}",
        f"model.init_from={source}",
    ]
    proc = train(["--config", RECIPE, *fine_tune])
    assert f"starting from the embedding model of {source}" in proc.stdout + proc.stderr
    first = metrics(tmp_path / "ft")[0]
    assert first["step"] == 0 and first["val_auc"] == metrics(source)[-1]["val_auc"]  # same weights, same data
    assert first["lfw_acc"] == metrics(source)[-1]["lfw_acc"]
    again = train(["--config", RECIPE, *fine_tune, "--resume", "auto"])  # finds step 1: nothing left to train
    log = again.stdout + again.stderr
    assert "resumed from" in log and f"model.init_from={source} ignored: resuming this run's checkpoint wins" in log


def test_init_from_a_backbone_file_and_a_bad_one(recipe_run, tmp_path):
    source, overrides, _ = recipe_run
    backbone = {
        k.removeprefix("backbone."): v
        for k, v in load_file(str(sorted((source / "checkpoints").glob("step_*"))[-1] / "model.safetensors")).items()
    }
    torch.save(backbone, tmp_path / "backbone.pth")  # as InsightFace releases them: the backbone's state dict
    common = [*overrides[:-1], "train.max_steps=1", "eval.every=0", "eval.bins=[]", f"output_dir={tmp_path / 'ft'}"]
    proc = train(["--config", RECIPE, *common, f"model.init_from={tmp_path / 'backbone.pth'}"])
    assert "starting from the backbone weights in" in proc.stdout + proc.stderr
    torch.save({"fc.weight": backbone["fc.weight"]}, tmp_path / "partial.pth")
    proc = train(
        ["--config", RECIPE, *common, f"output_dir={tmp_path / 'bad'}", f"model.init_from={tmp_path / 'partial.pth'}"],
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.init_from:" in proc.stderr and "missing keys ['conv1.weight'" in proc.stderr


# --- what a GPU would wait on, per training step (tests/count_syncs.py counts it)
MAX_SYNCS, MAX_COLLECTIVES = 4, 8
COUNTED_RUNS = {
    "head_and_triplet": ["loss.head=arcface"],
    "triplet": [],
    "head_ema": ["loss.pair=none", "loss.head=arcface", "optim.name=adamw_cosine", "optim.ema_decay=0.9"],
    "head_adarand": ["loss.pair=none", "loss.head=cosface", "loss.adarand=true"],
}  # + model.pretrained


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_training_step_has_a_constant_number_of_syncs_and_collectives(shards, tmp_path, world):
    """Steps 2-4 of 5 (step 3 logs; step 1 creates optimizer state, step 5 checkpoints) on every rank:
    at most 4 device->host syncs and 8 collectives, whatever W (today's main: 6W + 7 syncs, 15 collectives)."""
    common = [
        *TINY,
        f"data.shards={shards}",
        "data.classes_per_batch=2",
        "data.images_per_class=2",
        "train.max_steps=5",
        "train.log_every=3",
    ]
    import timm

    pretrained = tmp_path / "pretrained.pt"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), pretrained)
    runs = []
    for name, args in COUNTED_RUNS.items():
        runs += ["--", name, *args, f"output_dir={tmp_path / name}"] + (
            ["model.pretrained=" + str(pretrained)] if "loss.adarand=true" in args else []
        )
    launcher = (
        [sys.executable]
        if world == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(_port()),
        ]
    )
    proc = subprocess.run(
        [*launcher, str(REPO / "tests" / "count_syncs.py"), str(tmp_path / "counts"), *common, *runs],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in COUNTED_RUNS:
        for rank in range(world):
            steps = json.loads((tmp_path / "counts" / f"{name}_rank_{rank}.json").read_text())
            assert len(steps) == 5
            for step, counted in enumerate(steps[1:4], start=2):
                syncs, collectives = sum(counted["syncs"].values()), sum(counted["collectives"].values())
                assert syncs <= MAX_SYNCS, (name, rank, step, counted)
                assert collectives <= MAX_COLLECTIVES, (name, rank, step, counted)
                assert (collectives > 0) == (world > 1), (name, rank, step, counted)
            assert sum(steps[3]["syncs"].values()) <= sum(steps[2]["syncs"].values())  # values read on logging steps


def test_sync_counter_sees_what_pml_and_masks_do_in_cpp():
    """The counter must catch host reads that never show in Python: PML's triplet loss (torch.where(mask),
    boolean indexing), .tolist(), .item(); and must not count torch.optim's host-side step counters."""
    from count_syncs import SyncCounter, _exclude_optimizer_step_counters
    from pytorch_metric_learning import losses

    counter = SyncCounter()
    _exclude_optimizer_step_counters(counter)
    embeddings, labels = torch.randn(8, 4, requires_grad=True), torch.arange(4).repeat(2)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()  # creates the step counter
    with counter:
        losses.TripletMarginLoss()(embeddings, labels)
    assert counter.counts["nonzero"] + counter.counts["index"] > 0, counter.counts
    counter.counts.clear()
    mask = embeddings[:, 0] > 0
    with counter:
        embeddings[mask], torch.where(mask), mask.sum().item(), mask.tolist()
        optimizer.step()
    assert counter.counts == {"index": 1, "nonzero": 1, "_local_scalar_dense": 1, "tolist": 1}, counter.counts


# Stop signals reach every process of a run (Slurm signals the whole step): trainers, loader workers, their
# fork server; the launcher's agent ignores SIGUSR1 as in slurm/train.sh. Tiny steps, so the signal lands mid-run.
STOP_STEPS = 30
STOP = [
    *TINY,
    "data.num_workers=2",
    "model.bn=frozen",
    "data.images_per_class=2",
    "optim.lr=1e-4",
    f"train.max_steps={STOP_STEPS}",
]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train([*STOP, f"data.shards={shards}", "data.classes_per_batch=4", f"output_dir={out}"])
    return [(r["step"], r["loss"]) for r in metrics(out)]


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (torchrun starts the trainers in sessions of their own: no killpg)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _wait_for_three_logged_steps(proc, out):
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)


def _signal_every_process_mid_run(args, nproc, out):
    """Start a run, send SIGUSR1 to every process of it at step >= 3, wait for the end."""
    launcher = _launcher(nproc)
    ignore_usr1 = lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # noqa: E731  (the agent, as train.sh)
    proc = subprocess.Popen(
        [*launcher, *args, f"output_dir={out}"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=ignore_usr1,
    )
    try:
        _wait_for_three_logged_steps(proc, out)
        for pid in _process_tree(proc.pid):  # as Slurm signals every process of a step
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]  # checkpointed and exited, no "worker exited unexpectedly"
    stopped = re.findall(r"stopped by (SIGUSR1|a signal on another rank) at step (\d+); checkpoint written", output)
    assert len(stopped) == 1 and 3 <= int(stopped[0][1]) < STOP_STEPS, output[-3000:]  # printed by the main process
    step = int(stopped[0][1])
    assert (out / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()
    return step


def _assert_same_losses(out, reference, rel):
    got = [(r["step"], r["loss"]) for r in metrics(out)]
    assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, STOP_STEPS + 1))
    for (step, a), (_, b) in zip(got, reference):
        assert a == pytest.approx(b, rel=rel, abs=1e-9), step


@pytest.mark.slow
def test_a_signal_to_every_process_checkpoints_and_resumes_exactly_then_a_rollback_moves_the_newer_aside(
    shards, uninterrupted, tmp_path
):
    args = [*STOP, f"data.shards={shards}", "data.classes_per_batch=4", "checkpoint.every=0"]
    out = tmp_path / "run"
    step = _signal_every_process_mid_run(args, 1, out)
    train([*args, f"output_dir={out}", "--resume", "auto"])
    _assert_same_losses(out, uninterrupted, rel=1e-6)

    # roll back to the signal's checkpoint: the step-30 one and the log after `step` are another branch now
    back = train(
        [
            *args,
            f"train.max_steps={step + 1}",
            f"output_dir={out}",
            "--resume",
            str(out / "checkpoints" / f"step_{step:08d}"),
        ]
    )
    (superseded,) = (out / "checkpoints").glob("superseded-*")
    assert f"moved the newer checkpoints (step_{STOP_STEPS:08d})" in back.stdout + back.stderr
    assert (superseded / f"step_{STOP_STEPS:08d}" / "meta.json").is_file()
    assert [json.loads(line)["step"] for line in (superseded / "metrics.jsonl").read_text().splitlines()] == list(
        range(step + 1, STOP_STEPS + 1)
    )
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 2))
    from facedist.checkpoint import latest_checkpoint

    assert latest_checkpoint(out).name == f"step_{step + 1:08d}"  # what `--resume auto` continues from


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_every_process_of_two_checkpoints_on_both_and_resumes_exactly(shards, uninterrupted, tmp_path):
    args = [*STOP, f"data.shards={shards}", "data.classes_per_batch=2", "checkpoint.every=0"]
    out = tmp_path / "run"
    _signal_every_process_mid_run(args, 2, out)
    train([*args, f"output_dir={out}", "--resume", "auto"], nproc=2)
    _assert_same_losses(out, uninterrupted, rel=1e-5)  # 2 processes x P=2 = 1 process x P=4


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """600 shards of one image each: 480 train, 120 val."""
    out = _synth_shards(
        tmp_path_factory.mktemp("many_shards"), 60, 10, 16, 1, "--max-samples", "1", "--val-identities", "12"
    )
    assert len(list(out.glob("*.tar"))) == 600
    return out


def test_training_and_evaluation_over_600_shards_under_64_open_files(many_shards, tmp_path):
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # noqa: E731  (ulimit -n 64)
    proc = subprocess.run(
        [
            sys.executable,
            TRAIN,
            *TINY,
            f"data.shards={many_shards}",
            "data.num_workers=1",
            "data.classes_per_batch=8",
            "train.max_steps=2",
            "eval.every=2",
            "eval.batch_size=32",
            f"output_dir={tmp_path}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert metrics(tmp_path)[-1]["val_auc"] > 0  # all 120 validation shards read


@pytest.fixture
def in_process(monkeypatch):
    """A Trainer built in this process (W = 1, CPU): Accelerate's shared state and the stop handlers are
    restored afterwards."""
    from accelerate.state import AcceleratorState

    from facedist.preemption import StopRequest

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    handlers = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    yield
    AcceleratorState._reset_state(True)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_trainer_in_process_evaluates_saves_trains_and_resumes(shards, tmp_path, in_process, capsys):
    """Save and evaluation are methods: no subprocess, no loop needed; the validator and the checkpoint writer
    say when they are due; the run says what it does in a start line, a line per evaluation and a final line."""
    from facedist.config import load_config
    from facedist.train import Trainer

    overrides = [*TINY, f"data.shards={shards}", "data.classes_per_batch=4", "eval.every=2", "checkpoint.every=3"]
    cfg = load_config(None, [*overrides, "train.max_steps=4", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert [trainer.validator.is_due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert [trainer.checkpointer.is_due(s) for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert trainer.checkpointer.is_due(1, stopping=True)
    scores = trainer.evaluate()
    assert 0.0 <= scores["val_auc"] <= 1.0 and "val_time_s" in scores
    saved = trainer.save()
    assert saved == tmp_path / "checkpoints" / "step_00000000"
    assert json.loads((saved / "meta.json").read_text())["step"] == 0
    exported = load_file(str(saved / "model.safetensors"))
    for key, value in trainer.raw_model.named_parameters():  # before any step the evaluation weights are y
        assert torch.equal(exported[key], value), key  # (BatchNorm statistics: recalibrated at them)

    trainer.train()
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert "val_auc" in metrics(tmp_path)[2] and "val_auc" in metrics(tmp_path)[4]
    out = capsys.readouterr().out
    assert "facedist train: 18 identities, 90 images | 1 process, global batch 4 x 4 x 1 | 4 steps" in out
    assert re.search(r"step 2: val AUC [0-9.]+, TAR@FAR=1e-3 \S+, EER [0-9.]+ \([0-9.]+ s\)", out), out
    final = out.strip().splitlines()[-1]
    assert final.startswith("facedist train: done at step 4 of 4 in ") and "best val AUC" in final
    assert final.endswith(f"checkpoint {tmp_path / 'checkpoints' / 'step_00000004'}")

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    more = Trainer(load_config(None, [*overrides, "train.max_steps=5", f"output_dir={tmp_path}"]), resume="auto")
    assert more.step == 4 and more.resumed.directory.name == "step_00000004"
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000004'} (step 4)" in more.start_line()


def test_overrides_go_anywhere_on_the_command_line():
    from facedist.train import parse_args

    args = parse_args(["--config", "c.yaml", "output_dir=R", "--resume", "auto", "model.embedding_dim=64", "--force"])
    assert args.overrides == ["output_dir=R", "model.embedding_dim=64"] and args.resume == "auto" and args.force


def _refusal(argv) -> str:
    """The one line a refused start exits with (sys.exit(message): status 1)."""
    from facedist.train import cli

    with pytest.raises(SystemExit) as exited:
        cli(argv)
    message = exited.value.code
    assert isinstance(message, str) and "\n" not in message.strip() and "Traceback" not in message, message
    return message


def test_mistakes_at_start_are_one_line_before_any_step(shards, tmp_path, in_process):
    """Too many identities per batch (before any worker starts), an output_dir nothing can be written to, a
    --resume --force whose shapes cannot fit: each one line, exit 1, and no folder left behind."""
    common = [*TINY, f"data.shards={shards}", "train.max_steps=1", "data.num_workers=2"]
    message = _refusal([*common, "data.classes_per_batch=30", f"output_dir={tmp_path / 'big'}"])
    assert message == (
        "facedist train: data: 18 identities cannot fill a global batch of 1 processes x "
        "data.classes_per_batch=30 distinct identities"
    )
    assert not (tmp_path / "big").exists()
    (tmp_path / "file").write_text("not a folder")
    message = _refusal([*common, f"output_dir={tmp_path / 'file' / 'run'}"])
    assert message == f"facedist train: output_dir: cannot write to {tmp_path / 'file' / 'run'} (Not a directory)"

    from accelerate.state import AcceleratorState

    from facedist.train import main

    run = [*common, "data.num_workers=0", f"output_dir={tmp_path / 'run'}"]
    main(run)
    AcceleratorState._reset_state(True)
    message = _refusal([*run, "--resume", "auto", "model.embedding_dim=8"])  # overrides after --resume, too
    assert "model.embedding_dim: 16 -> 8" in message and "--force cannot make shapes fit" in message
    AcceleratorState._reset_state(True)
    message = _refusal([*run, "--resume", "auto", "model.embedding_dim=8", "--force"])
    assert re.fullmatch(
        r"facedist train: resume: .*train_model.safetensors holds neck\.\S+ of shape \[16(, \d+)*\], this model's "
        r"is \[8(, \d+)*\] \(--force cannot make shapes fit.*\)",
        message,
    ), message


def test_bad_config_shards_or_weights_file_fail_at_start_with_one_line(shards, tmp_path, in_process):
    """Refused before any step, each in one line (exit 1) naming the key or file, no run folder left behind."""
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    common = [*TINY, f"data.shards={shards}", f"output_dir={out}"]
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    for overrides, message in (
        (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not one of no, bf16, fp16"),
        (["train.mixed_precision=fp16"], "fp16 needs a GPU"),  # refused, not silently fp32
        (["loss.head=arcface", "loss.sample_rate=0.5"], "ScheduleFree moves every class centre"),
        (["loss.adarand=true"], "loss.adarand: regularises fine-tuning"),
        ([f"data.shards={tmp_path / 'nowhere'}"], "nowhere/manifest.json not found"),
        ([f"model.pretrained={tmp_path / 'junk.pt'}"], "model.pretrained"),
    ):
        AcceleratorState._reset_state(True)  # each start builds its own Accelerator
        assert message in _refusal([*common, *overrides])
        assert not out.exists()  # a refused start leaves no empty run folder behind


def test_a_damaged_image_in_a_shard_stops_training_with_the_shard_error_in_one_line(shards, tmp_path, in_process):
    """Decoded in a DataLoader worker, the ShardError names shard, sample and offset, without the worker's
    traceback."""
    import numpy as np

    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    rows = np.load(damaged / "train-index.npy")
    with open(damaged / "train-000000.tar", "r+b") as tar:
        for row in rows[rows["shard"] == 0]:  # every image of the shard: the first batch meets one
            tar.seek(int(row["offset"]))
            tar.write(bytes(int(row["size"])))
    message = _refusal(
        [*TINY, f"data.shards={damaged}", "data.num_workers=1", "train.max_steps=2", f"output_dir={tmp_path / 'run'}"]
    )
    assert message.startswith(f"facedist train: {damaged / 'train-000000.tar'}") and "Caught" not in message


@pytest.mark.slow
def test_ctrl_c_stops_like_sigterm_with_a_checkpoint_and_a_second_one_says_it_is_saving(shards, tmp_path):
    """SIGINT to the whole foreground process group (what a terminal's Ctrl-C does: trainer, loader workers,
    their fork server), again and again: exit 0, the step's checkpoint written, no traceback."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *STOP, f"data.shards={shards}", "data.classes_per_batch=4", f"output_dir={out}"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_three_logged_steps(proc, out)
        while proc.poll() is None:  # an impatient user: Ctrl-C until it is over
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    (step,) = re.findall(r"stopped by SIGINT at step (\d+); checkpoint written", output)
    assert (out / "checkpoints" / f"step_{int(step):08d}" / "meta.json").is_file()
    assert "facedist train: stopping: saving a checkpoint at the end of this step, please wait" in output
    assert f"facedist train: stopped at step {step} of {STOP_STEPS}" in output
