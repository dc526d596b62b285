"""The head's own optimizer: the backbone's family at loss.head_lr_scale x its learning rate.

With negative-class sampling (loss.sample_rate < 1) a row that was not sampled got no gradient and must
not move: `RowSparseAdamW` updates only the rows of the step (moments, weight decay and a per-row step
count for the bias correction), leaving the others and their state untouched; for those rows training
is exactly AdamW on the steps where they were sampled. `RowSparseSGD` does the same for SGD with momentum
(arcface_torch's PartialFC v2 steps a dense SGD, so its unsampled rows decay and coast on momentum;
facedist keeps them still, so a row's trajectory depends only on the steps it took part in).
ScheduleFree cannot: its iterate is an average that moves every weight at zero gradient, so
ScheduleFree + sampling is refused at start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from facedist.config import Config, ConfigError
from facedist.optim import build_optimizer, lr_schedule


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Updates only the rows `touched_rows()` returns (None: all rows) of [rows, D] tensors, their per-row
    state with them; the learning rate is lr * schedule(number of optimizer steps), so no scheduler is needed."""

    def __init__(
        self,
        params,
        defaults: dict,
        schedule: Callable[[int], float] | None,
        touched_rows: Callable[[], torch.Tensor | None],
    ):
        super().__init__(params, {**defaults, "steps_taken": 0})
        self.schedule, self.touched_rows = schedule or (lambda step: 1.0), touched_rows

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update(self, weight, grad, state: dict[str, torch.Tensor], lr: float, group: dict) -> None:
        """One step of the optimizer on these rows, in place on `weight` and the tensors of `state`."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        rows = self.touched_rows()
        for group in self.param_groups:
            lr = group["lr"] * self.schedule(group["steps_taken"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                if rows is None:  # every row: update in place
                    self._update(p, p.grad, state, lr, group)
                    continue
                weight, selected = p[rows], {name: value[rows] for name, value in state.items()}
                self._update(weight, p.grad[rows], selected, lr, group)
                p.index_copy_(0, rows, weight)
                for name, value in selected.items():
                    state[name].index_copy_(0, rows, value)
            group["steps_taken"] += 1
        return loss


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW over [rows, D] tensors that updates only the rows `touched_rows()` returns (None: all rows).

    State per tensor: `exp_avg`, `exp_avg_sq` and `row_steps` (how often each row was updated, for the
    bias correction). With every row touched it is torch.optim.AdamW (same formula, same order of operations).
    """

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        schedule: Callable[[int], float] | None = None,
        touched_rows: Callable[[], torch.Tensor | None] = lambda: None,
    ):
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, schedule, touched_rows
        )

    def _new_state(self, p):
        return {
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
            "row_steps": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
        }

    def _update(self, weight, grad, state, lr, group):
        state["row_steps"] += 1
        _adamw_rows(weight, grad, state["exp_avg"], state["exp_avg_sq"], state["row_steps"], lr, group)


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum (and optional Nesterov) over [rows, D] tensors, updating only the touched rows:
    a row not sampled keeps its weight and momentum buffer and gets no weight decay.

    State: `momentum_buffer`, zero until a row's first update (0 x momentum + g is torch's first-step
    buffer g exactly). With every row touched it is torch.optim.SGD (same formula, same order of operations).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        schedule: Callable[[int], float] | None = None,
        touched_rows: Callable[[], torch.Tensor | None] = lambda: None,
    ):
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov},
            schedule,
            touched_rows,
        )

    def _new_state(self, p):
        return {"momentum_buffer": torch.zeros_like(p)}

    def _update(self, weight, grad, state, lr, group):
        grad = grad.add(weight, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        weight.add_(grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer, alpha=-lr)


def _adamw_rows(weight, grad, exp_avg, exp_avg_sq, row_steps, lr: float, group: dict) -> None:
    """torch.optim.AdamW's update, in place, with a bias correction per row from `row_steps`."""
    beta1, beta2 = group["betas"]
    shape = (-1,) + (1,) * (weight.dim() - 1)
    step_size = (lr / (1 - beta1 ** row_steps.double())).to(weight.dtype).view(shape)
    bias_correction2_sqrt = (1 - beta2 ** row_steps.double()).sqrt().to(weight.dtype).view(shape)
    weight.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    weight.sub_(exp_avg / denom * step_size)


def build_head_optimizer(params, cfg: Config, touched_rows: Callable[[], torch.Tensor | None] | None = None):
    """The optimizer of row-sharded head tensors: `cfg.optim.name` at lr * loss.head_lr_scale.

    adamw_cosine -> RowSparseAdamW, sgd -> RowSparseSGD, each with the backbone's schedule built in; the ScheduleFree
    family -> the same ScheduleFree optimizer as the backbone. `touched_rows` gives the rows of each step
    when the head samples classes (loss.sample_rate < 1; refused with ScheduleFree); None: all rows."""
    lr_scale = cfg.loss.head_lr_scale
    if cfg.optim.name == "adamw_cosine":
        return RowSparseAdamW(
            params,
            lr=cfg.optim.lr * lr_scale,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            schedule=lr_schedule(cfg.optim, cfg.train.max_steps),
            touched_rows=touched_rows or (lambda: None),
        )
    if cfg.optim.name == "sgd":
        return RowSparseSGD(
            params,
            lr=cfg.optim.lr * lr_scale,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
            schedule=lr_schedule(cfg.optim, cfg.train.max_steps),
            touched_rows=touched_rows or (lambda: None),
        )
    if touched_rows is not None and cfg.loss.sample_rate < 1:
        raise ConfigError(
            f"loss.sample_rate={cfg.loss.sample_rate} with optim.name={cfg.optim.name}: ScheduleFree "
            "moves every class centre each step (its averaging acts at zero gradient), so unsampled "
            "rows would drift; use optim.name=sgd or adamw_cosine, or loss.sample_rate=1"
        )
    optimizer, _ = build_optimizer(params, cfg.optim, cfg.train.max_steps, lr_scale=lr_scale)
    return optimizer
