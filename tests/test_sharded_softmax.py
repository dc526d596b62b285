"""ShardedMarginHead on W = 1, 2, 3 gloo processes against a single-process full-softmax reference.

The reference below is written independently of the head: the whole [C, D] matrix, F.cross_entropy on
s * cos with the margin on the target entries, torch's AdamW or SGD (one optimizer per row, stepped only
when its row was kept) or ScheduleFree on the full matrix. A linear "backbone"
turns fixed inputs into embeddings; its gradient is averaged over ranks as DDP would, so the head's
gather backward must scale correctly for the backbone to follow the reference trajectory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import schedulefree
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

import facedist  # noqa: F401
from facedist import distributed
from facedist.config import Config, ConfigError, _fill_dependent_defaults
from facedist.heads import build_head
from facedist.heads.margins import adacos_fixed_scale, build_margin
from facedist.heads.sharded_softmax import init_rows, sampled_class_mask
from facedist.optim import lr_schedule

C, D, DIN, N, SEED, STEPS = 11, 6, 5, 12, 3, 3  # C divisible by neither 2 nor 3
SPLITS = {1: [12], 2: [5, 7], 3: [3, 4, 5]}  # uneven local batches on purpose


def sampled_classes(labels: torch.Tensor, num_classes: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """Sorted class ids of `sampled_class_mask` (reads the count on the host)."""
    return torch.nonzero(sampled_class_mask(labels, num_classes, sample_rate, seed, step)).squeeze(1)


def make_config(head="arcface", optim="adamw_cosine", sample_rate=1.0, nesterov=False, **loss) -> Config:
    cfg = Config()
    cfg.optim.nesterov = nesterov
    cfg.model.embedding_dim, cfg.train.seed, cfg.train.max_steps = D, SEED, 8
    cfg.loss.head, cfg.loss.scale, cfg.loss.sample_rate, cfg.loss.head_lr_scale = head, 8.0, sample_rate, 2.0
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = optim, 0.05, 0.01, 1
    _fill_dependent_defaults(cfg)  # a margin not given: the head's paper value, as load_config gives it
    return cfg


RUNS = {
    "arcface": make_config("arcface", margin=0.5),
    "arcface_easy": make_config("arcface", margin=0.5, easy_margin=True),
    "cosface": make_config("cosface", margin=0.35),
    "sphereface": make_config("sphereface", margin=4),
    "combined": make_config("combined", m1=0.9, m2=0.3, m3=0.1),
    "adacos_fixed": make_config("adacos_fixed"),
    "adacos": make_config("adacos"),
    "arcface_sampled": make_config("arcface", sample_rate=0.5),
    "adacos_sampled": make_config("adacos", sample_rate=0.5),
    "arcface_sgd": make_config("arcface", optim="sgd"),
    "arcface_sgd_nesterov_sampled": make_config("arcface", optim="sgd", sample_rate=0.5, nesterov=True),
    "arcface_radam_schedulefree": make_config("arcface", optim="radam_schedulefree"),
    "arcface_adamw_schedulefree": make_config("arcface", optim="adamw_schedulefree"),
    "arcface_sgd_schedulefree": make_config("arcface", optim="sgd_schedulefree"),
}
MISSCALED = [0.5, 2.0]  # 0.5 at W = 2 is the uncompensated gather (no undoing of DDP's averaging)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: N inputs of 3 classes out of C (so sampling leaves classes out)."""
    g = torch.Generator().manual_seed(1000 + step)
    classes = torch.randperm(C, generator=g)[:3]
    return torch.randn(N, DIN, generator=g), classes[torch.randint(0, 3, (N,), generator=g)]


def local_rows(world_size: int, rank: int) -> slice:
    counts = SPLITS[world_size]
    return slice(sum(counts[:rank]), sum(counts[: rank + 1]))


def backbone_init() -> torch.Tensor:
    return torch.randn(DIN, D, generator=torch.Generator().manual_seed(7))


