import copy

import pytest
import torch
from dist_utils import run_distributed
from torch import nn

from facedist import distributed
from facedist.config import OptimConfig
from facedist.optim import (
    build_optimizer,
    build_weight_average,
    clip_grads_,
    evaluation_state_dict,
    grad_norm_squared,
    is_schedule_free,
    model_param_groups,
    recalibrate_batchnorm,
    warmup_cosine,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(net, optimizer, steps=20):
    for i in range(steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        net(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", ["radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree"])
def test_evaluation_weights_equal_schedulefree_eval_and_leave_training_untouched(name):
    net = _net()
    optimizer, scheduler = build_optimizer(net.parameters(), OptimConfig(name=name, lr=0.05, weight_decay=0.0), 10)
    assert scheduler is None and is_schedule_free(optimizer)
    _train(net, optimizer)
    before = copy.deepcopy(net.state_dict())
    computed = evaluation_state_dict(net, optimizer)
    for key, value in net.state_dict().items():  # training weights (y) untouched
        assert torch.equal(value, before[key])
    optimizer.eval()  # the library's own swap to x
    reference = net.state_dict()
    assert any(not torch.equal(reference[k], before[k]) for k in reference)  # x differs from y
    for key in reference:
        torch.testing.assert_close(computed[key], reference[key], rtol=1e-6, atol=1e-7)


def test_adamw_cosine_evaluates_its_weights_and_schedules_lr():
    net = _net()
    optimizer, scheduler = build_optimizer(
        net.parameters(), OptimConfig(name="adamw_cosine", lr=1.0, weight_decay=0.0, warmup_steps=2), 10
    )
    assert not is_schedule_free(optimizer)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in evaluation_state_dict(net, optimizer).items())
    factor = warmup_cosine(2, 10)
    assert [factor(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert factor(6) == pytest.approx(0.5) and factor(10) == pytest.approx(0.0)


@pytest.mark.parametrize("decay", [0.5, 0.999])  # 0.5: capped from the third update; 0.999: warm-up throughout
def test_weight_average_is_a_float64_moving_average_with_warmed_up_decay(decay):
    net = _net()
    optimizer, _ = build_optimizer(net.parameters(), OptimConfig(name="adamw_cosine", lr=0.05, weight_decay=0.0), 10)
    average = build_weight_average(net, decay)
    reference = {k: v.double().clone() for k, v in net.state_dict().items()}
    for step in range(1, 7):
        _train(net, optimizer, steps=1)
        average.update(net, step)
        weight = 0.0 if step == 1 else min(decay, 1 - step ** (-2 / 3))  # timm's warm-up: 1 - (1 + (step - 1)) ** -2/3
        for key, value in net.state_dict().items():
            reference[key] = (
                reference[key] * weight + value.double() * (1 - weight) if value.is_floating_point() else value.double()
            )
    before = copy.deepcopy(net.state_dict())
    evaluated = evaluation_state_dict(net, optimizer, average)
    assert any(not torch.equal(evaluated[k], before[k]) for k in before)  # the average, not the weights
    for key, value in net.state_dict().items():  # training weights untouched
        assert torch.equal(value, before[key])
    for key in reference:
        torch.testing.assert_close(evaluated[key].double(), reference[key], rtol=1e-6, atol=1e-7)
    assert build_weight_average(net, 0.0) is None


def test_recalibrated_statistics_are_the_mean_over_batches():
    net = _net().eval()
    batches = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert recalibrate_batchnorm(net, batches) == 3
    bn = net[1]
    features = [net[0](b).detach() for b in batches]
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean(0) for f in features]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var(0) for f in features]).mean(0))
    assert not bn.training and bn.momentum == 0.1  # mode and momentum restored


def _recalibrate(rank, world):
    net = _net()
    recalibrate_batchnorm(net, [torch.randn(32, 4, generator=torch.Generator().manual_seed(rank))])
    return net[1].running_mean, net[1].running_var


