"""IJB-B / IJB-C 1:1 verification from the released files, with the protocol of the published numbers.

Layout (lower-case names, NAME = ijbb or ijbc): `meta/NAME_face_tid_mid.txt` (`image template media` a
face), `meta/NAME_name_5pts_score.txt` (`image x1 y1 ... x5 y5 faceness` a face, same order),
`meta/NAME_template_pair_label.txt` (`template1 template2 label` a pair) and `loose_crop/<image>`.
The released files give landmarks for every face. A face whose row has none (`image faceness`), or
unusable ones (nan, or all five at one point), is detected instead with facedist.align's YuNet aligner
on its loose crop (the largest face); where that finds no face, the face is left out of its medium's mean
and listed in metrics.json (`faces_left_out`), and a template left with no face scores 0 against any.

Protocol (insightface's eval_ijbc, the published one): each face is aligned by its 5 landmarks with a
least-squares similarity transform onto the ArcFace 112 x 112 template (scaled to the model's size); its
feature is the model's output for the face plus that for its flip, NOT normalised, times the faceness
score; a template is the sum over its media of the mean feature of the medium's faces, L2-normalised; a
pair's score is the dot product of its templates. TAR@FAR for FAR 1e-6 .. 1e-1 "published": the TAR at
the point of sklearn's roc_curve (default, intermediate points dropped) nearest each FAR (argmin |fpr -
far|, first of equal ones); "facedist": facedist.evaluation.metrics' step rule on the same scores
(highest TAR with FAR <= far, reported only when far x impostors >= 10).

Bounded memory: faces are embedded in chunks of `chunk_faces` and added into per-(template, medium)
sums at once, so only [media, D] and [templates, D] are held (not [faces, D]); pairs are scored in chunks.
Under `accelerate launch` each chunk's faces are split across ranks (embed_dataset) and so are the pairs,
whose scores are gathered in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch.utils.data import Dataset

from facedist import distributed
from facedist.align import NoFaceError, align_five_points, require_aligner
from facedist.durable import write_atomic
from facedist.evaluation import plots
from facedist.evaluation.metrics import FARS, count_scores, far_key, roc_metrics
from facedist.inference import ImageError, embed_dataset, load_image, preprocess

IJB_FARS = tuple(sorted(FARS))  # 1e-6 .. 1e-1


class IJBError(ValueError):
    """A released IJB file is missing or malformed; the message names file and line."""


@dataclass
class IJBMeta:
    images: list[str]  # per face, relative to loose_crop/
    templates: np.ndarray  # [faces] int64
    media: np.ndarray  # [faces] int64
    landmarks: np.ndarray  # [faces, 5, 2] float32; nan for a face without usable landmarks (detected instead)
    faceness: np.ndarray  # [faces] float64
    pairs: np.ndarray  # [pairs, 2] int64 template ids
    labels: np.ndarray  # [pairs] bool


def _table(path: Path, columns: int | tuple[int, ...], what: str) -> list[list[str]]:
    allowed = (columns,) if isinstance(columns, int) else columns
    if not path.is_file():
        raise IJBError(f"{path}: not found (expected the released {what})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in allowed:
                expected = " or ".join(map(str, allowed))
                raise IJBError(f"{path} line {number}: {len(fields)} fields, expected {expected} ({what})")
            rows.append(fields)
    if not rows:
        raise IJBError(f"{path}: empty")
    return rows


def _numbers(rows, columns: slice, dtype, path: Path) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=dtype)
    except ValueError as err:
        raise IJBError(f"{path}: {err}") from None


def _landmarks(rows: list[list[str]], path: Path) -> np.ndarray:
    """[faces, 5, 2] float32 of `image x1 y1 ... x5 y5 faceness` rows; nan for a row without usable landmarks
    (an `image faceness` row, a nan value, or all five points at one place, which no transform can map)."""
    values = np.full((len(rows), 10), np.nan, np.float32)
    full = [k for k, row in enumerate(rows) if len(row) == 12]
    if full:
        values[full] = _numbers([rows[k] for k in full], slice(1, 11), np.float32, path)
    values = values.reshape(-1, 5, 2)
    unusable = ~np.isfinite(values).all((1, 2)) | ~(np.ptp(values, axis=1).max(1) > 0)
    values[unusable] = np.nan
    return values


def _pairs(path: Path) -> np.ndarray:
    """[pairs, 3] int64 by numpy's C parser: IJB-C's 15.7M lines as Python lists would take gigabytes."""
    if not path.is_file():
        raise IJBError(f"{path}: not found (expected the released template1 template2 label)")
    try:
        values = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise IJBError(f"{path}: {str(err).splitlines()[0]} (expected 'template1 template2 label' lines)") from None
    if values.shape[1] != 3 or len(values) == 0:
        raise IJBError(f"{path}: {values.shape[1]} columns, expected 3 (template1 template2 label)")
    return values


def read_meta(root: str | Path, name: str = "IJBC") -> IJBMeta:
    """The three meta files of IJB-B / IJB-C under ROOT (name IJBB or IJBC, any case)."""
    root, prefix = Path(root), name.lower()
    meta = root / "meta"
    faces_path, points_path = meta / f"{prefix}_face_tid_mid.txt", meta / f"{prefix}_name_5pts_score.txt"
    pairs_path = meta / f"{prefix}_template_pair_label.txt"
    faces = _table(faces_path, 3, "image template media")
    points = _table(points_path, (12, 2), "image, 5 landmarks (x y) or none, faceness")
    if len(faces) != len(points) or any(f[0] != p[0] for f, p in zip(faces, points)):
        mismatch = next(
            (k for k, (f, p) in enumerate(zip(faces, points)) if f[0] != p[0]), min(len(faces), len(points))
        )
        raise IJBError(
            f"{faces_path.name} and {points_path.name} disagree at face {mismatch + 1} "
            f"({len(faces)} and {len(points)} lines): they must list the same faces in the same order"
        )
    ids = _numbers(faces, slice(1, 3), np.int64, faces_path)
    landmarks = _landmarks(points, points_path)
    faceness = _numbers([row[-1:] for row in points], slice(0, 1), np.float64, points_path)[:, 0]
    pair_values = _pairs(pairs_path)
    known = np.isin(pair_values[:, :2], ids[:, 0])
    if not known.all():
        row = int(np.argmax(~known.all(1)))
        raise IJBError(
            f"{pairs_path} pair {row + 1}: template {pair_values[row, int(np.argmax(~known[row]))]} has no faces"
        )
    if not np.isin(pair_values[:, 2], (0, 1)).all():
        raise IJBError(f"{pairs_path}: labels must be 0 or 1")
    return IJBMeta(
        [f[0] for f in faces],
        ids[:, 0],
        ids[:, 1],
        landmarks,
        faceness,
        pair_values[:, :2],
        pair_values[:, 2].astype(bool),
    )


class IJBFaces(Dataset):
    """Aligned, preprocessed faces for embed_dataset: item i -> (tensor, i, problem, fatal). A face without
    landmarks is detected on its loose crop; finding none is a problem, not fatal (the face is left out)."""

    def __init__(self, root: Path, meta: IJBMeta, indices: np.ndarray, preprocessing: dict):
        self.root, self.preprocessing = root, preprocessing
        self.images = [meta.images[i] for i in indices]
        self.landmarks = meta.landmarks[indices]
        self._aligner = None  # built lazily in each worker, only when a face has no landmarks

    def __getstate__(self) -> dict:  # workers start from a pickled copy; the OpenCV detector does not pickle
        return {**self.__dict__, "_aligner": None}

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, i: int) -> str:
        return f"loose_crop/{self.images[i]}"

    def __getitem__(self, i: int):
        size = int(self.preprocessing["image_size"])
        try:
            image = load_image(self.root / "loose_crop" / self.images[i])
            if np.isnan(self.landmarks[i]).any():
                crop = self._detected(image, size, i)
            else:
                crop = align_five_points(image, self.landmarks[i], size)
            return preprocess(crop, self.preprocessing), i, "", False
        except NoFaceError:
            return torch.zeros(3, size, size), i, "no landmarks in the meta file and no face found", False
        except ImageError as err:
            return torch.zeros(3, size, size), i, str(err), True

    def _detected(self, image, size: int, i: int):
        from facedist.align import FaceAligner

        if self._aligner is None:
            self._aligner = FaceAligner(size)
        return self._aligner.align(image, self.image_name(i)).image


def template_features(
    root: str | Path,
    meta: IJBMeta,
    model: torch.nn.Module,
    preprocessing: dict,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_faces: int = 50_000,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, list]:
    """(template ids [T] ascending, L2-normalised template features [T, D] float64, faces left out as
    `Skipped`), faces in chunks. A medium's mean is over its faces embedded; a template with none stays 0."""
    medium_keys, medium_of_face = np.unique(np.stack([meta.templates, meta.media], 1), axis=0, return_inverse=True)
    medium_of_face = medium_of_face.reshape(-1)
    sums, counts, left_out = None, np.zeros(len(medium_keys)), []
    for start in range(0, len(meta.images), chunk_faces):
        indices = np.arange(start, min(start + chunk_faces, len(meta.images)))
        faces = IJBFaces(Path(root), meta, indices, preprocessing)
        result = embed_dataset(
            model, faces, batch_size, flip=True, num_workers=num_workers, progress=progress, normalize=False
        )
        embedded = indices[result.indices]
        features = result.vectors.astype(np.float64) * meta.faceness[embedded, None]
        if sums is None:
            sums = np.zeros((len(medium_keys), features.shape[1]))
        np.add.at(sums, medium_of_face[embedded], features)
        np.add.at(counts, medium_of_face[embedded], 1)
        left_out += result.skipped
    template_ids, template_of_medium = np.unique(medium_keys[:, 0], return_inverse=True)
    templates = np.zeros((len(template_ids), sums.shape[1]))
    # the sum over media of the mean; a medium without an embedded face adds nothing
    np.add.at(templates, template_of_medium.reshape(-1), sums / np.maximum(counts, 1)[:, None])
    norms = np.linalg.norm(templates, axis=1, keepdims=True)
    return template_ids, templates / np.where(norms > 0, norms, 1), left_out


