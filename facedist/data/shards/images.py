"""Image bytes in, image bytes out: how the shard builder (and inference, through it) decodes and re-encodes.

Decoding applies the EXIF orientation and returns RGB; 16-bit greyscale is scaled by its bit depth (never
stretched per image), so a 16-bit scan and its 8-bit twin give the same pixels. Every image is
CENTRE-CROPPED to a square (the shorter side is kept) and resized with bicubic filtering, then encoded
with fixed encoder settings, so the same input gives the same bytes on every run and machine.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageOps

from facedist.data.shards.layout import IMAGE_FORMATS, ShardError


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (raises on corrupt/truncated data), apply EXIF orientation, return RGB.

    16-bit greyscale (Pillow modes I;16* and I) keeps its high byte, i.e. is scaled by the bit depth, so it
    decodes exactly as its 8-bit twin and as OpenCV reads it; float images are clipped to 0..255 by Pillow.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode == "I" or image.mode.startswith("I;16"):
            pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
            image = Image.fromarray((pixels >> 8).astype(np.uint8))
        return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square (keeping the shorter side) and resize to `size` x `size`."""
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    """`image` as jpg/png/webp bytes with fixed encoder settings (same bytes on every run)."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    elif image_format == "png":
        image.save(buffer, "PNG", compress_level=6)
    elif image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=4)
    else:
        raise ShardError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    return buffer.getvalue()


def failure_reason(error: Exception) -> str:
    """Why an image failed to decode, in a few words for report.json and verify."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image (Pillow cannot identify it)"
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"corrupt image ({type(error).__name__}: {text})"


@functools.lru_cache(maxsize=1)
def face_aligner(size: int):
    """The process's FaceAligner for `size` px crops (once per worker: building one costs two detections)."""
    from facedist.align import FaceAligner

    return FaceAligner(size)


_PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def fits_as_is(data: bytes, size: int, image_format: str) -> bool:
    """The bytes are already a size x size RGB image of `image_format` without an EXIF rotation (header only)."""
    with Image.open(io.BytesIO(data)) as image:
        return (
            _PIL_FORMATS.get(image.format) == image_format
            and image.size == (size, size)
            and image.mode == "RGB"
            and image.getexif().get(0x0112, 1) == 1
        )
