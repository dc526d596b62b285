"""The device step: photometric augmentation + normalisation against a plain float64 reference, and the
same bits however the batch is chunked."""

import numpy as np
import pytest
import torch

from facedist.config import AugmentConfig
from facedist.data import augment as aug
from facedist.data import device_augment
from facedist.data.device_augment import GREY, DeviceAugment

PREP = {"image_size": 20, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
STRONG = AugmentConfig(brightness=0.6, contrast=0.6, saturation=0.8, gamma=0.5, shading=0.9)


class _Dataset:  # what DeviceAugment reads of a FaceDataset
    def __init__(self, augment):
        self.augment, self.preprocessing, self.size = augment, PREP, PREP["image_size"]


def _batch(count=6, seed=0):
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (count, 3, 20, 20), dtype=np.uint8))
    draws = [aug.draw(seed * 100 + k, STRONG, (20, 20), 20) for k in range(count)]
    factors = torch.from_numpy(np.stack([d.photometric for d in draws]))
    tables = torch.from_numpy(np.stack([aug.gamma_table(d.photometric[3]) for d in draws]))
    return images, factors, tables


def _reference(images, factors, tables):
    """gamma (table), shading, saturation, brightness, contrast (to the mean grey before shading), clamp,
    normalise: one image at a time, float64, pixel by pixel."""
    out = []
    for image, (brightness, contrast, saturation, _, slope_x, slope_y), table in zip(images, factors.double(), tables):
        x = table[image.long()].double()
        mean_grey = sum(w * x[c] for c, w in enumerate(GREY)).mean()
        size = x.shape[-1]
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
        x = x * (1 + slope_x * centres.view(1, 1, size) + slope_y * centres.view(1, size, 1))
        grey = sum(w * x[c] for c, w in enumerate(GREY))
        x = saturation * x + (1 - saturation) * grey
        x = brightness * x
        x = contrast * x + (1 - contrast) * brightness * mean_grey
        x = x.clamp(0, 255) / 255
        out.append((x - torch.tensor(PREP["mean"]).view(3, 1, 1)) / torch.tensor(PREP["std"]).view(3, 1, 1))
    return torch.stack(out)


def test_photometric_step_matches_a_plain_reference():
    images, factors, tables = _batch()
    result = DeviceAugment(_Dataset(STRONG), "cpu").augment_and_normalise(images, factors, tables)
    assert result.dtype == torch.float32 and result.shape == (6, 3, 20, 20) and result.is_contiguous()
    torch.testing.assert_close(result.double(), _reference(images, factors, tables), rtol=0, atol=2e-5)
    # the factors were strong enough to clamp: the bound is reached, as in the reference
    assert torch.isclose(result, result.new_tensor((1 - 0.485) / 0.229)).any()
    # shading darkens one side: with every other factor at 1, the mean over the image halves follows the slope
    neutral = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.8, 0.0]).expand(len(images), 6)
    shaded = DeviceAugment(_Dataset(STRONG), "cpu").augment_and_normalise(torch.full_like(images, 100), neutral, None)
    assert shaded[..., :10].mean() < shaded[..., 10:].mean()


def test_without_photometric_options_it_only_normalises():
    images, _, _ = _batch()
    ones = torch.tensor([[1.0] * 4 + [0.0] * 2]).expand(len(images), 6)
    result = DeviceAugment(_Dataset(AugmentConfig()), "cpu").augment_and_normalise(images, ones, None)
    expected = (images.double() / 255 - torch.tensor(PREP["mean"]).view(3, 1, 1)) / torch.tensor(PREP["std"]).view(
        3, 1, 1
    )
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_images", [1, 4])
def test_chunked_passes_give_the_same_bits_as_one_pass(monkeypatch, chunk_images):
    images, factors, tables = _batch(count=9, seed=1)
    step = DeviceAugment(_Dataset(STRONG), "cpu")
    whole = step.augment_and_normalise(images, factors, tables)
    monkeypatch.setattr(device_augment, "CPU_CHUNK_BYTES", chunk_images * 4 * 3 * 20 * 20)
    assert torch.equal(step.augment_and_normalise(images, factors, tables), whole)
    # and an image's result does not depend on its neighbours in the batch
    assert torch.equal(step.augment_and_normalise(images[3:5], factors[3:5], tables[3:5]), whole[3:5])
