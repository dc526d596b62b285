"""Encoded shard images -> RGB uint8 arrays at the model's size, the same way in training and evaluation.

Decoders chosen by measurement (docs/benchmarks.md; one core, 112 and 224 px): JPEG with simplejpeg
(libjpeg-turbo, straight to RGB; faster than OpenCV and ~2x faster than Pillow at 224 px, and strict:
a truncated or damaged file raises instead of decoding half an image), PNG / WebP with OpenCV (~1.6x
faster than Pillow). OpenCV gives no reason when it fails, so Pillow re-decodes a failed image to say why.

Image-size rule (train, eval, inference alike): an image that is not the model's size is brought to it
exactly as the shard builder does (centre square crop, bicubic resize: `shards.square_resize`).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from facedist.data.shards import square_resize
from facedist.data.shards.images import failure_reason


class DecodeError(ValueError):
    """An encoded image cannot be decoded; the message says why."""


def _reason(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # noqa: BLE001  (any decoder failure is the reason we report)
        return failure_reason(err)  # Pillow's own text would hold the repr of the BytesIO
    return "OpenCV could not decode it"


def decode_rgb(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB of a jpg/png/webp image; DecodeError with the cause when it is damaged."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: warnings (truncation) raise too
        except ValueError as err:
            raise DecodeError(f"corrupt JPEG ({str(err).strip() or 'libjpeg-turbo error'})") from err
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise DecodeError(f"not a decodable image ({_reason(data)})")
    return image


def to_model_size(image: np.ndarray, size: int) -> np.ndarray:
    """`image` as the shard builder would store it at `size` px (unchanged when it already is)."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(square_resize(Image.fromarray(image), size))
