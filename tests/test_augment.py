import numpy as np
import pytest
import torch

from facedist.config import AugmentConfig
from facedist.data import augment as aug
from facedist.data.gpu_decode import warp_batch

SEED_RECIPE = AugmentConfig(crop_scale_min=0.8, rotation=15, brightness=0.2, contrast=0.2, saturation=0.2)


def _face(size=40, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    smooth = np.stack([np.sin(x / 5 + c) * np.cos(y / 7 - c) for c in range(3)], -1)
    return np.clip(128 + 100 * smooth + rng.normal(0, 3, smooth.shape), 1, 255).astype(np.uint8)


def test_default_is_flip_only_and_exact():
    image = _face()
    flips = 0
    for seed in range(20):
        draw = aug.draw(seed, AugmentConfig(), image.shape[:2], 40)
        out = aug.warp(image, draw.matrix, 40)
        planes = image.transpose(2, 0, 1)
        flipped = np.array_equal(out, planes[:, :, ::-1])
        assert flipped or np.array_equal(out, planes)  # no resampling at all
        assert np.all(draw.photometric[:4] == 1) and np.all(draw.photometric[4:] == 0)
        flips += flipped
    assert 0 < flips < 20


def test_warp_keeps_aspect_and_has_no_black_corners():
    image = _face()
    for seed in range(10):
        draw = aug.draw(seed, SEED_RECIPE, image.shape[:2], 40)
        linear = draw.matrix[:, :2]
        singular = np.linalg.svd(linear, compute_uv=False)
        np.testing.assert_allclose(singular[0], singular[1], rtol=1e-12)  # same scale on both axes: aspect kept
        assert 0.8**0.5 * 40 / 40 - 1e-9 <= singular[0] <= 1 + 1e-9  # zoom in by at most 1/sqrt(crop_scale_min)
        out = aug.warp(image, draw.matrix, 40)
        assert out.dtype == np.uint8 and out.shape == (3, 40, 40) and out.min() > 0  # border replicated, not black


def test_draws_are_keyed_and_each_option_leaves_the_others_alone():
    a = aug.draw(7, SEED_RECIPE, (40, 40), 32)
    b = aug.draw(7, SEED_RECIPE, (40, 40), 32)
    assert np.array_equal(a.matrix, b.matrix) and np.array_equal(a.photometric, b.photometric)
    with_gamma = aug.draw(7, AugmentConfig(**{**SEED_RECIPE.__dict__, "gamma": 0.3}), (40, 40), 32)
    assert np.array_equal(with_gamma.matrix, a.matrix) and np.array_equal(with_gamma.photometric[:3], a.photometric[:3])
    assert 0.7 <= with_gamma.photometric[3] <= 1.3 and a.photometric[3] == 1
    shaded = aug.draw(7, AugmentConfig(**{**SEED_RECIPE.__dict__, "shading": 0.5}), (40, 40), 32)
    assert np.array_equal(shaded.matrix, a.matrix) and np.array_equal(shaded.photometric[:4], a.photometric[:4])
    assert np.all(a.photometric[4:] == 0) and 0 < np.hypot(*shaded.photometric[4:]) <= 0.5 / np.sqrt(2) + 1e-7


def test_gpu_warp_uses_the_same_affine_map_as_the_cpu_warp():
    """grid_sample with grid_theta(matrix) (the data.decode=gpu warp, run here on the CPU) ~ warpAffine(matrix)."""
    image = _face(48)
    for source, size in (((48, 48), 32), ((48, 48), 48)):
        draws = [aug.draw(seed, SEED_RECIPE, source, size) for seed in range(6)]
        cpu = np.stack([aug.warp(image, d.matrix, size) for d in draws]).astype(int)
        theta = torch.from_numpy(np.stack([aug.grid_theta(d.matrix, source, size) for d in draws])).float()
        images = torch.from_numpy(image).permute(2, 0, 1)[None].expand(len(draws), -1, -1, -1)
        gpu = warp_batch(images, theta, size).numpy().astype(int)
        assert gpu.shape == cpu.shape
        assert np.abs(gpu - cpu).max() <= 2  # fixed-point vs float bilinear weights


def test_gamma_table():
    assert np.array_equal(aug.gamma_table(1.0), np.arange(256))
    table = aug.gamma_table(0.5)
    assert table[0] == 0 and table[255] == 255 and table[64] == pytest.approx(255 * (64 / 255) ** 0.5, abs=0.5)
