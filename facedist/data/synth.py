"""Synthetic face identities: procedurally drawn faces for tests, demos and benchmarks.

Each identity is a set of appearance parameters drawn from `(seed, identity)` only: face outline
(width, height, squareness, chin taper), skin, hair (colour, style, hairline), eyes (spacing, height,
size, shape, iris colour), brows, nose, mouth, ears, and distinctive marks (moles, a birthmark, a face
paint stripe, freckles, glasses, beard). Each image is drawn from `(seed, identity, image)` only, with
nuisances that destroy pixel alignment but keep shapes and colour ratios: a cluttered random background,
shift, rotation, scale, a small pose change (features slide sideways, the face narrows), expression
(mouth curve, eye openness), lighting (gain, gradient, gamma, colour cast), blur, noise and a partial
occlusion. So a CNN can learn identity from shape and colour, while raw-pixel similarity is weak.

`facedist-shards synth OUT` writes `OUT/id_00000/0000.png, ...` (an identity-folder tree, the input
format of `facedist-shards build`).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facedist.data.shards import encode_image, worker_pool
from facedist.durable import write_bytes_atomic

SUPERSAMPLE = 2  # faces are drawn at 2x and resampled once, which anti-aliases their edges
HAIR_STYLES = ("bald", "short", "long", "bangs", "side_part")


def identity_name(identity: int) -> str:
    """Folder name of synthetic identity `identity` (sorts in identity order)."""
    return f"id_{identity:05d}"


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _scale_colour(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in rgb)


@dataclass(frozen=True)
class FaceIdentity:
    """Appearance of one identity; lengths are fractions of the face width/height or of the image."""

    face_w: float
    face_h: float
    squareness: float  # superellipse exponent: 2 = ellipse, larger = squarer jaw
    chin_taper: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    hairline: float  # how far the hair comes down, fraction of face height
    eye_spacing: float
    eye_y: float
    eye_rx: float
    eye_ratio: float
    iris: tuple[int, int, int]
    brow_thickness: float
    brow_tilt: float
    brow_gap: float
    nose_kind: int  # 0 triangle, 1 line, 2 round tip
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    mouth_thickness: float
    mouth_curve: float
    lips: tuple[int, int, int]
    ear_size: float
    moles: tuple[tuple[float, float, float], ...]  # (u, v, radius) in face coordinates
    birthmark: tuple[float, float, float, float, tuple[int, int, int]] | None  # u, v, rx, ry, colour
    paint: tuple[float, float, float, float, float, tuple[int, int, int]] | None  # u0,v0,u1,v1,width,colour
    freckles: tuple[tuple[float, float], ...]
    glasses: tuple[int, int, int] | None
    beard: tuple[int, int, int] | None


def sample_identity(seed: int, identity: int) -> FaceIdentity:
    """The appearance of identity `identity`; a pure function of (seed, identity)."""
    rng = np.random.default_rng([seed, 0, identity])
    u = rng.uniform
    skin = _hsv(u(0.0, 0.12), u(0.15, 0.75), u(0.3, 0.97))
    hair = _hsv(u(0, 1), u(0, 1) ** 0.5 * 0.9, u(0.08, 0.95))
    moles = tuple((u(-0.8, 0.8), u(-0.5, 0.8), u(0.02, 0.05)) for _ in range(rng.integers(0, 4)))
    birthmark = None
    if u() < 0.35:
        birthmark = (
            u(-0.6, 0.6),
            u(-0.4, 0.7),
            u(0.08, 0.2),
            u(0.06, 0.15),
            _hsv(u(0.9, 1.05), u(0.3, 0.7), u(0.3, 0.7)),
        )
    paint = None
    if u() < 0.3:
        paint = (
            u(-0.9, 0.9),
            u(-0.5, 0.9),
            u(-0.9, 0.9),
            u(-0.5, 0.9),
            u(0.04, 0.1),
            _hsv(u(0, 1), u(0.6, 1), u(0.5, 1)),
        )
    freckles = tuple((u(-0.6, 0.6), u(0.0, 0.45)) for _ in range(rng.integers(8, 20))) if u() < 0.3 else ()
    glasses = _hsv(u(0, 1), u(0, 1), u(0, 0.8)) if u() < 0.3 else None
    beard = _scale_colour(hair, u(0.6, 1.0)) if u() < 0.3 else None
    return FaceIdentity(
        face_w=u(0.5, 0.66),
        face_h=u(0.62, 0.78),
        squareness=u(1.8, 3.6),
        chin_taper=u(0.0, 0.45),
        skin=skin,
        hair=hair,
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        hairline=u(0.12, 0.4),
        eye_spacing=u(0.26, 0.48),
        eye_y=u(-0.2, 0.05),
        eye_rx=u(0.07, 0.13),
        eye_ratio=u(0.35, 0.9),
        iris=_hsv(u(0, 1), u(0.3, 1), u(0.2, 0.9)),
        brow_thickness=u(0.02, 0.07),
        brow_tilt=u(-0.35, 0.35),
        brow_gap=u(0.06, 0.16),
        nose_kind=int(rng.integers(3)),
        nose_len=u(0.12, 0.3),
        nose_w=u(0.08, 0.22),
        mouth_y=u(0.42, 0.62),
        mouth_w=u(0.22, 0.55),
        mouth_thickness=u(0.025, 0.08),
        mouth_curve=u(-0.08, 0.12),
        lips=_hsv(u(0.93, 1.03), u(0.3, 0.8), u(0.3, 0.85)),
        ear_size=u(0.0, 0.14),
        moles=moles,
        birthmark=birthmark,
        paint=paint,
        freckles=freckles,
        glasses=glasses,
        beard=beard,
    )


class _FaceFrame:
    """Maps face coordinates (u, v in [-1, 1] across the face box, v down) to pixels of the drawing canvas."""

    def __init__(self, face: FaceIdentity, canvas: int, yaw: float, squeeze: float):
        self.cx, self.cy = canvas / 2, canvas * 0.52
        self.a = face.face_w * canvas / 2 * squeeze  # half width
        self.b = face.face_h * canvas / 2
        self.yaw = yaw  # features slide sideways by this fraction of the half width

    def xy(self, u: float, v: float) -> tuple[float, float]:
        return self.cx + (u + self.yaw) * self.a, self.cy + v * self.b

    def stroke(self, width: float) -> int:
        """A line width given in face half-widths, in whole pixels (at least 1)."""
        return max(1, int(width * self.a))

    def box(self, u: float, v: float, ru: float, rv: float) -> list[float]:
        x, y = self.xy(u, v)
        return [x - ru * self.a, y - rv * self.b, x + ru * self.a, y + rv * self.b]


def _outline(face: FaceIdentity, frame: _FaceFrame, scale: float = 1.0, points: int = 48) -> list[tuple[float, float]]:
    """Superellipse face outline with a tapered chin."""
    out = []
    e = 2.0 / face.squareness
    for t in np.linspace(0, 2 * math.pi, points, endpoint=False):
        c, s = math.cos(t), math.sin(t)
        x = math.copysign(abs(c) ** e, c)
        y = math.copysign(abs(s) ** e, s)
        if y > 0:
            x *= 1 - face.chin_taper * y * y
        out.append((frame.cx + x * frame.a * scale, frame.cy + y * frame.b * scale))
    return out


def _draw_head(d: ImageDraw.ImageDraw, face: FaceIdentity, f: _FaceFrame, yaw: float) -> None:
    """Hair, ears, the face outline and the marks on the skin (birthmark, freckles, paint, moles, beard)."""
    if face.hair_style == "long":
        d.rectangle([f.cx - f.a * 1.15, f.cy - f.b * 0.6, f.cx + f.a * 1.15, f.cy + f.b * 1.05], fill=face.hair)
    if face.hair_style != "bald":
        d.ellipse([f.cx - f.a * 1.1, f.cy - f.b * 1.1, f.cx + f.a * 1.1, f.cy + f.b * 0.6], fill=face.hair)
    if face.ear_size > 0.03:
        for side in (-1, 1):
            d.ellipse(
                f.box(side * (1.0 - face.ear_size * 0.3) - yaw, -0.05, face.ear_size, face.ear_size * 2.2),
                fill=face.skin,
            )
    d.polygon(_outline(face, f), fill=face.skin)
    if face.hair_style != "bald":
        hairline = -1 + face.hairline * 2
        d.polygon([p for p in _outline(face, f, 1.03) if p[1] < f.cy + f.b * hairline], fill=face.hair)
        if face.hair_style == "bangs":
            d.rectangle([*f.xy(-0.75, -0.9), *f.xy(0.75, hairline + 0.15)], fill=face.hair)
        elif face.hair_style == "side_part":
            d.polygon([f.xy(-0.95, hairline), f.xy(0.3, hairline), f.xy(-0.95, hairline + 0.35)], fill=face.hair)

    if face.birthmark is not None:
        bu, bv, brx, bry, colour = face.birthmark
        d.ellipse(f.box(bu, bv, brx, bry), fill=colour)
    for fu, fv in face.freckles:
        d.ellipse(f.box(fu, fv, 0.025, 0.02), fill=_scale_colour(face.skin, 0.7))
    if face.paint is not None:
        u0, v0, u1, v1, width, colour = face.paint
        d.line([f.xy(u0, v0), f.xy(u1, v1)], fill=colour, width=f.stroke(width))
    for mu, mv, mr in face.moles:
        d.ellipse(f.box(mu, mv, mr, mr * f.a / f.b), fill=(40, 25, 20))
    if face.beard is not None:
        d.polygon([p for p in _outline(face, f, 1.02) if p[1] > f.cy + f.b * (face.mouth_y - 0.12)], fill=face.beard)


def _draw_eyes(d: ImageDraw.ImageDraw, face: FaceIdentity, f: _FaceFrame, rng: np.random.Generator) -> None:
    """Eyes (this image's openness and gaze), irises and brows."""
    openness = 0.12 if rng.uniform() < 0.08 else rng.uniform(0.65, 1.0)
    gaze = rng.uniform(-0.3, 0.3)
    aspect = f.a / f.b  # converts a radius in face-width units to face-height units
    for side in (-1, 1):
        eu = side * face.eye_spacing
        d.ellipse(
            f.box(eu, face.eye_y, face.eye_rx, face.eye_rx * face.eye_ratio * aspect * openness), fill=(245, 245, 240)
        )
        if openness > 0.3:
            iu = eu + gaze * face.eye_rx * 0.4
            for radius, colour in ((face.eye_rx * 0.55, face.iris), (face.eye_rx * 0.25, (10, 10, 10))):
                d.ellipse(
                    f.box(iu, face.eye_y, radius, min(radius, face.eye_rx * face.eye_ratio * openness) * aspect),
                    fill=colour,
                )
        brow_v = face.eye_y - face.eye_rx * face.eye_ratio * aspect - face.brow_gap
        tilt = side * face.brow_tilt * face.eye_rx
        d.line(
            [f.xy(eu - face.eye_rx * 1.2, brow_v + tilt), f.xy(eu + face.eye_rx * 1.2, brow_v - tilt)],
            fill=_scale_colour(face.hair, 0.8),
            width=f.stroke(face.brow_thickness * 1.6),
        )


def _draw_nose_mouth_glasses(
    d: ImageDraw.ImageDraw, face: FaceIdentity, f: _FaceFrame, rng: np.random.Generator
) -> None:
    """Nose, mouth (this image's expression), moustache and glasses."""
    aspect = f.a / f.b
    nose_colour = _scale_colour(face.skin, 0.72)
    top, tip = face.eye_y + 0.08, face.eye_y + 0.08 + face.nose_len
    if face.nose_kind == 0:
        d.polygon([f.xy(0, top), f.xy(-face.nose_w, tip), f.xy(face.nose_w, tip)], fill=nose_colour)
    elif face.nose_kind == 1:
        d.line([f.xy(0, top), f.xy(0, tip), f.xy(face.nose_w, tip)], fill=nose_colour, width=f.stroke(0.05))
    else:
        d.ellipse(f.box(0, tip - 0.03, face.nose_w, face.nose_w * 0.7 * aspect), fill=nose_colour)

    curve = face.mouth_curve + rng.uniform(-0.05, 0.05)
    half = face.mouth_w / 2
    mouth = [f.xy(x * half, face.mouth_y + curve * x * x - curve) for x in np.linspace(-1, 1, 9)]
    d.line(mouth, fill=face.lips, width=f.stroke(face.mouth_thickness * 1.5), joint="curve")
    if face.beard is not None:  # moustache
        d.line(
            [f.xy(-half, face.mouth_y - 0.07), f.xy(half, face.mouth_y - 0.07)], fill=face.beard, width=f.stroke(0.07)
        )

    if face.glasses is not None:
        rim = face.eye_rx * 1.5
        for side in (-1, 1):
            d.ellipse(
                f.box(side * face.eye_spacing, face.eye_y, rim, rim * aspect),
                outline=face.glasses,
                width=f.stroke(0.05),
            )
        d.line(
            [f.xy(-face.eye_spacing + rim, face.eye_y), f.xy(face.eye_spacing - rim, face.eye_y)],
            fill=face.glasses,
            width=f.stroke(0.04),
        )


def _draw_face(face: FaceIdentity, rng: np.random.Generator, canvas: int) -> Image.Image:
    """The face of one image (transparent background), with the per-image pose and expression."""
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    yaw = rng.uniform(-0.12, 0.12)
    f = _FaceFrame(face, canvas, yaw, squeeze=1 - abs(yaw) * 0.8)
    _draw_head(d, face, f, yaw)
    _draw_eyes(d, face, f, rng)  # the draws stay in this order: the same seed gives the same images
    _draw_nose_mouth_glasses(d, face, f, rng)
    return layer


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random two-colour gradient with a few random shapes: clutter that differs in every image."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None] + 1.5) / 3
    pixels = c0 + (c1 - c0) * t[..., None]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.6, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def render_image(face: FaceIdentity, seed: int, identity: int, image: int, size: int) -> Image.Image:
    """Image `image` of identity `identity` as an RGB `size` x `size` picture; a pure function of its arguments."""
    rng = np.random.default_rng([seed, 1, identity, image])
    canvas = size * SUPERSAMPLE
    layer = _draw_face(face, rng, canvas)

    # pose: the output pixel (x, y) samples the canvas at the inverse similarity transform
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.1, 0.1, 2) * size
    cos, sin = math.cos(angle) / scale * SUPERSAMPLE, math.sin(angle) / scale * SUPERSAMPLE
    cx = size / 2 + shift[0]
    cy = size / 2 + shift[1]
    coeffs = (cos, sin, canvas / 2 - cos * cx - sin * cy, -sin, cos, canvas / 2 + sin * cx - cos * cy)
    face_layer = layer.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    picture = _background(rng, size)
    picture.paste(face_layer, (0, 0), face_layer)

    if rng.uniform() < 0.3:  # partial occlusion: a hand, a scarf, a sign...
        d = ImageDraw.Draw(picture)
        x0, y0 = (rng.uniform(0.15, 0.75, 2)) * size
        w, h = rng.uniform(0.15, 0.35, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.rectangle if rng.uniform() < 0.5 else d.ellipse)([x0, y0, x0 + w, y0 + h], fill=colour)

    blur = rng.uniform(0, 1.2) * size / 112
    if blur > 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(blur))

    # lighting: gain, a linear gradient in a random direction, a colour cast, gamma; then sensor noise
    pixels = np.asarray(picture, dtype=np.float32) / 255.0
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    gradient = np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None]
    light = rng.uniform(0.6, 1.3) * (1 + rng.uniform(0, 0.35) * gradient)
    pixels = pixels * light[..., None] * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    pixels = np.clip(pixels, 0, 1) ** rng.uniform(0.8, 1.25)
    pixels = pixels + rng.normal(0, rng.uniform(0, 0.05), pixels.shape).astype(np.float32)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def _write_identity(job: tuple[Path, int, int, int, int, str]) -> int:
    out, seed, identity, images_per_identity, size, image_format = job
    face = sample_identity(seed, identity)
    folder = out / identity_name(identity)
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(images_per_identity):
        data = encode_image(render_image(face, seed, identity, j, size), image_format, quality=95)
        write_bytes_atomic(folder / f"{j:04d}.{image_format}", data, fsync=False)
    return images_per_identity


def write_synthetic_tree(
    out: str | Path,
    identities: int,
    images_per_identity: int,
    size: int = 112,
    seed: int = 0,
    image_format: str = "png",
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Write `OUT/id_XXXXX/JJJJ.<format>` for every identity and image; returns the number of images."""
    if identities < 1 or images_per_identity < 1 or size < 16 or seed < 0:
        raise ValueError(
            f"synth needs identities >= 1, images per identity >= 1, size >= 16 and seed >= 0 "
            f"(got {identities}, {images_per_identity}, {size}, {seed})"
        )
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i, images_per_identity, size, image_format) for i in range(identities)]
    bar = tqdm(total=identities * images_per_identity, unit="img", desc="synth", disable=not progress)
    with worker_pool(workers) as pool:
        for done in pool.imap(_write_identity, jobs):
            bar.update(done)
    bar.close()
    return identities * images_per_identity
