"""Optimizers (ScheduleFree family, AdamW + cosine, SGD + polynomial decay) and what ScheduleFree needs around them.

ScheduleFree keeps two points: y, where gradients are taken (the model's weights while training), and
x, the average that should be evaluated and exported. `evaluation_state_dict` computes x from y and the
optimizer's z without touching the live model, so evaluation and checkpoints never disturb training;
`recalibrate_batchnorm` then refreshes BatchNorm statistics at x (statistics gathered at y do not fit x),
averaged across ranks so every rank evaluates the same model. The other optimizers can evaluate a moving
average of their weights instead (`optim.ema_decay`, `build_weight_average`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import schedulefree
import torch
from timm.utils import ModelEmaV3
from torch import nn

import facedist  # noqa: F401  (torchvision compat before timm)
from facedist import distributed
from facedist.config import OptimConfig

SCHEDULE_FREE = {
    "radam_schedulefree": schedulefree.RAdamScheduleFree,
    "adamw_schedulefree": schedulefree.AdamWScheduleFree,
    "sgd_schedulefree": schedulefree.SGDScheduleFree,
}


def model_param_groups(model: nn.Module, backbone_lr_scale: float) -> list:
    """The embedding model's parameters for build_optimizer: one group, or with backbone_lr_scale < 1 the
    new layers (neck) at lr and the pretrained backbone at lr x backbone_lr_scale, so fine-tuning adapts
    the new layers fast without washing out the pretrained features."""
    if backbone_lr_scale == 1.0:
        return list(model.parameters())
    backbone = {id(p) for p in model.backbone.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in backbone]},
        {"params": list(model.backbone.parameters()), "lr_scale": backbone_lr_scale},
    ]


def build_optimizer(params: Iterable, cfg: OptimConfig, max_steps: int, lr_scale: float = 1.0):
    """(optimizer, LR scheduler or None). ScheduleFree needs no schedule; AdamW gets warmup + cosine, SGD
    (arcface_torch's recipe) warmup + polynomial decay or cosine (`lr_schedule`). `params` may be groups
    (dicts) with an "lr_scale" of their own."""
    lr = cfg.lr * lr_scale
    params = [
        {**{k: v for k, v in group.items() if k != "lr_scale"}, "lr": lr * group.get("lr_scale", 1.0)}
        if isinstance(group, dict)
        else group
        for group in params
    ]
    if cfg.name == "radam_schedulefree":
        optimizer = schedulefree.RAdamScheduleFree(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    elif cfg.name == "adamw_schedulefree":
        optimizer = schedulefree.AdamWScheduleFree(
            params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps
        )
    elif cfg.name == "sgd_schedulefree":
        optimizer = schedulefree.SGDScheduleFree(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps
        )
    elif cfg.name == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, max_steps))
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, max_steps))
    optimizer.train()  # ScheduleFree optimizers start in eval mode
    return optimizer, None


def lr_schedule(cfg: OptimConfig, max_steps: int):
    """The LR multiplier of the non-ScheduleFree optimizers, per optimizer step (backbone and head alike)."""
    if cfg.name == "sgd" and cfg.schedule == "polynomial":
        return warmup_polynomial(cfg.warmup_steps, max_steps, cfg.power)
    return warmup_cosine(cfg.warmup_steps, max_steps)


def warmup_polynomial(warmup_steps: int, max_steps: int, power: float):
    """LR multiplier: linear warmup to 1, then (1 - progress) ** power to 0 at max_steps (arcface_torch's
    PolynomialLRWarmup: without warmup, step 0 runs at the full lr)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return factor


def warmup_cosine(warmup_steps: int, max_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _base(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO wrapper
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer) -> bool:
    return isinstance(_base(optimizer), tuple(SCHEDULE_FREE.values()))


def current_lr(optimizer) -> float:
    group = _base(optimizer).param_groups[0]
    return float(group["scheduled_lr"] if "scheduled_lr" in group else group["lr"])  # ScheduleFree: warmed-up lr


def build_weight_average(model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """A moving average of the weights and BatchNorm statistics (optim.ema_decay; None when 0), updated after
    each optimizer step with `.update(model, step)`: timm's, whose update is foreach lerps with a Python-float
    decay (torch's AveragedModel reads its step counter on the host twice a step). The decay warms up,
    1 - (1 + step) ** (-2/3) capped at `decay`, so a short run's first steps (a random neck) fade out."""
    return ModelEmaV3(model, decay=decay, use_warmup=True) if decay > 0 else None


@torch.no_grad()
def evaluation_state_dict(model: nn.Module, optimizer, average: ModelEmaV3 | None = None) -> dict[str, torch.Tensor]:
    """The weights to evaluate and export: the moving average when there is one; ScheduleFree's
    x = lerp(y, z, 1 - 1/beta1); else the weights.

    The same formula as the optimizer's own eval(), computed out of place so training state is untouched.
    """
    state = {k: v.detach().clone() for k, v in (average.module if average is not None else model).state_dict().items()}
    if average is not None:
        return state
    base = _base(optimizer)
    if not is_schedule_free(base):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    for group in base.param_groups:
        beta = group["betas"][0] if "betas" in group else group["momentum"]
        for p in group["params"]:
            z = base.state.get(p, {}).get("z")
            if z is not None and id(p) in names:
                state[names[id(p)]] = torch.lerp(p.detach(), z.to(p.device), 1 - 1 / beta)
    return state


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute BatchNorm running statistics of `model` (in place) as the plain average over `batches`,
    then average them over ranks. Every rank must call it with the same number of batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
        m.train()
    count = 0
    for images in batches:
        model(images)
        count += 1
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)
        distributed.all_reduce(m.running_mean, "mean")
        distributed.all_reduce(m.running_var, "mean")
    return count


def grad_norm_squared(params: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads)).square().sum()


def clip_grads_(params: Iterable[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so `total_norm` becomes at most `max_norm`, on the device (no host read): a
    non-finite norm leaves them as they are (that step is skipped)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0 or not grads:
        return
    scale = torch.where(torch.isfinite(total_norm), (max_norm / (total_norm + 1e-6)).clamp(max=1.0), 1.0)
    for device_grads in _by_device(grads).values():
        torch._foreach_mul_(device_grads, scale.to(device_grads[0].device))


def _by_device(tensors: list[torch.Tensor]) -> dict:
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


class Optimizers:
    """Every optimizer of a run stepped as one: the backbone's, the side ones outside DDP/ZeRO (the margin head's,
    AdaRand's), the LR schedule, the fp16 loss scaler and the weight average (`optim.ema_decay`).

    The loop calls `unscale_()` before measuring gradients and `step_unless_nonfinite(flags, step)` after the
    step's flags are read: a non-finite step is skipped on every rank (ScheduleFree's counters are Python
    numbers: a bad step must be refused before it is taken), an fp16 overflow with a finite loss only backs the
    scale off, and `max_nonfinite_steps` bad steps in a row stop the run. The backbone's state goes through the
    backend (DeepSpeed keeps its own)."""

    def __init__(self, backbone, side: list, scheduler, scaler, backend, max_nonfinite_steps: int, log=print):
        self.backbone, self.side, self.scheduler, self.scaler = backbone, side, scheduler, scaler
        self.backend, self.max_nonfinite_steps, self.log = backend, max_nonfinite_steps, log
        self.average: ModelEmaV3 | None = None  # set once the weights it starts from are loaded
        self.nonfinite_in_a_row = 0

    def unscale_(self) -> None:
        """fp16: unscale every gradient before it is measured or clipped (the head's too)."""
        if self.scaler is not None:
            for optimizer in (self.backbone, *self.side):
                self.scaler.unscale_(_base(optimizer))

    def step_unless_nonfinite(self, flags, step: int) -> None:
        """Step everything (then the schedule and the average at `step + 1`), or skip the step on `flags`."""
        if not (flags.loss_bad or flags.grad_bad):
            self.nonfinite_in_a_row = 0
            for optimizer in self.side:
                self.scaler.step(optimizer) if self.scaler is not None else optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.backbone.step()  # Accelerate's wrapper: the scaler's step and update under fp16
            self.backbone.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            if self.average is not None:  # foreach lerps on the device, no host read
                self.average.update(self.backend.raw_model, step + 1)
            return
        if self.scaler is not None and not flags.loss_bad:  # an fp16 overflow: the scaler's business, not an error
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.nonfinite_in_a_row += 1
            self.log(f"step {step + 1}: non-finite loss or gradient, step skipped ({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise SystemExit(
                    f"stopping: {self.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps); "
                    "lower optim.lr, enable optim.grad_clip or use bf16 instead of fp16"
                )
        for optimizer in (self.backbone, *self.side):
            optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return current_lr(self.backbone)

    def state_dict(self) -> dict:
        """train_state.pt: the backbone optimizer's state (None under ZeRO), the schedule's, the scaler's."""
        return {
            "optimizer": self.backend.optimizer_state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Before `prepare` (the side optimizers load with their sharded modules' rows)."""
        self.backend.load_optimizer_state(self.backbone, state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
