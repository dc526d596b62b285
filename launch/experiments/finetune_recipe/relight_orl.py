"""Relit ORL: each ORL face re-photographed, offline, under one point light from varying angles.

    python launch/experiments/finetune_recipe/relight_orl.py ../shared/data/orl_faces OUT [--variants 6] [--seed 0]
    python launch/experiments/finetune_recipe/relight_orl.py ../shared/data/orl_faces OUT \
        --azimuth 110 --elevation -35 70 --ambient 0 0.06   # harsher, nearer a set taken under 64 point lights

Deterministic: the light of image (identity, photo, variant) is drawn from a generator seeded by
(seed, identity, photo, variant), so the same arguments write the same bytes. Per output image:
- a generic face relief (an ellipsoid head, a nose ridge, eye sockets) gives surface normals;
- Lambertian shading from a light at azimuth U(-75, 75) and elevation U(-25, 45) degrees, a small ambient
  term and a cast-shadow test (a pixel is dark when the relief rises above the ray towards the light);
- the ORL grey values act as albedo; then a gamma in U(0.5, 2.0) and 8-bit quantisation.
Written as OUT/sNN/PP_V.png (PP the ORL photo number, V the lighting variant).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def face_relief(height: int, width: int) -> np.ndarray:
    """Heights (pixels) of a generic frontal face: ellipsoid head + nose ridge - eye sockets."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy, rx, ry = width / 2, height * 0.52, width * 0.46, height * 0.50
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    head = 0.5 * width * np.sqrt(np.clip(1 - r2, 0, None))
    nose = 9.0 * np.exp(-(((x - cx) / 4.5) ** 2 + ((y - height * 0.58) / 11.0) ** 2))
    eyes = sum(
        5.0 * np.exp(-(((x - ex) / 8.0) ** 2 + ((y - height * 0.45) / 5.0) ** 2))
        for ex in (cx - width * 0.2, cx + width * 0.2)
    )
    return head + nose - eyes


def cast_shadow(relief: np.ndarray, azimuth: float, elevation: float, steps: int = 48) -> np.ndarray:
    """1 where the light is visible from the surface, 0 where the relief blocks the ray towards it."""
    dx, dy = np.sin(azimuth), -np.sin(elevation)  # image-plane direction towards the light
    norm = max(np.hypot(dx, dy), 1e-6)
    dx, dy = dx / norm, dy / norm
    rise = np.tan(np.arccos(np.clip(np.cos(azimuth) * np.cos(elevation), -1, 1)))  # height gained per pixel
    rise = 1.0 / max(rise, 1e-3)
    height, width = relief.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    lit = np.ones_like(relief, dtype=bool)
    for t in range(1, steps):
        xs, ys = np.rint(x + dx * t).astype(int), np.rint(y + dy * t).astype(int)
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        blocker = np.where(inside, relief[ys.clip(0, height - 1), xs.clip(0, width - 1)], -np.inf)
        lit &= blocker <= relief + rise * t
    return lit.astype(np.float64)


def relight(
    grey: np.ndarray, rng: np.random.Generator, max_azimuth: float = 75, elevations=(-25, 45), ambients=(0.03, 0.15)
) -> np.ndarray:
    """One relit uint8 image from an ORL uint8 image, light and gamma drawn from `rng` (degrees)."""
    azimuth = np.radians(rng.uniform(-max_azimuth, max_azimuth))
    elevation = np.radians(rng.uniform(*elevations))
    gamma = rng.uniform(0.5, 2.0)
    ambient = rng.uniform(*ambients)
    relief = face_relief(*grey.shape)
    gy, gx = np.gradient(relief)
    normals = np.stack([-gx, -gy, np.ones_like(relief)])
    normals /= np.linalg.norm(normals, axis=0)
    light = np.array([np.sin(azimuth) * np.cos(elevation), -np.sin(elevation), np.cos(azimuth) * np.cos(elevation)])
    diffuse = np.clip(np.tensordot(light, normals, axes=1), 0, None) * cast_shadow(relief, azimuth, elevation)
    albedo = grey.astype(np.float64) / 255.0
    radiance = albedo * (ambient + (1 - ambient) * 1.6 * diffuse)
    return (np.clip(radiance, 0, 1) ** gamma * 255 + 0.5).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("orl", type=Path, help="the ORL folder (s1..s40, 1.pgm..10.pgm)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--variants", type=int, default=6, help="lightings per ORL photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--azimuth", type=float, default=75, help="lights at azimuth U(-A, A) degrees")
    parser.add_argument("--elevation", type=float, nargs=2, default=(-25, 45), help="elevation U(LOW, HIGH) degrees")
    parser.add_argument("--ambient", type=float, nargs=2, default=(0.03, 0.15), help="ambient term U(LOW, HIGH)")
    args = parser.parse_args(argv)
    identities = sorted(
        (p for p in args.orl.iterdir() if p.is_dir() and p.name.startswith("s")), key=lambda p: int(p.name[1:])
    )
    if not identities:
        raise SystemExit(f"{args.orl}: no ORL identity folders (s1, s2, ...)")
    for folder in identities:
        identity = int(folder.name[1:])
        (args.out / f"s{identity:02d}").mkdir(parents=True, exist_ok=True)
        for photo_path in sorted(folder.glob("*.pgm"), key=lambda p: int(p.stem)):
            photo = int(photo_path.stem)
            grey = np.asarray(Image.open(photo_path).convert("L"))
            for variant in range(args.variants):
                rng = np.random.default_rng([args.seed, identity, photo, variant])
                image = relight(grey, rng, args.azimuth, args.elevation, args.ambient)
                Image.fromarray(image).save(args.out / f"s{identity:02d}" / f"{photo:02d}_{variant}.png")
    print(f"wrote {len(identities)} identities x {args.variants} lightings per photo to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
