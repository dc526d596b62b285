"""Verification `.bin` sets (lfw, cfp_fp, agedb_30, calfw, cplfw, ...) as InsightFace distributes them.

Format: a pickle of `(bins, issame_list)`: 2P encoded images (bytes, or numpy uint8 arrays of the encoded
bytes) and P booleans, image 2k and 2k+1 forming pair k. These files come from the internet, and a pickle
can run code, so they are read by `_BinUnpickler`, which builds only bytes, lists, tuples, bools, numbers
and numpy uint8/bool arrays and refuses every other global with one `BinFormatError`.

The protocol of the published numbers (`standard_accuracy`): the embedding of each image plus that of its
horizontal flip, summed and L2-normalised; squared L2 distance per pair; a pair is "same" when distance <
threshold, thresholds 0, 0.01, ..., 3.99 (numpy's arange(0, 4, 0.01)); 10 consecutive folds in pair
order (no shuffling); on each fold the threshold with the best accuracy on the other 9 (the first of equal
ones) is applied; accuracy mean and std (population) over the folds. facedist's own AUC / EER / TAR@FAR
come from facedist.evaluation.metrics on the cosine scores of the same pairs.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from facedist import distributed
from facedist.durable import write_atomic
from facedist.evaluation import plots
from facedist.evaluation.metrics import count_scores, pair_scores, roc_metrics
from facedist.inference import ImageError, embed_dataset, load_image, preprocess

THRESHOLDS = np.arange(0, 4, 0.01)  # as published: 400 thresholds, 0 .. 3.99
FOLDS = 10


class BinFormatError(ValueError):
    """A .bin file is unreadable, not of the (bins, issame_list) layout, or asks for a refused type."""


def _numpy_global(module: str, name: str):
    """numpy's pickle helpers live in numpy._core from numpy 2 on, in numpy.core before."""
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module), name)


# (module, name) -> the callable a .bin may use: numpy array reconstruction and bytes from protocol-2 pickles
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # Python 3 pickles bytes this way at protocol 2
}


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str (the original files) -> bytes
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise BinFormatError(
                f"{self.path}: refused to load {module}.{name} (a .bin holds only bytes, "
                "lists, bools and numpy byte arrays; this pickle asks for more)"
            )
        return _ALLOWED[(module, name)]()