def pair_scores(
    template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray, chunk_pairs: int = 1_000_000
) -> np.ndarray:
    """Dot products of the pairs' template features; the pairs split across ranks, scores gathered in order."""
    mine = np.array_split(np.arange(len(pairs)), distributed.world_size())[distributed.rank()]
    rows = np.searchsorted(template_ids, pairs[mine])
    scores = np.concatenate(
        [
            np.einsum("ij,ij->i", features[rows[s : s + chunk_pairs, 0]], features[rows[s : s + chunk_pairs, 1]])
            for s in range(0, len(rows), chunk_pairs)
        ]
        or [np.zeros(0)]
    )
    return distributed.gather_rows(torch.from_numpy(scores)).numpy()


def published_tar_at_far(labels: np.ndarray, scores: np.ndarray, fars=IJB_FARS) -> dict:
    """TAR at the sklearn roc_curve point nearest each FAR (argmin |fpr - far|), as the published numbers."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return {far_key(f): float(tpr[int(np.argmin(np.abs(fpr - f)))]) for f in fars}


def ijb_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    labels = np.asarray(labels, dtype=bool)
    facedist = roc_metrics(count_scores(scores[labels], scores[~labels]), IJB_FARS)
    return {
        "tar_at_far_published": published_tar_at_far(labels, scores),
        "tar_at_far_published_rule": "TAR at the ROC point nearest each FAR: argmin |fpr - far| on sklearn "
        "roc_curve (as insightface's eval_ijbc)",
        "tar_at_far_facedist": facedist["tar_at_far"],
        "tar_at_far_facedist_rule": "highest TAR with FAR <= far; None where far x impostor pairs < 10",
        **{k: facedist[k] for k in ("auc", "eer", "thresholds_at_far", "num_genuine", "num_impostor", "roc")},
    }


def evaluate_ijb(
    root: str | Path,
    name: str,
    model: torch.nn.Module,
    preprocessing: dict,
    out: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_faces: int = 50_000,
    progress: bool = False,
) -> dict:
    """Metrics of IJB-B/C 1:1 (module docstring) on every rank; the main rank writes OUT/metrics.json, OUT/roc.png
    and OUT/<name>_scores.npz (template pairs, labels, scores)."""
    meta = read_meta(root, name)
    without_landmarks = int(np.isnan(meta.landmarks[:, 0, 0]).sum())
    if without_landmarks:
        require_aligner(f"detecting the {without_landmarks} IJB faces without landmarks")
    template_ids, features, left_out = template_features(
        root, meta, model, preprocessing, batch_size, num_workers, chunk_faces, progress
    )
    scores = pair_scores(template_ids, features, meta.pairs)
    metrics = {
        "name": name.upper(),
        "num_faces": len(meta.images),
        "num_templates": len(template_ids),
        "faces_detected_for_missing_landmarks": without_landmarks,
        "faces_left_out": [{"image": s.name, "reason": s.reason} for s in left_out],
        **ijb_metrics(meta.labels, scores),
    }
    if out is not None and distributed.rank() == 0:
        from facedist.evaluation.bins import save_npz

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
        plots.save_figure(
            plots.roc_figure(metrics["roc"], metrics["tar_at_far_facedist"], metrics["num_impostor"]), out / "roc.png"
        )
        write_atomic(
            out / f"{name.lower()}_scores.npz",
            lambda tmp: save_npz(tmp, pairs=meta.pairs, labels=meta.labels, scores=scores),
        )
    return metrics
