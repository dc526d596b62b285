"""LFW-style pairs files (LFW's View 2 `pairs.txt`): draw one from an identity folder, read one back, and find
the image files its lines name.

Format: a header line `folds<TAB>per_fold`; then, fold after fold, `per_fold` same-identity pairs
`name<TAB>i<TAB>j` followed by `per_fold` different-identity pairs `name1<TAB>i<TAB>name2<TAB>j`. Image
numbers are 1-based over the identity's image files in sorted order, which is LFW's own `Name_0001.jpg`
numbering. Written files use tabs; any whitespace is read, so identity names hold none.

Drawing (`draw_pairs`): as in LFW's View 2 the folds hold disjoint identities (identities are dealt to the
folds after a seeded shuffle); within a fold no pair repeats, same pairs draw an identity with 2+ images
uniformly then two of its images, different pairs two distinct identities then an image of each.

Finding images (`ImageFolder`): `DIR/<name>/<name>_<i:04d>.<ext>` when the identity's folder uses LFW's
naming, else the i-th file of the identity's sorted list (`facedist.data.folders.iter_identity_images`, as
`draw_pairs` numbered them). Every mistake is one `PairsError` line naming the file and line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facedist.data.folders import iter_identity_images
from facedist.durable import write_atomic
from facedist.inference import IMAGE_EXTENSIONS

ENUMERATE_BELOW = 4  # draw from the full list of candidate pairs when there are fewer than 4x the pairs wanted


class PairsError(ValueError):
    """A pairs file or its image folder is malformed or inconsistent; the message names file and line."""


@dataclass(frozen=True)
class Pair:
    line: int  # 1-based line in the pairs file (0 for pairs not read from a file)
    first: tuple[str, int]  # (identity, 1-based image number)
    second: tuple[str, int]

    @property
    def same(self) -> bool:
        return self.first[0] == self.second[0]


def identity_images(root: str | Path) -> dict[str, list[Path]]:
    """Identity -> its image files in sorted order (the numbering of a pairs file), from ROOT/<identity>/..."""
    by_identity: dict[str, list[Path]] = {}
    for path, identity in iter_identity_images(root, IMAGE_EXTENSIONS):
        if identity:  # images directly in ROOT belong to no identity
            by_identity.setdefault(identity, []).append(path)
    return by_identity


def _deal_identities(counts: dict[str, int], folds: int, rng: np.random.Generator) -> list[list[str]]:
    """Identities dealt round-robin to `folds` after a shuffle: those with 2+ images first, so every fold
    gets its share of the identities that can make same pairs."""
    repeated = [name for name in sorted(counts) if counts[name] > 1]
    single = [name for name in sorted(counts) if counts[name] == 1]
    dealt = [list(rng.permutation(repeated)), list(rng.permutation(single))]
    order = dealt[0] + dealt[1]
    return [sorted(str(name) for name in order[k::folds]) for k in range(folds)]


def _distinct(count: int, available: int, draw, enumerate_all, rng: np.random.Generator) -> list[tuple]:
    """`count` distinct pairs: sampled with rejection, or from the full list when few are available."""
    if available < ENUMERATE_BELOW * count:
        candidates = enumerate_all()
        return [candidates[k] for k in rng.choice(len(candidates), count, replace=False)]
    chosen: set[tuple] = set()
    while len(chosen) < count:
        chosen.add(draw())
    return list(chosen)


def _fold_pairs(names: list[str], counts: dict[str, int], per_fold: int, rng, where: str) -> list[Pair]:
    repeated = [name for name in names if counts[name] > 1]
    same_available = sum(math.comb(counts[name], 2) for name in repeated)
    sizes = np.array([counts[name] for name in names])
    different_available = (sizes.sum() ** 2 - (sizes**2).sum()) // 2
    if same_available < per_fold or different_available < per_fold:
        raise PairsError(
            f"{where}: {len(names)} identities ({len(repeated)} with 2+ images) allow {same_available} same and "
            f"{different_available} different pairs, fewer than --per-fold {per_fold}: use fewer folds or pairs"
        )

    def draw_same():
        name = repeated[rng.integers(len(repeated))]
        i, j = sorted(rng.choice(counts[name], 2, replace=False) + 1)
        return (name, int(i), name, int(j))

    def draw_different():
        a, b = sorted(rng.choice(len(names), 2, replace=False))
        return (names[a], int(rng.integers(counts[names[a]]) + 1), names[b], int(rng.integers(counts[names[b]]) + 1))

    def all_same():
        return [(n, i, n, j) for n in repeated for i in range(1, counts[n] + 1) for j in range(i + 1, counts[n] + 1)]

    def all_different():
        return [
            (a, i, b, j)
            for x, a in enumerate(names)
            for b in names[x + 1 :]
            for i in range(1, counts[a] + 1)
            for j in range(1, counts[b] + 1)
        ]

    same = sorted(_distinct(per_fold, same_available, draw_same, all_same, rng))
    different = sorted(_distinct(per_fold, different_available, draw_different, all_different, rng))
    return [Pair(0, (a, i), (b, j)) for a, i, b, j in same + different]


def draw_pairs(root: str | Path, folds: int = 10, per_fold: int = 300, seed: int = 0) -> list[Pair]:
    """`folds` x (`per_fold` same + `per_fold` different) pairs over ROOT's identities, in file order."""
    if folds < 1 or per_fold < 1:
        raise PairsError(f"--folds and --per-fold must be >= 1, got {folds} and {per_fold}")
    if not Path(root).is_dir():
        raise PairsError(f"{root}: not a directory")
    by_identity = identity_images(root)
    spaced = [name for name in by_identity if re.search(r"\s", name)]
    if spaced:
        raise PairsError(f"{root}: identity folder {spaced[0]!r} has whitespace in its name, which a pairs line cannot")
    counts = {name: len(paths) for name, paths in by_identity.items()}
    rng = np.random.default_rng(seed)
    pairs = []
    for k, names in enumerate(_deal_identities(counts, folds, rng)):
        pairs += _fold_pairs(names, counts, per_fold, rng, f"{root}: fold {k + 1} of {folds}")
    return pairs


