"""Images to embeddings, one way for facedist-eval, -compare and -embed.

An image is decoded, optionally face-aligned (facedist.align), brought to the checkpoint's square
`image_size` exactly as the shard builder stores it (centre square crop, bicubic: `shards.square_resize`,
so a photo embeds like its shard), scaled to [0, 1] and normalised with its mean/std (the preprocessing
dict stored with every checkpoint). Embeddings are the model's output, with flip test-time augmentation the sum of the
outputs for the image and its mirror (insightface convention), then L2-normalised.

Under `accelerate launch` (a torch.distributed process group) every process embeds a contiguous slice
of the images and the slices are gathered in order, so every rank ends with the same result as one
process would compute.

Images that cannot be used (unreadable, below `min_size` pixels on the shorter side, no face found under
`align`) are returned as `Skipped` records with their reason; the command lines write the rest and list
those in a report, or refuse with `--strict` (`account_for_skipped`). Folders are walked as the shard
builder walks them (facedist.data.folders: symbolic links followed, each real folder once).

File names are bytes on Linux and need not be UTF-8; every name facedist writes can be found again byte
for byte. `path` is readable text: the name's bytes as UTF-8, undecodable bytes shown as U+FFFD
(`shown_path`). The exact bytes go next to it: in embeddings files a `path_bytes` column on every row
(parquet: binary, npz: a bytes array; `os.fsdecode(path_bytes)` opens the file), in JSON reports
`path_bytes_b64` where the text is not exact (facedist.data.folders.name_fields).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from facedist import distributed
from facedist.data.dataset import loader_kwargs, normalise, warn_if_resized
from facedist.data.folders import iter_identity_images, name_fields
from facedist.data.shards import BuildOptions, decode_rgb, square_resize
from facedist.durable import write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")
MIN_IMAGE_SIZE = BuildOptions.min_size  # px on the shorter side: the shards' --min-size, one rule for both


class ImageError(ValueError):
    """An image cannot be read or does not fit the model; the message names it, `reason` says why alone."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def shown_path(path: str | Path | bytes) -> str:
    """A file name as readable text: its bytes as UTF-8, undecodable bytes as U+FFFD (module docstring)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _decode_failure(err: Exception) -> str:
    if isinstance(err, Image.UnidentifiedImageError):  # its message holds the repr of a BytesIO
        return "not an image (Pillow cannot identify it)"
    return f"not a readable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def load_image(source: str | Path | bytes, name: str | None = None, min_size: int = 0) -> Image.Image:
    """Decode an image file (or encoded bytes) to RGB; `ImageError` naming it when that fails or when its
    shorter side is below `min_size` pixels."""
    name = name or shown_path(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        reason = f"unreadable ({err.strerror or type(err).__name__})"
        raise ImageError(f"{name}: {reason}", reason) from err
    if not data:
        raise ImageError(f"{name}: zero-byte file", "zero-byte file")
    try:  # the shard builder's decoder: EXIF orientation applied, 16-bit greyscale rescaled, as in the shards
        image = decode_rgb(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = _decode_failure(err)
        raise ImageError(f"{name}: {reason}", reason) from err
    if min(image.size) < min_size:
        reason = f"image is {image.width}x{image.height} px, below the {min_size} px minimum (--min-size)"
        raise ImageError(f"{name}: {reason}", reason)
    return image


def preprocess(image: Image.Image, preprocessing: dict) -> torch.Tensor:
    """RGB image -> normalised float tensor [3, S, S] as the checkpoint's preprocessing dict says."""
    if preprocessing.get("color", "RGB") != "RGB":
        raise ImageError(f"preprocessing color {preprocessing['color']!r} is not supported (only RGB)")
    pixels = np.asarray(square_resize(image.convert("RGB"), int(preprocessing["image_size"])))
    return normalise(torch.from_numpy(pixels.copy()).permute(2, 0, 1), preprocessing)