def train(cfg: Config, world_size: int, rank: int, steps: int, grad_factor: float = 1.0) -> dict:
    """Head + linear backbone for `steps` steps on this rank; what the comparisons need, per step."""
    head, optimizer = build_head(cfg, C, world_size, rank)
    head.gather_grad_scale *= grad_factor
    backbone = torch.nn.Parameter(backbone_init())
    sgd = torch.optim.SGD([backbone], lr=0.1)
    record = defaultdict(list)
    for step in range(steps):
        inputs, labels = batch(step)
        rows = local_rows(world_size, rank)
        embeddings = inputs[rows] @ backbone
        embeddings.retain_grad()
        loss, value = head(embeddings, labels[rows], step)
        loss.backward()
        distributed.all_reduce(backbone.grad, "mean")  # what DDP does to the backbone's gradients
        record["loss"].append(value.clone())
        record["backbone_grad"].append(backbone.grad.clone())
        record["weight_grad"].append(head.weight.grad.clone())
        record["embedding_grad"].append(embeddings.grad.clone())
        optimizer.step()
        sgd.step()
        optimizer.zero_grad()
        sgd.zero_grad()
    record["weight"], record["backbone"] = head.weight.detach().clone(), backbone.detach().clone()
    return dict(record)


def train_all(rank: int, world_size: int) -> dict:
    results = {name: train(cfg, world_size, rank, STEPS) for name, cfg in RUNS.items()}
    for factor in MISSCALED:
        results[f"arcface x{factor}"] = train(RUNS["arcface"], world_size, rank, STEPS, grad_factor=factor)
    return results


class Reference:
    """Single-process full softmax over all C classes with its optimizer."""

    def __init__(self, cfg: Config):
        self.cfg, self.margin = cfg, build_margin(cfg.loss)
        self.scale = cfg.loss.scale if cfg.loss.head not in ("adacos", "adacos_fixed") else adacos_fixed_scale(C)
        self.rows = [torch.nn.Parameter(row) for row in init_rows(0, C, D, SEED, purpose=0)]
        lr, o = cfg.optim.lr * cfg.loss.head_lr_scale, cfg.optim
        self.schedule = lr_schedule(o, cfg.train.max_steps)
        if o.name == "adamw_cosine":  # one AdamW per row: a row not kept in a step is not stepped
            self.optimizers = [
                torch.optim.AdamW([row], lr=lr, betas=o.betas, weight_decay=o.weight_decay) for row in self.rows
            ]
        elif o.name == "sgd":  # one SGD per row: no decay, no momentum for a row not kept
            self.optimizers = [
                torch.optim.SGD([row], lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
                for row in self.rows
            ]
        else:
            cls = {
                "radam_schedulefree": schedulefree.RAdamScheduleFree,
                "adamw_schedulefree": schedulefree.AdamWScheduleFree,
                "sgd_schedulefree": schedulefree.SGDScheduleFree,
            }[o.name]
            kwargs = {"momentum": o.momentum} if o.name.startswith("sgd") else {"betas": o.betas}
            if o.name != "radam_schedulefree":
                kwargs["warmup_steps"] = o.warmup_steps
            self.optimizers = [cls(self.rows, lr=lr, weight_decay=o.weight_decay, **kwargs)]
            self.optimizers[0].train()

    def loss(self, embeddings, labels, step):
        kept = (
            sampled_classes(labels, C, self.cfg.loss.sample_rate, SEED, step)
            if self.cfg.loss.sample_rate < 1
            else torch.arange(C)
        )
        self.weight = torch.stack(self.rows)
        self.weight.retain_grad()
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.weight[kept], dim=1).T
        target = torch.searchsorted(kept, labels)
        index = (torch.arange(len(labels)), target)
        if self.cfg.loss.head == "adacos":
            with torch.no_grad():
                negatives = torch.exp(self.scale * cos).index_put(index, torch.zeros(len(labels))).sum(1)
                mean_negatives = negatives.mean() * (C - 1) / (len(kept) - 1)
                median = torch.median(torch.acos(cos[index].clamp(-1, 1)))
                self.scale = float(torch.log(mean_negatives) / torch.cos(torch.clamp(median, max=math.pi / 4)))
        logits = (self.scale * cos).index_put(index, self.scale * self.margin(cos[index], step))
        return F.cross_entropy(logits, target), kept

    def step(self, kept, step):
        if self.cfg.optim.name in ("adamw_cosine", "sgd"):
            for c in kept.tolist():
                group = self.optimizers[c].param_groups[0]
                group["lr"] = self.cfg.optim.lr * self.cfg.loss.head_lr_scale * self.schedule(step)
                self.optimizers[c].step()
        else:
            self.optimizers[0].step()
        for row in self.rows:
            row.grad = None


