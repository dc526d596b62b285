"""Offline face detection, alignment and crop for raw photos, with OpenCV's bundled Haar cascades.

Choice: OpenCV (`pip install facedist[align]`, i.e. opencv-python-headless < 5; OpenCV 5 no longer ships
the cascades) because its wheel carries the detector files, so nothing is downloaded at run time.
MediaPipe's current wheels fetch their face-detector models separately and facenet-pytorch pins
torch < 2.3. The cascades are weaker than a CNN detector on hard poses, which is why the eye pair is
validated against where eyes sit in a face box and, when it fails, estimated from that box.

Pipeline: largest frontal face (image padded first, so faces touching the border are found) -> both
eyes searched in the upper part of the face box, upscaled -> similarity transform (rotation, scale,
shift) that puts the eyes on the ArcFace 112x112 template's eye positions -> square crop.

On the ORL faces (400 images, 92x112 grey): a face is found in 400/400 images and both eyes in
351/400 (88%); the other 49 use eyes estimated from the face box. tests/test_align.py measures
the rate on a subset and checks that the detected eyes turn with a rotated face.

An image without a face raises `NoFaceError`; callers report and skip it, never use it uncropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# ArcFace (insightface) 112x112 template: the subject's right eye (image left), then left eye.
TEMPLATE_SIZE = 112
TEMPLATE_FIVE_POINTS = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],  # eyes, nose,
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)  # mouth corners
TEMPLATE_EYES = TEMPLATE_FIVE_POINTS[:2]
# Eye centres relative to a Haar face box (x / width, y / height), measured on ORL faces where both
# eyes were detected (std ~0.03); used to reject implausible eye pairs and to estimate missing eyes.
BOX_EYES = np.array([[0.31, 0.39], [0.68, 0.39]])
EYE_TOLERANCE = 0.12  # box widths a detected eye may stray from BOX_EYES
DETECT_MAX_SIDE = 640  # larger photos are downscaled for detection (speed), coordinates mapped back
EYE_SEARCH_WIDTH = 200  # the upper face region is resized to this width: eyes in small faces are tiny


class NoFaceError(ValueError):
    """No face was found in an image; the message names the image."""


@dataclass
class AlignedFace:
    image: Image.Image  # RGB, output_size x output_size
    box: tuple[int, int, int, int]  # face box (x, y, w, h) in source pixels
    eyes: np.ndarray  # [2, 2] eye centres (image-left first) in source pixels
    eyes_detected: bool  # False: eyes estimated from the face box


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise ImportError("face alignment needs OpenCV: pip install 'facedist[align]'") from err
    return cv2


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
    crop = _cv2().warpAffine(np.asarray(image), matrix, (size, size), borderValue=0.0)  # as insightface's norm_crop
    return Image.fromarray(crop)


class FaceAligner:
    """Detects the largest face, finds its eyes and returns an aligned square crop of `output_size`."""

    def __init__(self, output_size: int = TEMPLATE_SIZE):
        cv2 = _cv2()
        self.output_size = output_size
        self.face_cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        # The plain eye cascade first; the eyeglasses one finds some eyes behind frames it misses.
        self.eye_cascades = [
            cv2.CascadeClassifier(cv2.data.haarcascades + name)
            for name in ("haarcascade_eye.xml", "haarcascade_eye_tree_eyeglasses.xml")
        ]

    def _find_face(self, gray: np.ndarray) -> tuple[int, int, int, int] | None:
        cv2 = _cv2()
        scale = min(1.0, DETECT_MAX_SIDE / max(gray.shape))
        small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
        pad = max(small.shape) // 4  # the detector window must fit around faces that fill the photo
        padded = cv2.equalizeHist(cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT))
        min_side = max(24, min(small.shape) // 8)
        faces = self.face_cascade.detectMultiScale(
            padded, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side)
        )
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda box: box[2] * box[3])
        return tuple(int(round(v / scale)) for v in (x - pad, y - pad, w, h))

    def _find_eyes(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
        cv2 = _cv2()
        x, y, w, h = box
        top = gray[max(y, 0) : max(y + int(0.6 * h), 0), max(x, 0) : max(x + w, 0)]
        if top.size == 0:
            return None
        zoom = EYE_SEARCH_WIDTH / w
        region = cv2.equalizeHist(cv2.resize(top, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC))
        expected = BOX_EYES * [w, h]
        offset = np.array([max(x, 0) - x, max(y, 0) - y])  # region origin inside the box
        eye_min, eye_max = EYE_SEARCH_WIDTH // 10, EYE_SEARCH_WIDTH // 2
        for cascade in self.eye_cascades:
            found = cascade.detectMultiScale(region, 1.05, 3, minSize=(eye_min, eye_min), maxSize=(eye_max, eye_max))
            centres = [np.array([ex + ew / 2, ey + eh / 2]) / zoom + offset for ex, ey, ew, eh in found]
            eyes = []
            for target in expected:  # per side, the detection nearest the expected position, if plausible
                near = [c for c in centres if np.linalg.norm(c - target) < EYE_TOLERANCE * w]
                if near:
                    eyes.append(min(near, key=lambda c: np.linalg.norm(c - target)))
            if len(eyes) == 2:
                return np.array(eyes) + [x, y]
        return None

    def align(self, image: Image.Image, name: str = "image") -> AlignedFace:
        """Aligned crop of the largest face in `image`; `NoFaceError` naming `name` when there is none."""
        cv2 = _cv2()
        rgb = np.asarray(image.convert("RGB"))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        box = self._find_face(gray)
        if box is None:
            raise NoFaceError(f"no face found in {name}")
        eyes = self._find_eyes(gray, box)
        detected = eyes is not None
        if eyes is None:
            eyes = BOX_EYES * box[2:] + box[:2]
        matrix = similarity_transform(eyes, TEMPLATE_EYES * (self.output_size / TEMPLATE_SIZE))
        crop = cv2.warpAffine(
            rgb, matrix, (self.output_size, self.output_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return AlignedFace(Image.fromarray(crop), box, eyes, detected)
