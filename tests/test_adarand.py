"""AdaRand on 3 gloo processes (and without a process group) against a single-process reference.

The reference writes the objective out on the whole [C, D] matrix of means: MSE to a random feature of
each sample's class, the pull of each batch class's mean toward its running feature mean, and the mean
pairwise cosine between all class means from the explicit C x C matrix (the module uses a closed form).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

import facedist  # noqa: F401
from facedist import distributed
from facedist.config import Config
from facedist.heads import build_adarand
from facedist.heads.adarand import NOISE_PURPOSE, AdaRand
from facedist.heads.sharded_softmax import generator
from facedist.optim import warmup_cosine

C, D, DIN, N, SEED, STEPS, LAM, PER_CLASS = 11, 6, 5, 12, 5, 3, 0.5, 3
SPLITS = {1: [12], 3: [3, 4, 5]}


def make_config() -> Config:
    cfg = Config()
    cfg.model.embedding_dim, cfg.train.seed, cfg.train.max_steps = D, SEED, 8
    cfg.loss.adarand, cfg.loss.adarand_lambda, cfg.loss.head_lr_scale = True, LAM, 2.0
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = "adamw_cosine", 0.05, 0.01, 1
    return cfg


def pretrained_features():
    """(features, labels, class_offsets) of a small training set sorted by class: PER_CLASS images each."""
    g = torch.Generator().manual_seed(11)
    labels = torch.arange(C).repeat_interleave(PER_CLASS)
    return (
        torch.randn(C * PER_CLASS, D, generator=g) * 2 + labels[:, None] * 0.1,
        labels,
        np.searchsorted(labels.numpy(), np.arange(C + 1)),
    )


def batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    classes = torch.randperm(C, generator=g)[:4]
    return torch.randn(N, DIN, generator=g), classes[torch.randint(0, 4, (N,), generator=g)]


def backbone_init() -> torch.Tensor:
    return torch.randn(DIN, D, generator=torch.Generator().manual_seed(7))


def train(rank: int, world_size: int, folder=None) -> dict:
    adarand, optimizer = build_adarand(make_config(), C, world_size, rank)
    features, labels, offsets = pretrained_features()
    own = adarand.own_samples(offsets)
    adarand.init_from_features([(features[own.start : own.stop], labels[own.start : own.stop])])
    record = defaultdict(list)
    record["initial_means"], record["std"] = adarand.means.detach().clone(), adarand.std.clone()
    backbone = torch.nn.Parameter(backbone_init())
    sgd = torch.optim.SGD([backbone], lr=0.1)
    counts = SPLITS[world_size]
    rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    for step in range(STEPS):
        inputs, labels = batch(step)
        loss, value = adarand(inputs[rows] @ backbone, labels[rows], step)
        loss.backward()
        distributed.all_reduce(backbone.grad, "mean")  # DDP
        record["value"].append(value)
        record["backbone_grad"].append(backbone.grad.clone())
        record["means_grad"].append(adarand.means.grad.clone())
        optimizer.step()
        sgd.step()
        optimizer.zero_grad()
        sgd.zero_grad()
    record["means"], record["backbone"] = adarand.means.detach().clone(), backbone.detach().clone()
    if folder is not None:
        for name, write in adarand.checkpoint_files("adarand", optimizer).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            write(folder / name)
        record["optimizer"] = {k: v.clone() for k, v in optimizer.state[adarand.means].items()}
    return dict(record)


def reference_run() -> dict:
    cfg = make_config()
    features, labels, _ = pretrained_features()
    per_class = features.view(C, PER_CLASS, D)
    means = torch.nn.Parameter(per_class.mean(1))
    std = per_class.std(1, unbiased=False)
    record = defaultdict(list)
    record["initial_means"], record["std"] = means.detach().clone(), std
    optimizer = torch.optim.AdamW(
        [means], lr=cfg.optim.lr * cfg.loss.head_lr_scale, weight_decay=cfg.optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.train.max_steps))
    backbone = torch.nn.Parameter(backbone_init())
    sgd = torch.optim.SGD([backbone], lr=0.1)
    for step in range(STEPS):
        inputs, labels = batch(step)
        feats = inputs @ backbone
        noise = torch.randn(N, D, generator=generator(torch.device("cpu"), SEED, NOISE_PURPOSE, step))
        random_features = means.detach()[labels] + std[labels] * noise
        regulariser = LAM * F.mse_loss(feats, random_features)
        intra = []
        for c in labels.unique():
            target = 0.5 * means[c].detach() + 0.5 * feats[labels == c].detach().mean(0)
            intra.append(1 - F.cosine_similarity(means[c], target, dim=0))
        unit = F.normalize(means, dim=1)
        pairwise = unit @ unit.T
        inter = (pairwise.sum() - pairwise.diag().sum()) / (C * (C - 1))
        (regulariser + torch.stack(intra).mean() + inter).backward()
        record["value"].append(regulariser.detach())
        record["backbone_grad"].append(backbone.grad.clone())
        record["means_grad"].append(means.grad.clone())
        optimizer.step()
        schedule.step()
        sgd.step()
        optimizer.zero_grad()
        sgd.zero_grad()
    record["means"], record["backbone"] = means.detach().clone(), backbone.detach().clone()
    return dict(record)


def close(actual, expected, what):
    atol = 1e-5 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def compare(per_rank: list[dict], expected: dict) -> None:
    close(torch.cat([r["initial_means"] for r in per_rank]), expected["initial_means"], "initial means")
    close(torch.cat([r["std"] for r in per_rank]), expected["std"], "initial std")
    for step in range(STEPS):
        for result in per_rank:
            assert torch.equal(result["value"][step], per_rank[0]["value"][step]), "value differs between ranks"
            close(result["backbone_grad"][step], expected["backbone_grad"][step], f"step {step} backbone grad")
        close(per_rank[0]["value"][step], expected["value"][step], f"step {step} regulariser")
        close(
            torch.cat([r["means_grad"][step] for r in per_rank]),
            expected["means_grad"][step],
            f"step {step} means grad",
        )
    close(torch.cat([r["means"] for r in per_rank]), expected["means"], "means after the steps")
    close(per_rank[0]["backbone"], expected["backbone"], "backbone after the steps")


@pytest.fixture(scope="module")
def three_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adarand")
    return run_distributed(train, 3, folder), folder


@pytest.mark.distributed
def test_sharded_adarand_equals_reference(three_processes):
    compare(three_processes[0], reference_run())


def test_single_process_without_process_group():
    assert not distributed.is_distributed()
    compare([train(0, 1)], reference_run())


@pytest.mark.distributed
def test_checkpoint_from_three_processes_loads_into_one(three_processes):
    per_rank, folder = three_processes
    adarand, optimizer = build_adarand(make_config(), C, 1, 0)
    adarand.load_checkpoint(folder / "adarand", optimizer)
    assert torch.equal(adarand.means.detach(), torch.cat([r["means"] for r in per_rank]))
    assert torch.equal(adarand.std, torch.cat([r["std"] for r in per_rank]))
    for key, value in optimizer.state[adarand.means].items():
        assert torch.equal(value, torch.cat([r["optimizer"][key] for r in per_rank])), key
    assert optimizer.param_groups[0]["steps_taken"] == STEPS


def test_init_checks_its_classes():
    adarand = AdaRand(C, D, LAM, world_size=2, rank=0)  # owns classes 0..4
    features = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"outside this rank's classes \[0, 5\)"):
        adarand.init_from_features([(features, torch.tensor([0, 1, 2, 7]))])
    with pytest.raises(ValueError, match="class 4 has no features"):
        adarand.init_from_features([(features, torch.tensor([0, 1, 2, 3]))])