def reference_run(cfg: Config, steps: int, train_backbone: bool = True) -> tuple[dict, Reference]:
    ref = Reference(cfg)
    backbone = torch.nn.Parameter(backbone_init())
    sgd = torch.optim.SGD([backbone], lr=0.1 if train_backbone else 0.0)
    record = defaultdict(list)
    for step in range(steps):
        inputs, labels = batch(step)
        embeddings = inputs @ backbone
        embeddings.retain_grad()
        loss, kept = ref.loss(embeddings, labels, step)
        loss.backward()
        record["loss"].append(loss.detach())
        record["backbone_grad"].append(backbone.grad.clone())
        record["weight_grad"].append(ref.weight.grad.clone())
        record["embedding_grad"].append(embeddings.grad.clone())
        ref.step(kept, step)
        sgd.step()
        sgd.zero_grad()
    record["weight"], record["backbone"] = torch.stack(ref.rows).detach(), backbone.detach()
    return dict(record), ref


def close(actual, expected, what):
    """rtol 1e-5; atol 1e-5 of the expected tensor's largest entry (entries near zero)."""
    atol = 1e-5 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def compare(per_rank: list[dict], expected: dict, world_size: int) -> None:
    for step in range(STEPS):
        for result in per_rank:
            assert torch.equal(result["loss"][step], per_rank[0]["loss"][step]), "loss differs between ranks"
            close(result["backbone_grad"][step], expected["backbone_grad"][step], f"step {step} backbone grad")
        close(per_rank[0]["loss"][step], expected["loss"][step], f"step {step} loss")
        close(
            torch.cat([r["weight_grad"][step] for r in per_rank]),
            expected["weight_grad"][step],
            f"step {step} centre grads",
        )
        # the head hands each rank W x its embeddings' gradient; DDP's averaging divides it back
        close(
            torch.cat([r["embedding_grad"][step] for r in per_rank]) / world_size,
            expected["embedding_grad"][step],
            f"step {step} embedding grads",
        )
    close(torch.cat([r["weight"] for r in per_rank]), expected["weight"], "centres after the steps")
    close(per_rank[0]["backbone"], expected["backbone"], "backbone after the steps")


_references: dict[str, dict] = {}


def reference(name: str) -> dict:
    if name not in _references:
        _references[name] = reference_run(RUNS[name], STEPS)[0]
    return _references[name]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(RUNS))
def test_sharded_head_equals_full_softmax(spawned, world_size, name):
    compare([r[name] for r in spawned["train"][world_size]], reference(name), world_size)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("factor", MISSCALED)
def test_misscaled_gather_backward_is_caught(spawned, world_size, factor):
    with pytest.raises(AssertionError, match="backbone grad"):
        compare([r[f"arcface x{factor}"] for r in spawned["train"][world_size]], reference("arcface"), world_size)


