"""Face aligners per core: YuNet (facedist.align) against the Haar cascades it replaced, side by side, as JSON.

    python -m facedist.bench align [--celeba DIR] [--orl DIR] [--images 300] [--rounds 3] \
        [--per-image OUT.jsonl] [--out OUT.json]

One core (`cv2.setNumThreads(1)`, `torch.set_num_threads(1)`). Photos are decoded once up front; what is timed
is detection, alignment and the crop to 112 x 112, per photo, the median of `--rounds` interleaved rounds.
For each set and aligner: `detection_rate` (a face found), `ms_per_image`, `images_per_s_per_core`,
`faces_per_photo` (how many photos had 0, 1, 2, ... faces); for YuNet, among photos with several faces, how
often the largest (the one aligned) is also the most central. celeba_299 is sampled every k-th photo in
sorted order, so `--images` spread over the identities, at the set's own size (longer side 256 px).
`--per-image` writes one JSON line per photo and aligner: its face count and the box that was cropped.
The Haar aligner is facedist's aligner before YuNet (face cascade, eye cascades, eyes estimated from the box
when not found, eyes onto the template's), kept here only for this comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from facedist.align import TEMPLATE_FIVE_POINTS, TEMPLATE_SIZE, FaceAligner, NoFaceError, similarity_transform
from facedist.cli_common import DefaultsHelpFormatter

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BOX_EYES = np.array([[0.31, 0.39], [0.68, 0.39]])  # eye centres in a Haar face box (x / w, y / h), measured on ORL


class HaarAligner:
    """facedist's aligner before YuNet, for comparison only: largest Haar face, eyes onto the template's."""

    def __init__(self, size: int = TEMPLATE_SIZE):
        self.size = size
        self.face = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.eyes = [
            cv2.CascadeClassifier(cv2.data.haarcascades + name)
            for name in ("haarcascade_eye.xml", "haarcascade_eye_tree_eyeglasses.xml")
        ]

    def _find_eyes(self, gray: np.ndarray, box) -> np.ndarray | None:
        x, y, w, h = box
        top = gray[max(y, 0) : max(y + int(0.6 * h), 0), max(x, 0) : max(x + w, 0)]
        if top.size == 0:
            return None
        zoom = 200 / w
        region = cv2.equalizeHist(cv2.resize(top, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC))
        offset = np.array([max(x, 0) - x, max(y, 0) - y])
        for cascade in self.eyes:
            found = cascade.detectMultiScale(region, 1.05, 3, minSize=(20, 20), maxSize=(100, 100))
            centres = [np.array([ex + ew / 2, ey + eh / 2]) / zoom + offset for ex, ey, ew, eh in found]
            eyes = []
            for target in BOX_EYES * [w, h]:  # per side, the nearest plausible detection
                near = [c for c in centres if np.linalg.norm(c - target) < 0.12 * w]
                if near:
                    eyes.append(min(near, key=lambda c: np.linalg.norm(c - target)))
            if len(eyes) == 2:
                return np.array(eyes) + [x, y]
        return None

    def align(self, image: Image.Image) -> tuple[Image.Image, int, tuple]:
        rgb = np.asarray(image.convert("RGB"))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        pad = max(gray.shape) // 4  # faces filling the photo need room around them
        padded = cv2.equalizeHist(cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_CONSTANT))
        side = max(24, min(gray.shape) // 8)
        faces = self.face.detectMultiScale(padded, scaleFactor=1.1, minNeighbors=4, minSize=(side, side))
        if len(faces) == 0:
            raise NoFaceError("no face found")
        x, y, w, h = (int(v) for v in max(faces, key=lambda b: b[2] * b[3]))
        box = (x - pad, y - pad, w, h)
        eyes = self._find_eyes(gray, box)
        eyes = BOX_EYES * [w, h] + box[:2] if eyes is None else eyes
        matrix = similarity_transform(eyes, TEMPLATE_FIVE_POINTS[:2] * (self.size / TEMPLATE_SIZE))
        crop = cv2.warpAffine(rgb, matrix, (self.size, self.size), borderMode=cv2.BORDER_REPLICATE)
        return Image.fromarray(crop), len(faces), box


def align_yunet(aligner: FaceAligner, image: Image.Image) -> tuple[Image.Image, int, tuple]:
    result = aligner.align(image)
    return result.image, result.num_faces, tuple(result.face.box.round().astype(int).tolist())


def largest_is_most_central(aligner: FaceAligner, image: Image.Image) -> bool:
    faces = aligner.detector.detect(image)
    centre = np.array(image.size) / 2
    central = min(faces, key=lambda f: np.linalg.norm(f.box[:2] + f.box[2:] / 2 - centre))
    return central is max(faces, key=lambda f: f.box[2] * f.box[3])


def measure(name: str, images: list[Image.Image], paths: list[Path], rounds: int, per_image: list) -> dict:
    yunet, haar = FaceAligner(TEMPLATE_SIZE), HaarAligner(TEMPLATE_SIZE)
    aligners = {"yunet": lambda im: align_yunet(yunet, im), "haar": haar.align}
    seconds = {key: [] for key in aligners}
    outcomes = {key: [] for key in aligners}
    for round_index in range(rounds):
        for key, align in aligners.items():
            start = time.perf_counter()
            for image in images:
                try:
                    outcome = align(image)[1:]
                except NoFaceError:
                    outcome = (0, None)
                if round_index == 0:
                    outcomes[key].append(outcome)
            seconds[key].append((time.perf_counter() - start) / len(images))
    result = {}
    for key in aligners:
        counts = [faces for faces, _ in outcomes[key]]
        ms = 1000 * statistics.median(seconds[key])
        result[key] = {
            "detection_rate": round(float(np.mean([c > 0 for c in counts])), 4),
            "ms_per_image": round(ms, 2),
            "images_per_s_per_core": round(1000 / ms, 1),
            "faces_per_photo": np.bincount(counts).tolist(),
        }
        for path, (faces, box) in zip(paths, outcomes[key]):
            per_image.append({"set": name, "path": str(path), "aligner": key, "faces": faces, "chosen_box": box})
    several = [largest_is_most_central(yunet, im) for im, (faces, _) in zip(images, outcomes["yunet"]) if faces > 1]
    result["yunet"]["largest_is_most_central"] = f"{sum(several)}/{len(several)}"
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench align", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--celeba", type=Path, default=SHARED_DATA / "celeba_299", help="celeba_299 identity folders")
    parser.add_argument("--orl", type=Path, default=SHARED_DATA / "orl_faces", help="ORL identity folders")
    parser.add_argument("--images", type=int, default=300, help="celeba photos (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians (default: %(default)s)")
    parser.add_argument("--per-image", type=Path, help="write one JSON line per photo and aligner here")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    sets = {}
    celeba = sorted(args.celeba.glob("*/*.jpg"))
    if celeba:
        sets["celeba_299"] = celeba[:: max(1, len(celeba) // args.images)][: args.images]
    if args.orl.is_dir():
        sets["orl_faces"] = sorted(args.orl.glob("s*/*.pgm"))
    if not sets:
        raise SystemExit(f"align bench: no photos under {args.celeba} or {args.orl}")
    result, per_image = {"threads": 1, "opencv": cv2.__version__}, []
    for name, paths in sets.items():
        images = [Image.open(path).convert("RGB") for path in paths]
        sizes = np.array([image.size for image in images])
        result[name] = {"photos": len(images), "median_size": np.median(sizes, 0).astype(int).tolist()}
        result[name].update(measure(name, images, paths, args.rounds, per_image))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.per_image:
        args.per_image.write_text("".join(json.dumps(row) + "\n" for row in per_image))
    return 0