def list_images(root: str | Path) -> tuple[list[Path], list[str]]:
    """Every image below `root` (sorted by relative path; symbolic links followed) and its identity: the
    first folder below root (`""` for images directly in root)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"--folder {shown_path(root)}: not a directory")
    found = iter_identity_images(root, IMAGE_EXTENSIONS)
    if not found:
        raise ImageError(f"--folder {shown_path(root)}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [path for path, _ in found], [identity for _, identity in found]


class ImageDataset(Dataset):
    """Preprocessed images from paths or encoded bytes; item i -> (tensor, i, problem, fatal).

    Problems are returned, not raised, so that a worker process or one rank never dies alone: `problem`
    says why image i is left out (`image_name(i)` names it); `fatal` (unreadable or too small) aborts
    embed_dataset unless it skips unusable images, a face not found under `align` is always skipped.
    """

    def __init__(
        self,
        sources: Sequence[str | Path | bytes],
        preprocessing: dict,
        align: bool = False,
        names: Sequence[str | Path] | None = None,
        min_size: int = 0,
    ):
        self.sources, self.preprocessing, self.align, self.names = sources, preprocessing, align, names
        self.min_size = min_size
        self._aligner = None  # built lazily in each worker (the OpenCV detector does not pickle)

    def __getstate__(self) -> dict:  # workers start from a pickled copy (forkserver)
        return {**self.__dict__, "_aligner": None}

    def __len__(self) -> int:
        return len(self.sources)

    def image_name(self, i: int) -> str:
        if self.names is not None:
            return shown_path(self.names[i])
        return f"image {i}" if isinstance(self.sources[i], bytes) else shown_path(self.sources[i])

    def __getitem__(self, i: int):
        from facedist.align import NoFaceError

        size = int(self.preprocessing["image_size"])
        try:
            image = load_image(self.sources[i], self.image_name(i), self.min_size)
            if self.align:
                image = self._align(image, size, i)
            return preprocess(image, self.preprocessing), i, "", False
        except NoFaceError:
            return torch.zeros(3, size, size), i, "no face found (--align)", False
        except ImageError as err:
            return torch.zeros(3, size, size), i, err.reason, True

    def _align(self, image: Image.Image, size: int, i: int) -> Image.Image:
        from facedist.align import FaceAligner

        if self._aligner is None:
            self._aligner = FaceAligner(size)
        return self._aligner.align(image, self.image_name(i)).image


class ShardImages:
    """The encoded images of one ShardIndex split as a sequence of bytes (for ImageDataset); images of another
    size than the model's are resized as training resizes them (warned once)."""

    def __init__(self, index, image_size: int):
        warn_if_resized(index.root, index.image_size, image_size)
        self.index = index

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, i: int) -> bytes:
        return self.index.read_image_bytes(int(i))

    def names(self) -> list[str]:
        return [f"{self.index.root} {self.index.split} sample {i}" for i in range(len(self))]


def flip_default(requested: bool | None, preprocessing: dict) -> bool:
    """Flip test-time augmentation: as asked (--flip / --no-flip), else as the checkpoint was validated."""
    return bool(preprocessing.get("flip", False)) if requested is None else requested


@torch.no_grad()
def embed_batch(
    model: torch.nn.Module, images: torch.Tensor, flip: bool = False, normalize: bool = True
) -> torch.Tensor:
    """L2-normalised (unless `normalize=False`) embeddings of a preprocessed batch [B, 3, S, S]; `flip`
    adds the mirrored image."""
    out = model(images)
    if flip:
        out = out + model(images.flip(-1))
    return F.normalize(out.float(), dim=1) if normalize else out.float()


@dataclass
class Skipped:
    """An image left out of the embeddings, and why."""

    index: int  # position in the dataset
    name: str  # the image's name ("" where the dataset gives none: then the reason names it)
    reason: str  # e.g. "not an image (Pillow cannot identify it)", "no face found (--align)"
    unusable: bool  # unreadable or too small (an image without a face is not)

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}" if self.name else self.reason


@dataclass
class Embeddings:
    vectors: np.ndarray  # [n, D] float32, L2-normalised (unless normalize=False)
    indices: np.ndarray  # [n] int64, the dataset position of each row (ascending)
    skipped: list[Skipped] = field(default_factory=list)  # images left out, by dataset position