@pytest.mark.parametrize(
    "name",
    [
        "arcface",
        "sphereface",
        "adacos_sampled",
        "arcface_radam_schedulefree",
        "arcface_sgd",
        "arcface_sgd_nesterov_sampled",
    ],
)
def test_single_process_without_process_group(name):
    assert not distributed.is_distributed()
    compare([train(RUNS[name], 1, 0, STEPS)], reference(name), 1)


def test_sampled_classes_keep_the_batch_and_are_reproducible():
    labels = torch.tensor([5, 17, 17, 940, 3])
    kept = sampled_classes(labels, 1000, 0.1, seed=1, step=4)
    assert kept.numel() == 100 and torch.isin(labels, kept).all()
    assert torch.equal(kept, kept.unique())  # sorted, no repeats
    assert torch.equal(kept, sampled_classes(labels, 1000, 0.1, seed=1, step=4))
    assert not torch.equal(kept, sampled_classes(labels, 1000, 0.1, seed=1, step=5))
    assert not torch.equal(kept, sampled_classes(labels, 1000, 0.1, seed=2, step=4))
    many = torch.arange(0, 1000, 4)  # more batch classes than rate * C: all of them, nothing else
    assert torch.equal(sampled_classes(many, 1000, 0.1, seed=1, step=4), many)
    assert torch.equal(sampled_classes(labels, 1000, 1.0, seed=1, step=4), torch.arange(1000))


@pytest.mark.parametrize("optim", ["adamw_cosine", "sgd"])
def test_unsampled_rows_and_their_optimizer_state_do_not_move(optim):
    head, optimizer = build_head(make_config("arcface", optim=optim, sample_rate=0.5), C, 1, 0)
    backbone = backbone_init()
    seen_untouched = 0
    for step in range(4):
        inputs, labels = batch(step)
        before = {
            "weight": head.weight.detach().clone(),
            **{k: v.clone() for k, v in optimizer.state[head.weight].items()},
        }
        loss, _ = head(inputs @ backbone, labels, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[head.touched_rows] = False
        assert untouched.sum() == C - math.ceil(0.5 * C) and not untouched[labels].any()
        after = {"weight": head.weight.detach(), **optimizer.state[head.weight]}
        for key, value in before.items():
            assert torch.equal(value[untouched], after[key][untouched]), f"step {step}: unsampled {key} moved"
            assert not torch.equal(value[~untouched], after[key][~untouched]), f"step {step}: sampled {key} still"
        seen_untouched += int(untouched.sum()) * (step > 0)
    assert seen_untouched > 0


@pytest.mark.parametrize("optim", ["radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree"])
def test_schedule_free_with_sampling_is_refused(optim):
    with pytest.raises(ConfigError, match=f"loss.sample_rate=0.5 with optim.name={optim}"):
        build_head(make_config("arcface", optim=optim, sample_rate=0.5), C, 1, 0)


def test_bf16_matmul_keeps_fp32_weights_and_loss():
    cfg = make_config("arcface")
    cfg.train.mixed_precision = "bf16"
    head, optimizer = build_head(cfg, C, 1, 0)
    full, _ = build_head(make_config("arcface"), C, 1, 0)
    backbone = backbone_init()
    for step in range(STEPS):
        inputs, labels = batch(step)
        loss, _ = head((inputs @ backbone).bfloat16(), labels, step)
        expected, _ = full(inputs @ backbone, labels, step)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - expected.item()) < 2e-2 * expected.item()
        loss.backward()
        assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
        optimizer.step()
        optimizer.zero_grad()
        full.weight.data.copy_(head.weight.data)
    assert head.weight.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in optimizer.state[head.weight].values())


# --- checkpoints: 1 -> 3 -> 2 -> 1 processes (every resharding of 2 -> 1, 1 -> 3, 3 -> 2), equal to no interruption
CHAIN = {"head": make_config("adacos", sample_rate=0.5), "head2": make_config("arcface", optim="radam_schedulefree")}
CHAIN_STAGES = [(1, range(0, 2)), (3, range(2, 3)), (2, range(3, 4)), (1, range(4, 5))]


