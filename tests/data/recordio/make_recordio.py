"""Writes the reference RecordIO files under tests/data/recordio with the real MXNet library.

    python3.11 -m venv /tmp/mxvenv && /tmp/mxvenv/bin/pip install mxnet==1.9.1 numpy==1.23.5 pillow
    /tmp/mxvenv/bin/python tests/data/recordio/make_recordio.py

insightface/: InsightFace's layout. Record 0 is the header (flag 2, label [first identity record, end)),
records 1..30 are 32x32 JPEGs of classes 0..5 (5 each; flag 0 float labels for even records, flag 2
[class, 0] for odd ones), records 31..37 are identities 0..6 labelled [start, end) of their images; class 6
is empty ([31, 31)). Record 7 (class 1) is a JPEG whose payload holds the magic word 0xced7230a at two
4-aligned offsets, so dmlc's writer splits it into three parts (continuation flags 1, 2, 3).
im2rec/: im2rec's layout (flag 0, one float label per image, no header), 24 images of classes 0..3 of
40x48 px written in a shuffled key order; key 105 is not an image (undecodable).
expected.json: for every record key, its class and the sha256 of its image bytes.
"""

import hashlib
import io
import json
import struct
from pathlib import Path

import mxnet as mx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MAGIC = struct.pack("<I", 0xCED7230A)


def jpeg(cls: int, k: int, size=(32, 32)) -> bytes:
    rng = np.random.default_rng(1000 * cls + k)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (cls + 1) % 256
    pixels = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def with_magic(data: bytes, payload_offset: int) -> bytes:
    """A JPEG with a comment segment (FF FE) right after SOI whose body holds MAGIC twice, each 4-aligned
    in the packed record (payload_offset: bytes before the image in the record)."""
    pad = (-(payload_offset + 6)) % 4  # SOI (2) + FF FE (2) + length (2), then pad to a 4-aligned start
    body = b"\x00" * pad + MAGIC + b"abcd" + MAGIC + b"efgh"
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + data[2:]


def insightface(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rec = mx.recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "w")
    classes, per_class, expected = 7, 5, {}
    images = [(c, k) for c in range(classes - 1) for k in range(per_class)]
    first_identity = 1 + len(images)
    rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [first_identity, first_identity + classes], 0, 0), b""))
    for key, (c, k) in enumerate(images, start=1):
        if key % 2 == 0:
            header, offset = mx.recordio.IRHeader(0, float(c), key, 0), 24
        else:
            header, offset = mx.recordio.IRHeader(0, [float(c), 0.0], key, 0), 24 + 8
        data = jpeg(c, k)
        if key == 7:
            data = with_magic(data, offset)
        packed = mx.recordio.pack(header, data)
        if key == 7:
            positions = [i for i in range(0, len(packed) - 3, 4) if packed[i : i + 4] == MAGIC]
            assert len(positions) == 2, positions
        rec.write_idx(key, packed)
        expected[key] = {"class": c, "sha256": hashlib.sha256(data).hexdigest()}
    for c in range(classes):
        start = 1 + per_class * c if c < classes - 1 else first_identity
        end = start + per_class if c < classes - 1 else first_identity
        rec.write_idx(first_identity + c, mx.recordio.pack(mx.recordio.IRHeader(0, [start, end], 0, 0), b""))
    rec.close()
    (out / "property").write_text(f"{classes},32,32")
    return expected


def im2rec(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rec = mx.recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "w")
    expected = {}
    keys = np.random.default_rng(0).permutation(24) + 100
    for n, key in enumerate(keys.tolist()):
        c = n % 4
        data = b"this is not an image" if key == 105 else jpeg(c, n, size=(40, 48))
        rec.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(c), key, 0), data))
        expected[key] = {"class": c, "sha256": hashlib.sha256(data).hexdigest()}
    rec.close()
    return expected


if __name__ == "__main__":
    expected = {"insightface": insightface(HERE / "insightface"), "im2rec": im2rec(HERE / "im2rec")}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    # read back with MXNet: the files are what its reader accepts
    for name, table in expected.items():
        rec = mx.recordio.MXIndexedRecordIO(str(HERE / name / "train.idx"), str(HERE / name / "train.rec"), "r")
        for key, entry in table.items():
            header, data = mx.recordio.unpack(rec.read_idx(int(key)))
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (name, key)
    print("wrote", *(p.relative_to(HERE) for p in sorted(HERE.rglob("*")) if p.is_file()))
