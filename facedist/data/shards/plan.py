"""Planning a build: which source images become samples, in which split, under which label.

Every candidate image is decoded once in the check pass (`check_file`, run in worker processes): it must
decode fully (Pillow, EXIF orientation applied), have a shorter side of at least `--min-size` px and,
with `--align`, a detectable face (the largest of the photo's is taken; which one, and how many there
were, is kept for OUT/align.json). `make_plan` then drops repeats within an identity (same sha256),
identities with fewer than `--min-images` usable images, draws the val/test identities with `--seed`,
and labels each split 0..C-1 in identity-name order, samples sorted by label, then source path. Every
file left out is in the plan's report with its reason. The default `--min-size` of 16 px rejects
placeholders and thumbnails (1x1 spacers, icons) while keeping every real face crop: below 16 px a face
holds too little for identity, and the builder would otherwise upscale it without a word.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from facedist.data.shards.images import decode_rgb, face_aligner, failure_reason
from facedist.data.shards.layout import FORMAT_VERSION, IMAGE_FORMATS, SPLITS, ShardError
from facedist.data.shards.scan import SourceScan, read_source


@dataclass(frozen=True)
class BuildOptions:
    """Everything the output depends on (the number of workers is deliberately not here)."""

    size: int = 112
    format: str = "jpg"
    quality: int = 95
    max_samples: int = 10_000
    max_bytes: int = 1_000_000_000
    val_identities: str = "0"  # a count ("10") or a fraction of the usable identities ("0.1")
    test_identities: str = "0"
    min_images: int = 1
    min_size: int = 16  # px of the source image's shorter side; below it an image is reported and skipped
    seed: int = 0
    align: bool = False  # detect, align and crop the face (facedist.align); images without one are skipped

    def validate(self) -> None:
        """ShardError naming the first option out of its range."""
        if self.format not in IMAGE_FORMATS:
            raise ShardError(f"--format {self.format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        for name, value, low in (
            ("size", self.size, 8),
            ("max-samples", self.max_samples, 1),
            ("max-bytes", self.max_bytes, 1),
            ("min-images", self.min_images, 1),
            ("min-size", self.min_size, 1),
            ("seed", self.seed, 0),
        ):
            if value < low:
                raise ShardError(f"--{name} must be >= {low} (got {value})")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"--quality must be in 1..100 (got {self.quality})")
        for name in ("val_identities", "test_identities"):
            split_count(getattr(self, name), 1, "--" + name.replace("_", "-"))


def split_count(spec: str, available: int, flag: str) -> int:
    """Number of identities for `spec`: an integer count, or a fraction in [0, 1] of `available`."""
    spec = str(spec).strip()
    try:
        count = int(spec)
    except ValueError:
        try:
            fraction = float(spec)
        except ValueError:
            raise ShardError(f"{flag} {spec!r} is neither a count nor a fraction") from None
        if not 0.0 <= fraction <= 1.0:
            raise ShardError(f"{flag} {spec!r}: a fraction must be in [0, 1]") from None
        return int(round(fraction * available))
    if count < 0:
        raise ShardError(f"{flag} {spec!r} must not be negative")
    return count


def check_file(path: str | tuple, align_size: int = 0) -> tuple[str | None, list[int] | None, str | None, dict | None]:
    """(sha256, [w, h], None, face) for a readable image, else (None, None, reason, None). With `align_size` > 0
    the image must hold a face, and `face` records the one aligned (`face_record`); without, it is None."""
    try:
        data = read_source(path)
    except OSError as error:
        return None, None, f"unreadable ({error.strerror})", None
    if not data:
        return None, None, "zero-byte file", None
    try:
        image = decode_rgb(data)
    except Exception as error:  # Pillow raises many types for bad data; every one means "skip this file"
        return None, None, failure_reason(error), None
    original_size = list(image.size)  # as displayed, i.e. after EXIF orientation
    face = None
    if align_size:
        from facedist.align import NoFaceError

        try:
            face = face_record(face_aligner(align_size).align(image, path))
        except NoFaceError:
            return None, None, "no face found (--align)", None
    return hashlib.sha256(data).hexdigest(), original_size, None, face


def face_record(aligned) -> dict:
    """What align.json keeps of an `AlignedFace`: faces found, and the chosen one's box, score and landmarks
    (source pixels, after EXIF orientation)."""
    return {
        "faces": aligned.num_faces,
        "box": [round(float(v), 1) for v in aligned.face.box],
        "score": round(aligned.face.score, 4),
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in aligned.face.landmarks],
    }


@dataclass(frozen=True)
class Sample:
    """One image as it will be stored: its label, identity, source path and content checksum."""

    label: int
    identity: str
    source: str  # path relative to SRC
    sha256: str
    original_size: tuple[int, int]


@dataclass
class Plan:
    """Samples per split in output order, plus the report of everything left out."""

    splits: dict[str, list[Sample]]
    classes: dict[str, list[str]]
    report: dict
    usable_images: dict[str, int]  # per identity folder read, before --min-images
    faces: dict[str, dict] = field(default_factory=dict)  # --align: source relpath -> face_record

    def align_report(self) -> dict:
        """OUT/align.json: every stored image in split order, with its faces found and the face aligned."""
        images = [
            {"path": s.source, "split": split, **self.faces[s.source]}
            for split in self.splits
            for s in self.splits[split]
        ]
        return {"format_version": FORMAT_VERSION, "rule": "the largest face (box area) is aligned", "images": images}

    def why_empty(self, options: BuildOptions) -> str:
        """Why no image survived, as a clause for the build's one-line error."""
        most = max(self.usable_images.values(), default=0)
        if most:
            return f"no identity has --min-images {options.min_images} usable images (the most any has is {most})"
        reasons = Counter(r["reason"].split(" (")[0] for r in self.report["skipped_files"])
        listed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
        return f"none of the {sum(reasons.values())} files is a usable image ({listed})"

    def fingerprint(self, options: BuildOptions) -> str:
        """sha256 of the format, the options and every sample's split, label, source and content."""
        h = hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, "options": asdict(options)}).encode())
        for split, samples in self.splits.items():
            for s in samples:
                h.update(f"{split}\0{s.label}\0{s.source}\0{s.sha256}\n".encode())
        return h.hexdigest()