def _state(head, optimizer) -> dict:
    state = {"weight": head.weight.detach().clone(), "scale": head.scale.clone()}
    state.update({k: v.clone() for k, v in optimizer.state[head.weight].items()})
    state.update(
        {f"group {k}": v for k, v in optimizer.param_groups[0].items() if k in ("k", "weight_sum", "steps_taken")}
    )
    return state


def chain_stage(rank: int, world_size: int, folder_in: Path | None, folder_out: Path | None, steps: range) -> dict:
    heads = {name: build_head(cfg, C, world_size, rank) for name, cfg in CHAIN.items()}
    loaded = {}
    for name, (head, optimizer) in heads.items():
        if folder_in is not None:
            head.load_checkpoint(folder_in / name, optimizer)
            loaded[name] = _state(head, optimizer)
    for step in steps:
        inputs, labels = batch(step)
        rows = local_rows(world_size, rank)
        for head, optimizer in heads.values():
            loss, _ = head(inputs[rows] @ backbone_init(), labels[rows], step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    if folder_out is not None:
        for name, (head, optimizer) in heads.items():
            for file, write in head.checkpoint_files(name, optimizer).items():
                (folder_out / file).parent.mkdir(parents=True, exist_ok=True)
                write(folder_out / file)
    return {"loaded": loaded, "final": {name: _state(*pair) for name, pair in heads.items()}}


def _joined(per_rank: list[dict], name: str) -> dict:
    states = [r[name] for r in per_rank]
    rows = [k for k, v in states[0].items() if torch.is_tensor(v) and v.dim()]  # the rest is replicated
    return {k: torch.cat([s[k] for s in states]) if k in rows else states[0][k] for k in states[0]}


def spawned_work(rank: int, world_size: int, folder_in: Path, folder_out: Path, steps: range) -> dict:
    """One process of a spawn: every equivalence run, then this world size's stage of the checkpoint chain."""
    return {"train": train_all(rank, world_size), "chain": chain_stage(rank, world_size, folder_in, folder_out, steps)}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Two spawns (W = 3, then W = 2: starting processes is the slow part) that also carry the checkpoint
    chain 1 -> 3 -> 2 -> 1 processes, each stage loading the files of the stage before."""
    folders = [tmp_path_factory.mktemp(f"chain{i}") for i in range(len(CHAIN_STAGES) - 1)] + [None]
    train_results, chain_results, folder_in = {}, [], None
    for (world_size, steps), folder_out in zip(CHAIN_STAGES, folders):
        if world_size == 1:
            chain_results.append([chain_stage(0, 1, folder_in, folder_out, steps)])
        else:
            results = run_distributed(spawned_work, world_size, folder_in, folder_out, steps)
            train_results[world_size] = [r["train"] for r in results]
            chain_results.append([r["chain"] for r in results])
        folder_in = folder_out
    return {"train": train_results, "chain": chain_results}


@pytest.mark.distributed
def test_checkpoint_reshards_across_world_sizes(spawned):
    stages = spawned["chain"]
    for previous, results in zip(stages, stages[1:]):
        for name in CHAIN:  # what was loaded is exactly what the previous world size saved
            loaded = _joined([r["loaded"] for r in results], name)
            saved = _joined([r["final"] for r in previous], name)
            assert loaded.keys() == saved.keys()
            for key in saved:
                assert torch.equal(torch.as_tensor(loaded[key]), torch.as_tensor(saved[key])), f"{name} {key}"
    total_steps = CHAIN_STAGES[-1][1].stop
    for name, cfg in CHAIN.items():
        expected, ref = reference_run(cfg, total_steps, train_backbone=False)
        final = _joined([r["final"] for r in stages[-1]], name)
        close(final["weight"], expected["weight"], f"{name} centres after resharded resumes")
        if cfg.loss.head == "adacos":
            assert final["scale"].item() == pytest.approx(ref.scale, rel=1e-5)
