"""Margin functions against their formulas written out on angles (math module, not the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

import facedist  # noqa: F401
from facedist.config import ConfigError, LossConfig
from facedist.heads import margins

THETAS = [0.05, 0.4, math.pi / 2, 2.5, 2.9, 3.1]


def _cos(thetas):
    return torch.tensor([math.cos(t) for t in thetas], dtype=torch.float64)


def _expect(values):
    return torch.tensor(values, dtype=torch.float64)


def test_arcface_adds_the_angle_and_falls_back_past_pi():
    m = 0.5
    expected = [math.cos(t + m) if t + m <= math.pi else math.cos(t) - m * math.sin(m) for t in THETAS]
    torch.testing.assert_close(margins.arcface(_cos(THETAS), m), _expect(expected))
    assert any(t + m > math.pi for t in THETAS) and any(t + m <= math.pi for t in THETAS)


def test_arcface_easy_margin_only_where_cosine_is_positive():
    m = 0.5
    expected = [math.cos(t + m) if math.cos(t) > 0 else math.cos(t) for t in THETAS]
    torch.testing.assert_close(margins.arcface(_cos(THETAS), m, easy_margin=True), _expect(expected))


def test_cosface_subtracts_the_margin():
    torch.testing.assert_close(margins.cosface(_cos(THETAS), 0.35), _cos(THETAS) - 0.35)


def test_combined_margin_formula_and_special_cases():
    m1, m2, m3 = 0.9, 0.3, 0.2
    inside = [t for t in THETAS if m1 * t + m2 <= math.pi]
    torch.testing.assert_close(
        margins.combined(_cos(inside), m1, m2, m3), _expect([math.cos(m1 * t + m2) - m3 for t in inside])
    )
    cos = _cos(THETAS)
    torch.testing.assert_close(margins.combined(cos, 1.0, 0.5, 0.0), margins.arcface(cos, 0.5))
    torch.testing.assert_close(margins.combined(cos, 1.0, 0.0, 0.35), margins.cosface(cos, 0.35))
    # past the threshold: cos - m3 - first-order penalty ((m1 - 1) theta_th + m2) sin(theta_th)
    m1 = 1.3
    theta_th = (math.pi - m2) / m1
    past = [t for t in THETAS if t > theta_th]
    penalty = ((m1 - 1) * theta_th + m2) * math.sin(theta_th)
    torch.testing.assert_close(
        margins.combined(_cos(past), m1, m2, m3), _expect([math.cos(t) - m3 - penalty for t in past])
    )


@pytest.mark.parametrize(
    "margin",
    [
        lambda c: margins.arcface(c, 0.5),
        lambda c: margins.combined(c, 1.3, 0.2, 0.1),
        lambda c: margins.combined(c, 0.8, 0.4, 0.0),
        lambda c: margins.sphereface(c, 4, step=0),
        lambda c: margins.sphereface(c, 4, step=100_000),
        lambda c: margins.sphereface(c, 3, step=50),
    ],
)
def test_target_logit_never_increases_with_the_angle(margin):
    thetas = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    values = margin(torch.cos(thetas))
    assert torch.all(values[1:] <= values[:-1] + 1e-12)


def test_sphereface_psi_and_lambda_annealing():
    assert margins.sphereface_lambda(0) == 1000.0
    assert margins.sphereface_lambda(10) == pytest.approx(1000.0 / 2.2)
    assert margins.sphereface_lambda(10_000_000) == 5.0
    # m = 4: psi(pi/8) = cos(pi/2) = 0 (k = 0); psi(3pi/8) = -cos(3pi/2) - 2 = -2 (k = 1)
    lam = margins.sphereface_lambda(10_000_000)
    thetas = [math.pi / 8, 3 * math.pi / 8]
    expected = [(lam * math.cos(t) + psi) / (1 + lam) for t, psi in zip(thetas, [0.0, -2.0])]
    torch.testing.assert_close(margins.sphereface(_cos(thetas), 4, step=10_000_000), _expect(expected))


def test_adacos_scales():
    assert margins.adacos_fixed_scale(11) == pytest.approx(math.sqrt(2) * math.log(10))
    s = margins.adacos_dynamic_scale(torch.tensor(50.0), torch.tensor(0.5))
    assert float(s) == pytest.approx(math.log(50.0) / math.cos(0.5), rel=1e-6)
    s = margins.adacos_dynamic_scale(torch.tensor(50.0), torch.tensor(1.2))  # median angle capped at pi/4
    assert float(s) == pytest.approx(math.log(50.0) / math.cos(math.pi / 4), rel=1e-6)


def test_gradients_stay_finite_at_the_ends():
    cos = torch.tensor([1.0, -1.0, 0.999999999], requires_grad=True)
    for fn in (lambda c: margins.arcface(c, 0.5), lambda c: margins.sphereface(c, 4, 0)):
        (grad,) = torch.autograd.grad(fn(cos).sum(), cos)
        assert torch.isfinite(grad).all()


def test_build_margin_checks_the_config():
    assert margins.build_margin(LossConfig(head="adacos"))(torch.tensor([0.3]), 0).item() == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="loss.margin=0.5"):
        margins.build_margin(LossConfig(head="sphereface", margin=0.5))
    with pytest.raises(ConfigError, match="loss.m1"):
        margins.build_margin(LossConfig(head="combined", m1=0.0))
    sphere = margins.build_margin(LossConfig(head="sphereface", margin=4))
    torch.testing.assert_close(sphere(_cos([0.3]), 7), margins.sphereface(_cos([0.3]), 4, 7))
