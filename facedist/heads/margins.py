"""Margin functions of the classification heads: target cosine -> modified target cosine, and the scales.

Every margin takes the cosine between an embedding and its own class centre (fp32: arccos near 1 is badly
conditioned in half precision) and returns what replaces it in the logits before the scale s; non-target
logits stay s * cos. The sharding (facedist.heads.sharded_softmax) applies them on the rank that owns the
target class and knows nothing else about them.

- combined (m1, m2, m3): cos(m1 * theta + m2) - m3 (InsightFace's combined margin). Past the point where
  m1 * theta + m2 reaches pi the curve would turn back up (a worse embedding would get a better logit);
  there the usual rule applies: cos(theta) - m3 minus the first-order penalty at that point,
  ((m1 - 1) * theta_th + m2) * sin(theta_th), which for m1 = 1 is ArcFace's cos(theta) - m * sin(m).
  easy_margin instead keeps the margin only where cos(theta) > 0 and uses cos(theta) - m3 elsewhere.
- arcface = combined(1, m, 0); cosface = combined(1, 0, m).
- sphereface: the A-Softmax psi(theta) = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m] (monotone for
  any integer m), blended with cos(theta) as (lambda cos + psi) / (1 + lambda), lambda annealed like the
  original training: max(5, 1000 / (1 + 0.12 * step)). Features are normalised, so s replaces ||x||.
- adacos: no margin; s = sqrt(2) ln(C - 1) fixed, or updated each step from the batch
  (s = ln(B_avg) / cos(min(pi/4, theta_median)), Zhang et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from facedist.config import ConfigError, LossConfig

# keeps arccos' derivative finite at |cos| = 1 (fp32)
_COS_LIMIT = 1.0 - 1e-6

# A-Softmax lambda annealing of the original SphereFace training (base, gamma, power, lambda_min)
SPHEREFACE_LAMBDA = (1000.0, 0.12, 1.0, 5.0)

Margin = Callable[[torch.Tensor, int], torch.Tensor]


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-_COS_LIMIT, _COS_LIMIT))


def combined(cos: torch.Tensor, m1: float, m2: float, m3: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(m1 * theta + m2) - m3 with the monotone fallback (or easy margin) described in the module doc."""
    theta = _angle(cos)
    target = torch.cos(m1 * theta + m2) - m3
    if easy_margin:
        return torch.where(cos > 0, target, cos - m3)
    theta_th = (math.pi - m2) / m1  # where m1 * theta + m2 reaches pi
    if theta_th >= math.pi:
        return target
    penalty = ((m1 - 1.0) * theta_th + m2) * math.sin(theta_th)
    return torch.where(theta <= theta_th, target, cos - m3 - penalty)


def arcface(cos: torch.Tensor, m: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(theta + m); past theta + m = pi: cos(theta) - m sin(m) (or the easy margin)."""
    return combined(cos, 1.0, m, 0.0, easy_margin)


def cosface(cos: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta) - m."""
    return cos - m


def sphereface_lambda(step: int) -> float:
    """The original A-Softmax annealing: lambda = max(lambda_min, base * (1 + gamma * step) ** -power)."""
    base, gamma, power, lambda_min = SPHEREFACE_LAMBDA
    return max(lambda_min, base * (1.0 + gamma * step) ** -power)


def sphereface(cos: torch.Tensor, m: int, step: int) -> torch.Tensor:
    """(lambda cos(theta) + psi(theta)) / (1 + lambda), psi(theta) = (-1)^k cos(m theta) - 2k."""
    theta = _angle(cos)
    k = torch.floor(m * theta / math.pi).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    psi = sign * torch.cos(m * theta) - 2.0 * k
    lam = sphereface_lambda(step)
    return (lam * cos + psi) / (1.0 + lam)


def adacos_fixed_scale(num_classes: int) -> float:
    """AdaCos' fixed scale sqrt(2) * ln(C - 1) (needs C >= 3 to be positive)."""
    return math.sqrt(2.0) * math.log(num_classes - 1)


def adacos_dynamic_scale(mean_negative_exp_sum: torch.Tensor, median_target_angle: torch.Tensor) -> torch.Tensor:
    """s = ln(B_avg) / cos(min(pi/4, theta_med)); B_avg = mean over samples of sum_{j != y} exp(s_old cos_j)."""
    return torch.log(mean_negative_exp_sum) / torch.cos(median_target_angle.clamp(max=math.pi / 4))


def _no_margin(cos: torch.Tensor, step: int) -> torch.Tensor:
    return cos


def build_margin(cfg: LossConfig) -> Margin:
    """The target-cosine function `margin(cos, step)` of `cfg.head` (identity for the AdaCos heads)."""
    if cfg.head == "arcface":
        return lambda cos, step: arcface(cos, cfg.margin, cfg.easy_margin)
    if cfg.head == "cosface":
        return lambda cos, step: cosface(cos, cfg.margin)
    if cfg.head == "combined":
        if cfg.m1 <= 0:
            raise ConfigError(f"loss.m1={cfg.m1}: the multiplicative margin must be > 0 (1 for none)")
        return lambda cos, step: combined(cos, cfg.m1, cfg.m2, cfg.m3, cfg.easy_margin)
    if cfg.head == "sphereface":
        if cfg.margin < 1 or cfg.margin != int(cfg.margin):
            raise ConfigError(
                f"loss.margin={cfg.margin}: sphereface needs an integer multiplicative margin m >= 1 "
                "(the paper uses loss.margin=4)"
            )
        m = int(cfg.margin)
        return lambda cos, step: sphereface(cos, m, step)
    if cfg.head in ("adacos", "adacos_fixed"):
        return _no_margin
    raise ConfigError(f"loss.head={cfg.head!r} has no margin function")
