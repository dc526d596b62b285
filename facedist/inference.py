"""Images to embeddings, one way for facedist-eval, -compare and -embed.

An image is decoded, optionally face-aligned (facedist.align), brought to the checkpoint's square
`image_size` exactly as the shard builder stores it (centre square crop, bicubic: `shards.square_resize`,
so a photo embeds like its shard), scaled to [0, 1] and normalised with its mean/std (the preprocessing
dict stored with every checkpoint). Embeddings are the model's output, with flip test-time augmentation the sum of the
outputs for the image and its mirror (insightface convention), then L2-normalised.

Under `accelerate launch` (a torch.distributed process group) every process embeds a contiguous slice
of the images and the slices are gathered in order, so every rank ends with the same result as one
process would compute.
"""

from __future__ import annotations

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
from facedist.data.shards import decode_rgb, square_resize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image cannot be read or does not fit the model; the message names it."""


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (or encoded bytes) to RGB; `ImageError` naming it when that fails."""
    name = name or str(source)
    try:  # the shard builder's decoder: EXIF orientation applied, 16-bit greyscale rescaled, as in the shards
        return decode_rgb(source if isinstance(source, bytes) else Path(source).read_bytes())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{name}: not a readable image ({reason})") from err


def preprocess(image: Image.Image, preprocessing: dict) -> torch.Tensor:
    """RGB image -> normalised float tensor [3, S, S] as the checkpoint's preprocessing dict says."""
    if preprocessing.get("color", "RGB") != "RGB":
        raise ImageError(f"preprocessing color {preprocessing['color']!r} is not supported (only RGB)")
    pixels = np.asarray(square_resize(image.convert("RGB"), int(preprocessing["image_size"])))
    return normalise(torch.from_numpy(pixels.copy()).permute(2, 0, 1), preprocessing)


def list_images(root: str | Path) -> tuple[list[Path], list[str]]:
    """Every image below `root` (sorted by relative path) and its identity: the first folder below root
    (`""` for images directly in root)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"--folder {root}: not a directory")
    paths = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise ImageError(f"--folder {root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    identities = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
    return paths, identities


class ImageDataset(Dataset):
    """Preprocessed images from paths or encoded bytes; item i -> (tensor, i, problem, fatal).

    Problems are returned, not raised, so that a worker process or one rank never dies alone:
    `fatal` (unreadable image) aborts the run after gathering, a face not found under `align` is
    reported and the image skipped.
    """

    def __init__(
        self,
        sources: Sequence[str | Path | bytes],
        preprocessing: dict,
        align: bool = False,
        names: Sequence[str] | None = None,
    ):
        self.sources, self.preprocessing, self.align, self.names = sources, preprocessing, align, names
        self._aligner = None  # built lazily in each worker (OpenCV cascades do not pickle)

    def __getstate__(self) -> dict:  # workers start from a pickled copy (forkserver)
        return {**self.__dict__, "_aligner": None}

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        from facedist.align import FaceAligner, NoFaceError

        name = self.names[i] if self.names is not None else str(self.sources[i])
        size = int(self.preprocessing["image_size"])
        try:
            image = load_image(self.sources[i], name)
            if self.align:
                if self._aligner is None:
                    self._aligner = FaceAligner(size)
                image = self._aligner.align(image, name).image
            return preprocess(image, self.preprocessing), i, "", False
        except NoFaceError as err:
            return torch.zeros(3, size, size), i, str(err), False
        except ImageError as err:
            return torch.zeros(3, size, size), i, str(err), True


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
class Embeddings:
    vectors: np.ndarray  # [n, D] float32, L2-normalised (unless normalize=False)
    indices: np.ndarray  # [n] int64, the dataset position of each row (ascending)
    skipped: list[str] = field(default_factory=list)  # images left out (no face found), one line each


def _all_gather_lists(items: list) -> list:
    if not distributed.is_distributed():
        return items
    parts: list = [None] * distributed.world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def embed_dataset(
    model: torch.nn.Module,
    dataset: ImageDataset,
    batch_size: int = 64,
    flip: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    normalize: bool = True,
) -> Embeddings:
    """Embed every item of `dataset` (split across ranks when distributed; all ranks get all rows;
    `normalize=False`: the model's outputs as they are, e.g. for IJB's faceness-weighted templates).

    Raises ImageError (on every rank) when any image could not be read.
    """
    device = next(model.parameters()).device
    mine = np.array_split(np.arange(len(dataset)), distributed.world_size())[distributed.rank()]
    loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=batch_size, **loader_kwargs(num_workers))
    vectors, indices, skipped, fatal = [], [], [], []
    model.eval()
    for images, idx, messages, fatal_flags in tqdm(
        loader, desc="embedding", disable=not progress or distributed.rank() > 0
    ):
        ok = torch.tensor([not m for m in messages])
        for message, is_fatal in zip(messages, fatal_flags.tolist()):
            if message:
                (fatal if is_fatal else skipped).append(message)
        if ok.any():
            vectors.append(embed_batch(model, images[ok].to(device, non_blocking=True), flip, normalize))
            indices.append(idx[ok].to(device))
    # a rank with nothing to embed still sends a [0, D] block to the gather
    local_vectors = torch.cat(vectors) if vectors else torch.zeros(0, model.embedding_dim, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    all_vectors = distributed.gather_rows(local_vectors).cpu().numpy().astype(np.float32)
    all_indices = distributed.gather_rows(local_indices).cpu().numpy().astype(np.int64)
    fatal = _all_gather_lists(fatal)
    if fatal:
        more = f" (and {len(fatal) - 1} more unreadable images)" if len(fatal) > 1 else ""
        raise ImageError(fatal[0] + more)
    return Embeddings(all_vectors, all_indices, _all_gather_lists(skipped))


def embed_paths(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    preprocessing: dict,
    batch_size: int = 64,
    flip: bool = False,
    align: bool = False,
    num_workers: int = 0,
    progress: bool = False,
) -> Embeddings:
    """Embeddings of image files (see embed_dataset); with `align`, images without a face are skipped."""
    dataset = ImageDataset(list(paths), preprocessing, align=align)
    return embed_dataset(model, dataset, batch_size, flip, num_workers, progress)