def _encoded(item, path: Path, position: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise BinFormatError(
        f"{path}: image {position} is a {type(item).__name__}"
        f"{' of ' + str(item.dtype) if isinstance(item, np.ndarray) else ''}, expected encoded bytes"
    )


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """(2P encoded images, [P] bool issame) of a .bin file, read with the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            loaded = _BinUnpickler(f, path).load()
    except FileNotFoundError:
        raise BinFormatError(f"{path}: file not found") from None
    except BinFormatError:
        raise
    except Exception as err:  # truncated or not a pickle: pickle raises many types
        raise BinFormatError(f"{path}: not a readable .bin pickle ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise BinFormatError(f"{path}: expected a pickle of (bins, issame_list), got {type(loaded).__name__}")
    bins, issame = loaded
    if not isinstance(bins, (list, tuple)):
        raise BinFormatError(f"{path}: bins is a {type(bins).__name__}, expected a list of encoded images")
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)) or not all(isinstance(v, (bool, np.bool_)) for v in issame):
        raise BinFormatError(f"{path}: issame_list must be a list of booleans")
    if not issame or len(bins) != 2 * len(issame):
        raise BinFormatError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (expected 2 images a pair, >= 1 pair)"
        )
    return [_encoded(item, path, k) for k, item in enumerate(bins)], np.asarray(issame, dtype=bool)


def write_bin(path: str | Path, images: Sequence, issame: Sequence[bool], quality: int = 95) -> Path:
    """Write a .bin (protocol 2, as the distributed files) from 2P images: encoded bytes, PIL images or
    uint8 HxWx3 arrays (the last two stored as JPEG). For tests and for making your own sets."""
    encoded = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        encoded.append(jpeg_bytes(image, quality) if isinstance(image, Image.Image) else bytes(image))
    issame = [bool(v) for v in issame]
    if len(encoded) != 2 * len(issame):
        raise ValueError(f"{len(encoded)} images for {len(issame)} pairs: need exactly 2 a pair")
    path = Path(path)
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(pickle.dumps((encoded, issame), protocol=2)))
    return path


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_bin_from_pairs(
    pairs_file: str | Path, images: str | Path, path: str | Path, align_size: int = 0, skip_missing: bool = False
) -> tuple[int, list[str]]:
    """Pack a pairs file (facedist.data.pairs) and its image folder into the .bin `path`: the two images of each
    pair in pair order, as they are (JPEG files byte for byte, others re-encoded as JPEG) or, with `align_size`,
    as aligned crops of that side. A missing or unreadable image, or a face not found, is a PairsError naming the
    pair's line; with `skip_missing` the pair is dropped instead. Returns (pairs written, one line per dropped pair)."""
    from facedist.data.pairs import ImageFolder, PairsError, read_pairs

    pairs, _, _ = read_pairs(pairs_file)
    folder = ImageFolder(images)
    encode = _PairImageEncoder(align_size)
    encoded, issame, skipped = [], [], []
    for pair in pairs:
        where = f"{pairs_file}:{pair.line}"
        try:
            both = [encode(folder.path(*member, where), where) for member in (pair.first, pair.second)]
        except PairsError as err:
            if not skip_missing:
                raise
            skipped.append(str(err))
            continue
        encoded += both
        issame.append(pair.same)
    if not issame:
        raise PairsError(f"{pairs_file}: all {len(pairs)} pairs were dropped (--skip-missing); no .bin written")
    write_bin(path, encoded, issame)
    return len(issame), skipped


class _PairImageEncoder:
    """Image file -> the bytes a .bin stores (see write_bin_from_pairs), each file read and aligned once."""

    def __init__(self, align_size: int):
        from facedist.align import FaceAligner

        self.aligner = FaceAligner(align_size) if align_size else None
        self.done: dict[Path, bytes] = {}

    def __call__(self, path: Path, where: str) -> bytes:
        from facedist.align import NoFaceError
        from facedist.data.pairs import PairsError

        if path not in self.done:
            try:
                data = path.read_bytes()
                image = load_image(data, str(path))
                if self.aligner is not None:
                    self.done[path] = jpeg_bytes(self.aligner.align(image, str(path)).image)
                else:
                    self.done[path] = data if data[:3] == b"\xff\xd8\xff" else jpeg_bytes(image)
            except OSError as err:
                raise PairsError(f"{where}: {path}: unreadable ({err.strerror or type(err).__name__})") from None
            except (ImageError, NoFaceError) as err:
                raise PairsError(f"{where}: {err}") from None
        return self.done[path]


def write_bin_from_folder(root: str | Path, path: str | Path, num_pairs: int = 100, seed: int = 0) -> Path:
    """A .bin of `num_pairs` pairs drawn (seeded) from an identity-folder tree ROOT/<identity>/<image>:
    same and different pairs alternate; image files are stored as they are (no re-encode)."""
    from facedist.inference import list_images

    paths, identities = list_images(root)
    by_identity: dict[str, list[Path]] = {}
    for image_path, identity in zip(paths, identities):
        by_identity.setdefault(identity, []).append(image_path)
    names = sorted(by_identity)
    repeated = [name for name in names if len(by_identity[name]) > 1]
    if not repeated or len(names) < 2:
        raise ValueError(f"{root}: a .bin needs an identity with 2+ images and at least 2 identities")
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(num_pairs):
        if k % 2 == 0:
            members = by_identity[repeated[rng.integers(len(repeated))]]
            chosen = [members[i] for i in rng.choice(len(members), 2, replace=False)]
        else:
            pair = [by_identity[names[i]] for i in rng.choice(len(names), 2, replace=False)]
            chosen = [members[rng.integers(len(members))] for members in pair]
        images += [p.read_bytes() for p in chosen]
        issame.append(k % 2 == 0)
    return write_bin(path, images, issame)


def image_sizes(images: Sequence[bytes]) -> set[tuple[int, int]]:
    """The distinct (width, height) of encoded images, from their headers only."""
    sizes = set()
    for data in images:
        try:
            with Image.open(io.BytesIO(data)) as image:
                sizes.add(image.size)
        except (OSError, ValueError, SyntaxError):
            pass  # reported by name when the dataset decodes it
    return sizes


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then centre-crop to size x size (no distortion)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w2, h2), Image.Resampling.BICUBIC)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return image.crop((left, top, left + size, top + size))


class BinImages(Dataset):
    """The images of a .bin set for embed_dataset: item i -> (tensor, i, problem, fatal)."""

    def __init__(self, images: Sequence[bytes], preprocessing: dict, name: str):
        self.images, self.preprocessing, self.name = images, preprocessing, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        size = int(self.preprocessing["image_size"])
        try:
            image = fit_square(load_image(self.images[i], f"{self.name} image {i}"), size)
            return preprocess(image, self.preprocessing), i, "", False
        except ImageError as err:
            return torch.zeros(3, size, size), i, str(err), True