def _usable_images(scan: SourceScan, checks: dict[str, tuple], options: BuildOptions, report: dict) -> dict:
    """{identity: [(relpath, sha256, [w, h])]} of the images that decode, are not too small and not repeated
    within their identity; every other file goes to `report`."""
    usable = {}
    for identity, files in scan.identities.items():
        first_by_sha: dict[str, str] = {}
        good = []
        for relpath in files:
            sha, original_size, reason, _ = checks[relpath]
            if reason is None and min(original_size) < options.min_size:
                w, h = original_size
                reason = f"too small ({w}x{h} px, shorter side < --min-size {options.min_size})"
            if reason is None and sha in first_by_sha:
                reason = f"duplicate of {first_by_sha[sha]}"
            if reason is not None:
                report["skipped_files"].append({"path": relpath, "reason": reason})
            else:
                first_by_sha[sha] = relpath
                good.append((relpath, sha, original_size))
        usable[identity] = good
    return usable


def _choose_splits(names: list[str], options: BuildOptions) -> dict[str, set[str]]:
    """The identities of each split: val and test drawn with --seed, train the rest."""
    counts = {}
    for split, spec in (("val", options.val_identities), ("test", options.test_identities)):
        counts[split] = split_count(spec, len(names), f"--{split}-identities")
        if names and counts[split] == 0 and float(spec) > 0:
            raise ShardError(
                f"--{split}-identities {spec} gives no identity of the {len(names)} usable ones; "
                "ask for a count or a larger fraction"
            )
    if counts["val"] + counts["test"] > len(names):
        raise ShardError(
            f"--val-identities ({counts['val']}) + --test-identities ({counts['test']}) "
            f"exceed the {len(names)} usable identities"
        )
    order = np.random.default_rng(options.seed).permutation(len(names))
    chosen = {
        "val": {names[i] for i in order[: counts["val"]]},
        "test": {names[i] for i in order[counts["val"] : counts["val"] + counts["test"]]},
    }
    chosen["train"] = set(names) - chosen["val"] - chosen["test"]
    return chosen


def make_plan(scan: SourceScan, checks: dict[str, tuple], options: BuildOptions) -> Plan:
    """Drop bad files, dedup within identities, apply --min-size and --min-images, choose splits, assign labels."""
    report = {
        "format_version": FORMAT_VERSION,
        "skipped_files": list(scan.skipped_files),
        "skipped_identities": list(scan.skipped_identities),
    }
    usable = _usable_images(scan, checks, options, report)
    kept = {}
    for identity, good in usable.items():
        if len(good) < options.min_images:
            reason = f"{len(good)} usable images < --min-images {options.min_images}"
            report["skipped_identities"].append({"identity": identity, "reason": reason})
            report["skipped_files"].extend({"path": p, "reason": f"identity skipped: {reason}"} for p, _, _ in good)
        else:
            kept[identity] = good

    by_sha = defaultdict(list)
    for good in kept.values():
        for relpath, sha, _ in good:
            by_sha[sha].append(relpath)
    report["skipped_files"].sort(key=lambda r: r["path"])
    report["skipped_identities"].sort(key=lambda r: r["identity"])
    report["cross_identity_duplicates"] = [
        {"sha256": sha, "paths": paths} for sha, paths in sorted(by_sha.items()) if len(paths) > 1
    ]

    chosen = _choose_splits(sorted(kept), options)
    splits, classes = {}, {}
    for split in SPLITS:
        split_names = sorted(chosen[split])
        if not split_names:
            continue
        classes[split] = split_names
        splits[split] = [
            Sample(label, name, relpath, sha, tuple(original_size))
            for label, name in enumerate(split_names)
            for relpath, sha, original_size in kept[name]
        ]
    faces = {s.source: checks[s.source][3] for samples in splits.values() for s in samples if checks[s.source][3]}
    return Plan(splits, classes, report, {identity: len(good) for identity, good in usable.items()}, faces)
