"""MXNet indexed RecordIO -> shards, against reference files written by the real MXNet (tests/data/recordio)."""

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from facedist.data import recordio
from facedist.data.cli import main as shards_main
from facedist.data.index import ShardIndex
from facedist.data.shards import BuildOptions, build, verify

DATA = Path(__file__).resolve().parent / "data" / "recordio"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def _frames(rec: Path) -> list[int]:
    data, flags, at = rec.read_bytes(), [], 0
    while at < len(data):
        magic, word = struct.unpack_from("<II", data, at)
        assert magic == recordio.MAGIC
        flags.append(word >> 29)
        at += 8 + (((word & ((1 << 29) - 1)) + 3) & ~3)
    return flags


@pytest.mark.parametrize("layout", ["insightface", "im2rec"])
def test_every_record_reads_back_with_mxnets_labels_and_bytes(layout):
    scan = recordio.scan_recordio(DATA / layout)
    assert scan.layout == layout
    seen = {}
    for name, entries in scan.identities.items():
        for key, offset in entries:
            image = recordio.read_image(str(scan.rec), offset, key)
            seen[str(key)] = {"class": int(name), "sha256": hashlib.sha256(image).hexdigest()}
    expected = EXPECTED[layout]
    assert seen == expected
    assert all(name == f"{int(name):08d}" for name in scan.identities)


def test_a_payload_with_the_magic_word_is_split_by_mxnet_and_joined_again():
    assert [1, 2, 3] == [f for f in _frames(DATA / "insightface" / "train.rec") if f][:3]  # the fixture has it
    offsets = dict(recordio.read_idx(DATA / "insightface" / "train.idx", 1 << 30))
    image = recordio.read_image(str(DATA / "insightface" / "train.rec"), offsets[7], 7)
    assert image.count(struct.pack("<I", recordio.MAGIC)) == 2
    assert hashlib.sha256(image).hexdigest() == EXPECTED["insightface"]["7"]["sha256"]


def _meta(out: Path, split: str):
    """(identity, source, image bytes) of every sample of a split, through the index (one pread each)."""
    index = ShardIndex(out, split)
    manifest = json.loads((out / "manifest.json").read_text())
    classes = manifest["splits"][split]["classes"]
    return [(classes[index.labels[i]], index.read_image_bytes(i)) for i in range(index.num_samples)]


def test_insightface_layout_builds_with_byte_copies(tmp_path):
    out = tmp_path / "out"
    summary = build(
        DATA / "insightface",
        out,
        BuildOptions(size=32, format="jpg", val_identities="1", max_samples=8),
        progress=False,
    )
    assert summary["images"] == 30 and summary["identities"] == {"train": 5, "val": 1}
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_identities"] == [{"identity": "00000006", "reason": "empty identity (record 37: [31, 31))"}]
    by_sha = {v["sha256"]: v["class"] for v in EXPECTED["insightface"].values()}
    samples = _meta(out, "train") + _meta(out, "val")
    assert len(samples) == 30
    for identity, image in samples:  # no re-encode: the stored bytes are MXNet's, under the right identity
        assert by_sha[hashlib.sha256(image).hexdigest()] == int(identity)
    assert verify(out, progress=False) == []


def test_im2rec_layout_reencodes_and_reports_the_undecodable_record(tmp_path):
    out = tmp_path / "out"
    build(
        DATA / "im2rec" / "train.rec", out, BuildOptions(size=32, format="png"), progress=False
    )  # the .rec file as SRC
    report = json.loads((out / "report.json").read_text())
    assert [r["path"] for r in report["skipped_files"]] == ["train.rec#105"]
    assert "not an image" in report["skipped_files"][0]["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["classes"] == ["00000000", "00000001", "00000002", "00000003"]
    expected_counts = np.bincount([v["class"] for k, v in EXPECTED["im2rec"].items() if k != "105"])
    assert manifest["splits"]["train"]["images_per_class"] == expected_counts.tolist()
    assert verify(out, progress=False) == []


def test_build_is_deterministic_and_resumes(tmp_path):
    options = BuildOptions(size=24, format="jpg", val_identities="2", max_samples=6)
    build(DATA / "insightface", tmp_path / "a", options, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").unlink()  # as if killed after two train shards
    (tmp_path / "b" / ".build.json").write_text(json.dumps({"build_fingerprint": manifest["build_fingerprint"]}))
    for name in files:
        if name.startswith("train-00000") and name > "train-000001.tar":
            (tmp_path / "b" / name).unlink()
    build(DATA / "insightface", tmp_path / "b", options, progress=False)
    build(DATA / "insightface", tmp_path / "c", options, workers=2, progress=False)
    for name in files:
        for other in ("b", "c"):
            if name != "manifest.json" or other == "c":
                assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (other, name)


def _broken(tmp_path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(DATA / "insightface", src)
    edit(src)
    return src


def _truncate(src):
    data = (src / "train.rec").read_bytes()
    (src / "train.rec").write_bytes(data[: len(data) - 40])


def _bad_magic(src):
    offsets = dict(recordio.read_idx(src / "train.idx", 1 << 30))
    data = bytearray((src / "train.rec").read_bytes())
    data[offsets[12]] ^= 0xFF
    (src / "train.rec").write_bytes(bytes(data))


def _past_end(src):
    (src / "train.idx").write_text((src / "train.idx").read_text() + "99\t99999999\n")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_truncate, "past the end"),  # the last records' offsets now lie beyond the file
        (lambda src: (src / "train.rec").write_bytes((src / "train.rec").read_bytes()[:-3]), "truncated"),
        (_bad_magic, "bad magic"),
        (_past_end, "key 99 at offset 99999999 is past the end"),
        (lambda src: (src / "train.idx").unlink(), "train.idx not found"),
        (lambda src: (src / "train.idx").write_text("0\t0\nseven\n"), "line 2: expected 'key<TAB>offset'"),
    ],
)
def test_broken_recordio_is_one_clear_error_and_leaves_nothing_looking_valid(tmp_path, capsys, edit, needle):
    src = _broken(tmp_path, edit)
    out = tmp_path / "out"
    assert shards_main(["build", str(src), str(out), "--size", "32", "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("layout", ["insightface", "im2rec"])
def test_facedist_frames_records_byte_for_byte_as_mxnet(layout):
    rec = DATA / layout / "train.rec"
    fd = os.open(rec, os.O_RDONLY)
    try:
        framed = b"".join(
            recordio.frame(recordio.read_record(fd, offset, str(key)))
            for key, offset in recordio.read_idx(rec.with_suffix(".idx"), rec.stat().st_size)
        )
    finally:
        os.close(fd)
    assert framed == rec.read_bytes()