def format_pairs(pairs: list[Pair], folds: int, per_fold: int) -> str:
    lines = [f"{folds}\t{per_fold}"]
    for pair in pairs:
        fields = [pair.first[0], pair.first[1], pair.second[1]] if pair.same else [*pair.first, *pair.second]
        lines.append("\t".join(str(field) for field in fields))
    return "\n".join(lines) + "\n"


def write_pairs(path: str | Path, pairs: list[Pair], folds: int, per_fold: int) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(format_pairs(pairs, folds, per_fold)))


def _image_number(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PairsError(f"{where}: image number {text!r} is not a whole number >= 1")
    return int(text)


def read_pairs(path: str | Path) -> tuple[list[Pair], int, int]:
    """(pairs in file order, folds, per_fold) of a pairs file; PairsError naming the line of any mistake."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PairsError(f"{path}: not a readable pairs file ({getattr(err, 'strerror', None) or err})") from None
    header = lines[0].split() if lines else []
    if not 1 <= len(header) <= 2 or not all(field.isdigit() and int(field) > 0 for field in header):
        raise PairsError(
            f"{path}:1: the header must be 'folds per_fold' (whole numbers >= 1, e.g. '10 300'), or 'n' for one "
            "fold of n same + n different pairs (LFW's View 1 files)"
        )
    folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    body = [(number, line.split()) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if len(body) != 2 * folds * per_fold:
        raise PairsError(
            f"{path}: {len(body)} pair lines, but the header '{' '.join(header)}' says {2 * folds * per_fold}"
            f" ({folds} folds of {per_fold} same + {per_fold} different)"
        )
    pairs = []
    for k, (number, fields) in enumerate(body):
        where = f"{path}:{number}"
        same = k % (2 * per_fold) < per_fold
        if same and len(fields) == 3:
            pair = Pair(
                number, (fields[0], _image_number(fields[1], where)), (fields[0], _image_number(fields[2], where))
            )
        elif not same and len(fields) == 4:
            first = (fields[0], _image_number(fields[1], where))
            pair = Pair(number, first, (fields[2], _image_number(fields[3], where)))
        else:
            expected = "'name i j' (a same pair)" if same else "'name1 i name2 j' (a different pair)"
            raise PairsError(f"{where}: expected {expected} at this place of its fold, got {len(fields)} fields")
        if not same and pair.same:
            raise PairsError(f"{where}: a different pair names {fields[0]} twice")
        pairs.append(pair)
    return pairs, folds, per_fold


class ImageFolder:
    """The image file a pairs line names in DIR (module docstring: LFW's naming, else the sorted list)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PairsError(f"{self.root}: not a directory (the pairs file's image folder)")
        self.by_identity = identity_images(self.root)
        self.numbered = {identity: self._lfw_numbered(identity) for identity in self.by_identity}

    def _lfw_numbered(self, identity: str) -> dict[int, Path]:
        """Image number -> file for the files named `<identity>_NNNN.<ext>` directly in its folder."""
        pattern = re.compile(rf"{re.escape(identity)}_(\d{{4}})")
        numbered = {}
        for path in self.by_identity[identity]:
            match = pattern.fullmatch(path.stem)
            if match and path.parent == self.root / identity:
                numbered[int(match.group(1))] = path
        return numbered

    def path(self, identity: str, number: int, where: str) -> Path:
        """The file of image `number` of `identity`; PairsError naming `where` when there is none."""
        files = self.by_identity.get(identity)
        if not files:
            raise PairsError(f"{where}: no identity {identity!r} in {self.root} (no folder with images)")
        numbered = self.numbered[identity]
        if numbered:  # LFW's naming: the number is in the name, never the position
            if number not in numbered:
                raise PairsError(f"{where}: no image {identity}_{number:04d} in {self.root / identity}")
            return numbered[number]
        if number > len(files):
            raise PairsError(f"{where}: image {number} of {identity}, which has {len(files)} images in {self.root}")
        return files[number - 1]


def pair_images(
    pairs_file: str | Path, root: str | Path
) -> tuple[list[Path], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """A pairs file's images in ROOT, each once: (paths, their identities, index_a, index_b, is_same), the
    indices into paths, pairs in file order (what facedist-eval --pairs embeds and scores)."""
    pairs, _, _ = read_pairs(pairs_file)
    folder = ImageFolder(root)
    position: dict[Path, int] = {}
    paths, identities, rows = [], [], []
    for pair in pairs:
        row = []
        for identity, number in (pair.first, pair.second):
            path = folder.path(identity, number, f"{pairs_file}:{pair.line}")
            if path not in position:
                position[path] = len(paths)
                paths.append(path)
                identities.append(identity)
            row.append(position[path])
        rows.append((*row, pair.same))
    index_a, index_b, same = (np.array(column) for column in zip(*rows))
    return paths, identities, index_a.astype(np.int64), index_b.astype(np.int64), same.astype(bool)