def standard_accuracy(distances, issame, thresholds=THRESHOLDS, folds: int = FOLDS) -> dict:
    """The published k-fold accuracy (module docstring) of squared-L2 pair distances."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    if len(distances) < folds:
        raise ValueError(f"{folds}-fold accuracy needs at least {folds} pairs, got {len(distances)}")
    correct = (distances[None, :] < np.asarray(thresholds)[:, None]) == issame[None, :]  # [T, P]
    accuracies, chosen = [], []
    for test in np.array_split(np.arange(len(distances)), folds):  # sklearn KFold(shuffle=False)'s folds
        train = np.ones(len(distances), dtype=bool)
        train[test] = False
        best = int(np.argmax(correct[:, train].sum(1)))
        accuracies.append(float(correct[best, test].mean()))
        chosen.append(float(thresholds[best]))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "threshold": float(np.mean(chosen)),
        "fold_accuracies": accuracies,
        "fold_thresholds": chosen,
    }


def bin_metrics(embeddings, issame) -> dict:
    """Published k-fold accuracy plus facedist's AUC / EER / TAR@FAR of [2P, D] flip-summed, L2-normalised
    embeddings in pair order."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    distances = ((embeddings[0::2] - embeddings[1::2]) ** 2).sum(1)
    metrics = standard_accuracy(distances, issame)
    first = np.arange(0, len(embeddings), 2)
    scores = pair_scores(embeddings, first, first + 1)
    metrics.update(roc_metrics(count_scores(scores[issame], scores[~issame])))
    metrics.update(num_pairs=int(len(issame)), num_same_pairs=int(issame.sum()))
    return metrics


def set_name(path: str | Path) -> str:
    """lfw.bin -> lfw: the name of a set in logs and file names."""
    return Path(path).stem


@dataclass
class BinSet:
    name: str
    images: list[bytes]
    issame: np.ndarray
    sizes: set[tuple[int, int]]
    resize_said: bool = False  # the resize note is printed once per set, not at every evaluation


def load_set(path: str | Path) -> BinSet:
    images, issame = read_bin(path)
    return BinSet(set_name(path), images, issame, image_sizes(images))


def evaluate_set(
    model: torch.nn.Module,
    bin_set: BinSet,
    preprocessing: dict,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[dict, np.ndarray]:
    """(metrics, [2P, D] embeddings) of one set; images split across ranks, every rank gets the result."""
    size = int(preprocessing["image_size"])
    other = sorted(s for s in bin_set.sizes if s != (size, size))
    if other and not bin_set.resize_said and distributed.rank() == 0:
        bin_set.resize_said = True
        shown = ", ".join(f"{w}x{h}" for w, h in other[:3]) + (" ..." if len(other) > 3 else "")
        print(
            f"{bin_set.name}: images of {shown} resized to the model's {size}x{size} (shorter side, then centre crop)",
            file=sys.stderr,
        )
    dataset = BinImages(bin_set.images, preprocessing, bin_set.name)
    result = embed_dataset(model, dataset, batch_size, flip=True, num_workers=num_workers, progress=progress)
    return bin_metrics(result.vectors, bin_set.issame), result.vectors


def write_set_report(out: str | Path, bin_set: BinSet, metrics: dict, embeddings: np.ndarray) -> None:
    """OUT/<set>/metrics.json, OUT/<set>/roc.png and OUT/<set>_embeddings.npz (embeddings, issame)."""
    out = Path(out)
    (out / bin_set.name).mkdir(parents=True, exist_ok=True)
    write_atomic(out / bin_set.name / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    plots.save_figure(
        plots.roc_figure(metrics["roc"], metrics["tar_at_far"], metrics["num_impostor"]), out / bin_set.name / "roc.png"
    )
    write_atomic(
        out / f"{bin_set.name}_embeddings.npz", lambda tmp: save_npz(tmp, embeddings=embeddings, issame=bin_set.issame)
    )


def save_npz(path: str | Path, **arrays) -> None:
    """np.savez to exactly `path` (given a name, numpy would append .npz to a temporary one)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


class TrainingBinEval:
    """`eval.bins` during training: `<set>_acc` (and `_std`, `_best`) at the evaluation weights."""

    def __init__(self, paths: Sequence[str], preprocessing: dict, batch_size: int, num_workers: int):
        try:
            self.sets = [load_set(path) for path in paths]
        except BinFormatError as err:
            raise SystemExit(f"eval.bins: {err}") from None
        self.preprocessing, self.batch_size, self.num_workers = preprocessing, batch_size, num_workers
        self.best: dict[str, float] = {}

    def restore_best(self, metrics_log: Path) -> None:
        """On resume: the best accuracies logged up to the checkpoint (metrics.jsonl, already truncated)."""
        if metrics_log.exists():
            for line in metrics_log.read_text().splitlines():
                for key, value in json.loads(line).items():
                    if key.endswith("_acc_best"):
                        self.best[key[: -len("_best")]] = max(value, self.best.get(key[: -len("_best")], value))

    def __call__(self, eval_model: torch.nn.Module) -> dict:
        record = {}
        for bin_set in self.sets:
            metrics, _ = evaluate_set(eval_model, bin_set, self.preprocessing, self.batch_size, self.num_workers)
            key = f"{bin_set.name}_acc"
            self.best[key] = max(metrics["accuracy"], self.best.get(key, -1.0))
            record.update(
                {key: metrics["accuracy"], f"{key}_std": metrics["accuracy_std"], f"{key}_best": self.best[key]}
            )
        return record