@pytest.mark.distributed
def test_recalibration_is_averaged_across_ranks():
    results = run_distributed(_recalibrate, 2)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    singles = [_recalibrate(r, 1) for r in range(2)]
    torch.testing.assert_close(results[0][0], (singles[0][0] + singles[1][0]) / 2)


def clip_grad_norm_(replicated: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by one global norm, replicated (DDP) gradients counted once, sharded head rows summed over ranks, as
    the trainer does (there the sharded sum rides on the step's one flag all-reduce, `distributed.StepFlags`)."""
    local = grad_norm_squared(sharded)
    if sharded:
        local = distributed.all_reduce(local.to(sharded[0].device), "sum")
    total = (grad_norm_squared(replicated).to(local.device) + local).sqrt()
    clip_grads_(replicated + sharded, total, max_norm)
    return total


def _clip(rank, world, max_norm):
    replicated = nn.Parameter(torch.zeros(3))
    replicated.grad = torch.tensor([3.0, 0.0, 0.0])  # identical on every rank (DDP-averaged)
    shard = nn.Parameter(torch.zeros(2))
    shard.grad = torch.tensor([4.0, 0.0]) if rank == 0 else torch.tensor([0.0, 12.0])
    norm = clip_grad_norm_([replicated], [shard], max_norm)
    return norm, replicated.grad, shard.grad


@pytest.mark.distributed
def test_global_grad_norm_counts_each_head_shard_once():
    results = run_distributed(_clip, 2, 6.5)
    for norm, replicated, _ in results:
        assert norm.item() == pytest.approx(13.0)  # sqrt(3^2 + 4^2 + 12^2)
        torch.testing.assert_close(replicated, torch.tensor([1.5, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][2], torch.tensor([0.0, 6.0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw_cosine", "radam_schedulefree"])
def test_backbone_lr_scale_gives_the_pretrained_backbone_a_lower_lr(name):
    from facedist.config import ModelConfig
    from facedist.model import build_model

    model = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8))
    assert len(model_param_groups(model, 1.0)) == len(list(model.parameters()))  # one plain group
    optimizer, scheduler = build_optimizer(
        model_param_groups(model, 0.1), OptimConfig(name=name, lr=1e-3, weight_decay=0.0, warmup_steps=2), 10
    )
    neck, backbone = optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in neck["params"]} == {id(p) for p in model.neck.parameters()}
    base = "initial_lr" if scheduler is not None else "lr"  # LambdaLR keeps the unscheduled lr there
    assert neck[base] == pytest.approx(1e-3) and backbone[base] == pytest.approx(1e-4)
    model(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
        assert backbone["lr"] == pytest.approx(0.1 * neck["lr"])  # the schedule keeps the ratio


def arcface_torch_polynomial_lr(base_lr, warmup, total, power, iteration):
    """arcface_torch's PolynomialLRWarmup closed form: the lr in effect for `iteration` (0 = first step)."""
    if iteration < warmup:
        return None  # facedist warms up to (step + 1) / warmup, theirs from 0: compared after warmup only
    return base_lr * (1.0 - (min(total, iteration) - warmup) / (total - warmup)) ** power


@pytest.mark.parametrize("warmup", [0, 3])
def test_sgd_polynomial_schedule_is_arcface_torchs(warmup):
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=5e-4, warmup_steps=warmup, nesterov=True)
    optimizer, scheduler = build_optimizer([nn.Parameter(torch.ones(2))], cfg, max_steps=20)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, True)
    for step in range(20):
        expected = arcface_torch_polynomial_lr(0.1, warmup, 20, 2.0, step)
        if expected is None:
            assert group["lr"] == pytest.approx(0.1 * (step + 1) / warmup)
        else:
            assert group["lr"] == pytest.approx(expected, abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_sgd_cosine_schedule():
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=0.0, schedule="cosine")
    optimizer, scheduler = build_optimizer([nn.Parameter(torch.ones(2))], cfg, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True)
