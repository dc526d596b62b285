"""MXNet indexed RecordIO (`train.rec` + `train.idx`), read by facedist itself (no MXNet at run time).

Framing (dmlc-core's RecordIOWriter): a part is the magic 0xced7230a, a uint32 whose top 3 bits are the
continuation flag and low 29 bits the length, then the data padded to 4 bytes. The writer splits a record
wherever the magic word appears 4-aligned in its payload: parts with flags 1 (first), 2 (middle), 3 (last),
the magic word itself dropped; `read_record` reassembles them and puts 0xced7230a back between them.
`.idx` lines are `key<TAB>offset` (offset of the record's first part).

A record's payload is the IRHeader `<IfQQ` (flag, label, id, id2; 24 bytes), then `flag` float32 labels
when flag > 0, then the image bytes. Two layouts are in use:
- InsightFace's (MS1MV2/3, Glint360K, WebFace): record 0 is a header with flag > 0 whose labels are
  [first identity record, end) and no image; records 1 .. first-1 are images, each labelled with its class
  id (the float label, or the first of the labels); records first .. end-1 are identities labelled
  [start, end) of their image records (used here only to report empty identities).
- im2rec's: every record is an image with one float label (flag 0), in any key order, no header.
The class id is the label; identities are named by it, zero-padded (`IDENTITY_FORMAT`), so names sort
numerically and splits and labels are stable.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")
IDENTITY_FORMAT = "{:08d}"  # class 42 -> "00000042"


class RecordIOError(ValueError):
    """The .rec/.idx pair is malformed (bad magic, truncated, an offset past the end); names file and key."""


def is_recordio(src: Path) -> bool:
    """SRC is a .rec file, or a folder holding train.rec."""
    return (src.is_file() and src.suffix == ".rec") or (src.is_dir() and (src / "train.rec").is_file())


def rec_and_idx(src: Path) -> tuple[Path, Path]:
    rec = src if src.suffix == ".rec" else src / "train.rec"
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise RecordIOError(f"{idx} not found: facedist reads indexed RecordIO (train.rec with its train.idx)")
    return rec, idx


def read_idx(idx: Path, rec_size: int) -> list[tuple[int, int]]:
    """[(key, offset)] in file order; a malformed line or an offset past the end of the .rec is an error."""
    entries = []
    for number, line in enumerate(idx.read_text(encoding="ascii", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            key, offset = int(fields[0]), int(fields[1])
            if len(fields) != 2 or offset < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise RecordIOError(f"{idx} line {number}: expected 'key<TAB>offset', got {line[:60]!r}") from None
        if offset + 8 > rec_size:
            raise RecordIOError(
                f"{idx} line {number}: key {key} at offset {offset} is past the end of the "
                f"{rec_size}-byte .rec (truncated .rec, or an .idx of another file)"
            )
        entries.append((key, offset))
    if not entries:
        raise RecordIOError(f"{idx}: no records listed")
    return entries


def read_record(fd: int, offset: int, where: str) -> bytes:
    """The payload of the record whose first part is at `offset` of the open file `fd` (parts joined)."""
    parts, expected = [], (0, 1)
    while True:
        head = os.pread(fd, 8, offset)
        if len(head) < 8:
            raise RecordIOError(f"{where}: truncated at offset {offset} (record header cut off)")
        magic, word = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at offset {offset} (expected 0x{MAGIC:08x})")
        flag, length = word >> 29, word & _LENGTH_MASK
        if flag not in expected:
            raise RecordIOError(f"{where}: continuation flag {flag} at offset {offset} out of sequence")
        data = os.pread(fd, length, offset + 8)
        if len(data) < length:
            raise RecordIOError(f"{where}: truncated at offset {offset} ({len(data)} of {length} bytes)")
        parts.append(data)
        if flag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        offset += 8 + ((length + 3) & ~3)
        expected = (2, 3)


@dataclass(frozen=True)
class Record:
    flag: int
    labels: tuple[float, ...]  # (label,) when flag == 0, else the `flag` float32 labels
    image: bytes


def unpack(payload: bytes, where: str) -> Record:
    if len(payload) < IR_HEADER.size:
        raise RecordIOError(f"{where}: record of {len(payload)} bytes is shorter than its 24-byte IRHeader")
    flag, label, _, _ = IR_HEADER.unpack_from(payload)
    start = IR_HEADER.size + 4 * flag
    if len(payload) < start:
        raise RecordIOError(f"{where}: IRHeader says {flag} labels, the record is {len(payload)} bytes")
    labels = tuple(np.frombuffer(payload, "<f4", flag, IR_HEADER.size).tolist()) if flag else (label,)
    return Record(flag, labels, payload[start:])


def read_labels(fd: int, offset: int, where: str) -> tuple[float, ...]:
    """A record's labels from its first bytes only (the whole record when its first part is too short)."""
    head = os.pread(fd, 8 + IR_HEADER.size + 64, offset)
    if len(head) >= 8 + IR_HEADER.size:
        magic, word = struct.unpack_from("<II", head)
        flag = IR_HEADER.unpack_from(head, 8)[0]
        needed = IR_HEADER.size + 4 * flag
        if magic == MAGIC and (word & _LENGTH_MASK) >= needed and len(head) >= 8 + needed:
            return unpack(head[8 : 8 + needed], where).labels
    return unpack(read_record(fd, offset, where), where).labels


