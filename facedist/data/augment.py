"""Augmentation parameters drawn from an item's aug_seed, and the one geometric warp done per image on the CPU.

Geometry (crop / scale / translation / rotation / flip) is ONE affine map from output pixels to source
pixels, applied with OpenCV's `warpAffine` (bilinear, replicated border: no black corners; the same
scale on both axes: the aspect ratio is kept). OpenCV because it measured 4x faster than Pillow's
affine transform for the same bilinear warp (docs/benchmarks.md). The photometric part (brightness,
contrast, saturation, gamma, directional shading) only draws its factors here; it runs on the training
device on the whole
batch (facedist/data/device_augment.py). The GPU decode path turns the same matrix into an
`affine_grid` theta (`grid_theta`), so both paths share this parameter drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from facedist.config import AugmentConfig

PHOTOMETRIC = ("brightness", "contrast", "saturation", "gamma")  # factors: the first columns of `Draw.photometric`
SHADING_COLUMNS = 2  # then the shading ramp's slopes along x and y (0 = no shading)


@dataclass
class Draw:
    matrix: np.ndarray  # [2, 3] float64: output pixel (u, v, 1) -> source pixel (x, y), OpenCV's inverse map
    photometric: np.ndarray  # [6] float32: PHOTOMETRIC factors (1 = unchanged), then the shading slopes (0 = none)


def has_photometric(augment: AugmentConfig) -> bool:
    return any(getattr(augment, name) > 0 for name in (*PHOTOMETRIC, "shading"))


def draw(aug_seed: int | None, augment: AugmentConfig, source_hw: tuple[int, int], size: int) -> Draw:
    """The augmentation of one item, a pure function of its aug_seed (None: un-augmented, centre square)."""
    height, width = source_hw
    side = min(height, width)  # the centred square the shard builder keeps from a non-square image
    centre_x, centre_y = width / 2, height / 2
    angle, flip, photometric = 0.0, False, [1.0] * len(PHOTOMETRIC) + [0.0] * SHADING_COLUMNS
    if aug_seed is not None:
        # a fixed number of draws in a fixed order: enabling one option never changes another's values;
        # Python floats from here on (numpy scalars cost ~1 us an operation, a sizeable part of an image's time)
        u = np.random.default_rng(aug_seed).random(7 + len(PHOTOMETRIC) + SHADING_COLUMNS).tolist()
        room = min(height, width)
        side *= math.sqrt(augment.crop_scale_min + (1 - augment.crop_scale_min) * u[0])  # area fraction, square
        slack = (room - side) / 2  # the crop moves inside the centred square, then by translate
        centre_x += (2 * u[1] - 1) * slack + (2 * u[3] - 1) * augment.translate * room
        centre_y += (2 * u[2] - 1) * slack + (2 * u[4] - 1) * augment.translate * room
        angle = math.radians((2 * u[5] - 1) * augment.rotation)
        flip = augment.hflip and u[6] < 0.5
        for k, name in enumerate(PHOTOMETRIC):  # factor uniform in [max(0, 1 - strength), 1 + strength]
            low, high = max(0.0, 1 - getattr(augment, name)), 1 + getattr(augment, name)
            photometric[k] = low + (high - low) * u[7 + k]
        # directional shading: the ramp's slope vector, strength uniform in [0, shading], direction uniform; the
        # ramp is x cos + y sin over [-1, 1] coordinates / sqrt(2), so it spans at most [-1, 1] on the image
        strength, direction = augment.shading * u[11] / math.sqrt(2), 2 * math.pi * u[12]
        photometric[4:] = strength * math.cos(direction), strength * math.sin(direction)
    scale = side / size
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    a, b, c, d = (-cos if flip else cos), -sin, (-sin if flip else sin), cos  # [[a, b], [c, d]]: output -> source
    # output pixel centres (u + 0.5) around the output centre, mapped to source pixel centres (x + 0.5)
    half = 0.5 - size / 2
    matrix = np.array([[a, b, centre_x - 0.5 + (a + b) * half], [c, d, centre_y - 0.5 + (c + d) * half]])
    return Draw(matrix, np.array(photometric, np.float32))


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """`image` [H, W, 3] uint8 resampled through `matrix` (see Draw) to planes [3, size, size] uint8: the
    device step works plane by plane, and OpenCV's split measured 6x faster than a torch permute there."""
    if image.shape[:2] == (size, size) and np.array_equal(matrix, [[1, 0, 0], [0, 1, 0]]):
        warped = image  # exact identity / mirror (no crop, rotation or shift): no resampling
    elif image.shape[:2] == (size, size) and np.array_equal(matrix, [[-1, 0, size - 1], [0, 1, 0]]):
        warped = cv2.flip(image, 1)
    else:
        warped = cv2.warpAffine(
            image, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
        )
    planes = np.empty((3, size, size), np.uint8)
    cv2.split(warped, list(planes))
    return planes


def grid_theta(matrix: np.ndarray, source_hw: tuple[int, int], size: int) -> np.ndarray:
    """The same map as `matrix` in `affine_grid`'s normalised coordinates (align_corners=False)."""

    def to_normalised(height, width):  # pixel index -> [-1, 1], pixel centres at (2i + 1) / n - 1
        return np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])

    full = np.vstack([matrix, [0, 0, 1]])
    return (to_normalised(*source_hw) @ full @ np.linalg.inv(to_normalised(size, size)))[:2]


def gamma_table(gamma: float) -> np.ndarray:
    """uint8 -> uint8 lookup table of v ** gamma (a table, not a float pow on the batch: pow's vector and
    scalar code paths differ by an ulp, which would make a batch depend on how it is split)."""
    return np.round(255 * (np.arange(256) / 255) ** float(gamma)).astype(np.uint8)