def _all_gather_lists(items: list) -> list:
    if not distributed.is_distributed():
        return items
    parts: list = [None] * distributed.world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def embed_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    flip: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    normalize: bool = True,
    skip_unusable: bool = False,
) -> Embeddings:
    """Embed every item of `dataset` (split across ranks when distributed; all ranks get all rows;
    `normalize=False`: the model's outputs as they are, e.g. for IJB's faceness-weighted templates).

    Raises ImageError (on every rank) when an image is unusable (unreadable, too small), unless
    `skip_unusable`: then it is one of the `skipped`, as images without a face always are.
    """
    device = next(model.parameters()).device
    mine = np.array_split(np.arange(len(dataset)), distributed.world_size())[distributed.rank()]
    loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=batch_size, **loader_kwargs(num_workers))
    vectors, indices, problems = [], [], []
    model.eval()
    for images, idx, messages, fatal_flags in tqdm(
        loader, desc="embedding", disable=not progress or distributed.rank() > 0
    ):
        ok = torch.tensor([not m for m in messages])
        problems += [(i, m, f) for i, m, f in zip(idx.tolist(), messages, fatal_flags.tolist()) if m]
        if ok.any():
            vectors.append(embed_batch(model, images[ok].to(device, non_blocking=True), flip, normalize))
            indices.append(idx[ok].to(device))
    # a rank with nothing to embed still sends a [0, D] block to the gather
    local_vectors = torch.cat(vectors) if vectors else torch.zeros(0, model.embedding_dim, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    all_vectors = distributed.gather_rows(local_vectors).cpu().numpy().astype(np.float32)
    all_indices = distributed.gather_rows(local_indices).cpu().numpy().astype(np.int64)
    name = getattr(dataset, "image_name", lambda i: "")  # other datasets' problems name their image
    skipped = [Skipped(i, name(i), message, fatal) for i, message, fatal in sorted(_all_gather_lists(problems))]
    unusable = [s for s in skipped if s.unusable]
    if unusable and not skip_unusable:
        more = f" ({len(unusable)} unusable images in all)" if len(unusable) > 1 else ""
        raise ImageError(f"{unusable[0]}{more}")
    return Embeddings(all_vectors, all_indices, skipped)


def embed_paths(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    preprocessing: dict,
    batch_size: int = 64,
    flip: bool = False,
    align: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    min_size: int = MIN_IMAGE_SIZE,
    skip_unusable: bool = False,
) -> Embeddings:
    """Embeddings of image files (see embed_dataset); with `align`, images without a face are skipped."""
    dataset = ImageDataset(list(paths), preprocessing, align=align, min_size=min_size)
    return embed_dataset(model, dataset, batch_size, flip, num_workers, progress, skip_unusable=skip_unusable)


def account_for_skipped(skipped: list[Skipped], names: Sequence[str | Path], report: Path, strict: bool) -> str:
    """What a command line does with the images it left out: with `strict` refuse (ImageError, nothing
    written); else list them in the JSON file `report` (a stale one removed when none was left out) and
    refuse when no image is left. Returns the summary, e.g. '3 images skipped (...), listed in REPORT'."""
    if strict and skipped:
        raise ImageError(
            f"{len(skipped)} of {len(names)} images cannot be embedded, nothing written (--strict; without it the "
            f"rest is written and every skipped image listed); the first: {skipped[0]}"
        )
    write_skipped_report(report, skipped, names)
    listed = f", listed in {shown_path(report)}" if skipped else ""
    if len(skipped) == len(names):
        raise ImageError(f"none of the {len(names)} images can be embedded{listed}")
    return _skipped_summary(skipped) + listed


def _skipped_summary(skipped: list[Skipped]) -> str:
    """'3 images skipped (2 unreadable or too small, 1 without a face)' or '0 images skipped'."""
    unusable = sum(s.unusable for s in skipped)
    parts = [f"{unusable} unreadable or too small"] * bool(unusable)
    parts += [f"{len(skipped) - unusable} without a face"] * bool(len(skipped) - unusable)
    return f"{len(skipped)} images skipped" + (f" ({', '.join(parts)})" if parts else "")


def write_skipped_report(path: Path, skipped: list[Skipped], names: Sequence[str | Path]) -> None:
    """List every skipped image with its reason in the JSON file `path` (path rule: module docstring);
    without skipped images, remove a report a previous run left there."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    entries = [{**name_fields(names[s.index]), "reason": s.reason} for s in skipped]
    report = {"images": len(names), "embedded": len(names) - len(skipped), "skipped": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n"))