@functools.lru_cache(maxsize=4)
def _open(rec: str) -> int:
    return os.open(rec, os.O_RDONLY)  # one descriptor per worker process, kept for its lifetime


def read_image(rec: str, offset: int, key: int) -> bytes:
    """The image bytes of record `key` at `offset` of `rec` (for the shard build's workers)."""
    where = f"{rec} key {key}"
    return unpack(read_record(_open(rec), offset, where), where).image


def _class_of(labels: tuple[float, ...]) -> int | None:
    value = labels[0]
    return int(value) if np.isfinite(value) and value >= 0 and value == int(value) else None


def frame(payload: bytes) -> bytes:
    """A record as dmlc's writer frames it: split at every 4-aligned magic word, padded to 4 bytes."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == _MAGIC_BYTES]
    starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
    out = []
    for n, (start, end) in enumerate(zip(starts, ends)):
        flag = 0 if not cuts else 1 if n == 0 else 3 if n == len(cuts) else 2
        out += [struct.pack("<II", MAGIC, (flag << 29) | (end - start)), payload[start:end]]
    return b"".join(out) + b"\0" * (-len(payload) % 4)


def pack(labels: float | list[float], image: bytes, record_id: int = 0) -> bytes:
    """An IRHeader payload like mx.recordio.pack: one float label (flag 0) or a list of them (flag = count)."""
    if isinstance(labels, (int, float)):
        return IR_HEADER.pack(0, float(labels), record_id, 0) + image
    values = np.asarray(labels, dtype="<f4")
    return IR_HEADER.pack(len(values), 0.0, record_id, 0) + values.tobytes() + image


def write_insightface(rec: Path, classes: list[list[bytes]]) -> None:
    """train.rec + train.idx in InsightFace's layout from the encoded images of each class (benchmarks, tests)."""
    first = 1 + sum(map(len, classes))
    records, key = [pack([first, first + len(classes)], b"")], 1
    for label, images in enumerate(classes):
        records += [pack(float(label), image, key + n) for n, image in enumerate(images)]
        key += len(images)
    start = 1
    for images in classes:
        records.append(pack([start, start + len(images)], b""))
        start += len(images)
    offset, lines = 0, []
    with open(rec, "wb") as f:
        for key, payload in enumerate(records):
            lines.append(f"{key}\t{offset}\n")
            offset += f.write(frame(payload))
    rec.with_suffix(".idx").write_text("".join(lines))


@dataclass
class RecordScan:
    """Image records per identity name ({name: [(key, offset)]}) and what was left out, as report lines."""

    rec: Path
    layout: str
    identities: dict[str, list[tuple[int, int]]]
    skipped_files: list[dict] = field(default_factory=list)  # {"path", "reason"}
    skipped_identities: list[dict] = field(default_factory=list)  # {"identity", "reason"}

    def relpath(self, key: int) -> str:
        return f"{self.rec.name}#{key}"


def scan_recordio(src: Path) -> RecordScan:
    """Read every record's labels (its first bytes; the images are read by the build's workers)."""
    rec, idx = rec_and_idx(src)
    entries = read_idx(idx, rec.stat().st_size)
    offsets = dict(entries)
    fd = os.open(rec, os.O_RDONLY)
    try:
        header = unpack(read_record(fd, offsets[0], f"{rec} key 0"), f"{rec} key 0") if 0 in offsets else None
        insightface = (
            header is not None
            and header.flag >= 2
            and not header.image
            and all(v == int(v) for v in header.labels[:2])
            and 1 <= header.labels[0] <= header.labels[1]
        )
        scan = RecordScan(rec, "insightface" if insightface else "im2rec", {})
        if insightface:
            first, end = int(header.labels[0]), int(header.labels[1])
            image_keys = [k for k, _ in entries if 1 <= k < first]
            missing = sorted(set(range(1, first)) - set(image_keys))
            scan.skipped_files += [
                {"path": scan.relpath(k), "reason": "listed by the header record, not in the .idx"} for k in missing
            ]
            for key in range(first, end):
                if key not in offsets:
                    continue
                start_end = read_labels(fd, offsets[key], f"{rec} key {key}")
                if len(start_end) >= 2 and start_end[1] <= start_end[0]:
                    scan.skipped_identities.append(
                        {
                            "identity": IDENTITY_FORMAT.format(key - first),
                            "reason": f"empty identity (record {key}: [{start_end[0]:g}, {start_end[1]:g}))",
                        }
                    )
        else:
            image_keys = [k for k, _ in entries]
        for key in image_keys:
            labels = read_labels(fd, offsets[key], f"{rec} key {key}")
            label = _class_of(labels)
            if label is None:
                scan.skipped_files.append(
                    {"path": scan.relpath(key), "reason": f"label {labels[0]!r} is not a class id"}
                )
                continue
            scan.identities.setdefault(IDENTITY_FORMAT.format(label), []).append((key, offsets[key]))
    finally:
        os.close(fd)
    if not scan.identities:
        raise RecordIOError(f"{rec}: no image records")
    scan.identities = {name: sorted(records) for name, records in sorted(scan.identities.items())}
    return scan
