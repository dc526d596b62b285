"""Shard builder: bad-input tree, exact accounting, determinism, kill-and-rerun, verify, webdataset, ORL."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facedist.data.shards as shards
from facedist.data import decode
from facedist.data.cli import main as cli_main
from facedist.data.folders import name_bytes
from facedist.data.index import ShardIndex
from facedist.data.shards import BuildOptions, ShardError, build, verify

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"


def _image_bytes(fmt: str, seed: int, mode: str = "RGB", size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory):
    """A tree with every bad-input case; returns (src, expected good relpaths, expected skip reasons)."""
    base = tmp_path_factory.mktemp("messy")
    src = base / "src"
    good, skipped = set(), {}

    def add_good(rel: str, data: bytes) -> None:
        _write(src / rel, data)
        good.add(rel)

    jpg = _image_bytes("JPEG", 1)
    add_good("alice/a.jpg", jpg)
    add_good("alice/b.png", _image_bytes("PNG", 2, mode="L"))  # greyscale
    add_good("alice/c.pgm", _image_bytes("PPM", 3, mode="L"))
    add_good("alice/d.webp", _image_bytes("WEBP", 4))
    add_good("alice/e.bmp", _image_bytes("BMP", 5))
    add_good("alice/f.tiff", _image_bytes("TIFF", 6))
    _write(src / "alice/z_copy.jpg", jpg)
    skipped["alice/z_copy.jpg"] = "duplicate of alice/a.jpg"
    png = _image_bytes("PNG", 7)
    _write(src / "alice/truncated.png", png[: len(png) * 6 // 10])
    skipped["alice/truncated.png"] = "truncated"
    broken = bytearray(png)
    broken[len(png) // 2 : len(png) // 2 + 40] = bytes(40)
    _write(src / "alice/corrupt.png", bytes(broken))
    skipped["alice/corrupt.png"] = "corrupt"
    _write(src / "alice/empty.jpg", b"")
    skipped["alice/empty.jpg"] = "zero-byte"
    for junk in ("notes.txt", "photo.info", "convert.log", ".a.jpg.swp", "Thumbs.db"):
        _write(src / "alice" / junk, b"not an image at all\n")
        skipped[f"alice/{junk}"] = "not an image"
    _write(src / "alice/nested/deep.jpg", _image_bytes("JPEG", 8))
    skipped["alice/nested/"] = "nested folder"
    os.symlink(src / "alice/a.jpg", src / "alice/link_same.jpg")  # a symlink to a file it already has
    skipped["alice/link_same.jpg"] = "duplicate of alice/a.jpg"
    os.symlink(src / "missing.jpg", src / "alice/dangling.jpg")
    skipped["alice/dangling.jpg"] = "broken symlink"
    os.mkfifo(src / "alice/pipe")
    skipped["alice/pipe"] = "special file"
    with open(os.path.join(os.fsencode(src / "alice"), b"bad\xffname.jpg"), "wb") as f:
        f.write(_image_bytes("JPEG", 9))
    skipped["alice/bad\ufffdname.jpg"] = "not valid UTF-8"

    outside = base / "outside"
    _write(outside / "elsewhere.png", _image_bytes("PNG", 10))
    os.symlink(outside / "elsewhere.png", src / "alice/linked.png")  # symlink to a new image: kept
    good.add("alice/linked.png")
    _write(base / "carol_real/1.jpg", _image_bytes("JPEG", 11))
    _write(base / "carol_real/2.jpg", _image_bytes("JPEG", 12))
    os.symlink(base / "carol_real", src / "carol", target_is_directory=True)  # symlinked identity folder
    good |= {"carol/1.jpg", "carol/2.jpg"}

    add_good("山田 太郎/写真 1.jpg", _image_bytes("JPEG", 13, size=(60, 30)))
    add_good("山田 太郎/写真 2.png", _image_bytes("PNG", 14, size=(30, 60)))
    add_good("bob/1.jpg", _image_bytes("JPEG", 15))
    add_good("bob/2.jpg", jpg)  # same bytes as alice/a.jpg: kept, reported across identities
    _write(src / "few/only.jpg", _image_bytes("JPEG", 16))
    skipped["few/only.jpg"] = "--min-images 2"
    (src / "empty_person").mkdir()
    _write(src / "stray.jpg", _image_bytes("JPEG", 17))
    skipped["stray.jpg"] = "not inside an identity folder"
    _write(src / ".hidden/x.jpg", _image_bytes("JPEG", 18))
    return src, good, skipped


@pytest.fixture(scope="module")
def messy_build(messy_tree, tmp_path_factory):
    src, _, _ = messy_tree
    out = tmp_path_factory.mktemp("messy_out") / "shards"
    options = BuildOptions(size=24, format="png", min_images=2, val_identities="1", seed=3)
    summary = build(src, out, options, workers=2, progress=False)
    return out, summary


def _read_samples(out: Path) -> dict[str, list[dict]]:
    """Per split, samples in tar order with their members, read with tarfile only."""
    result = {}
    for path in sorted(out.glob("*-*.tar")):
        split = path.name.split("-")[0]
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples = result.setdefault(split, [])
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return result


def test_every_good_image_in_exactly_one_shard(messy_tree, messy_build):
    _, good, _ = messy_tree
    out, summary = messy_build
    sources = [json.loads(s["json"])["source"] for samples in _read_samples(out).values() for s in samples]
    assert sorted(sources) == sorted(good)
    assert summary["images"] == len(good)
    metas = {json.loads(s["json"])["source"]: json.loads(s["json"]) for ss in _read_samples(out).values() for s in ss}
    assert metas["山田 太郎/写真 1.jpg"]["original_size"] == [60, 30]
    assert metas["山田 太郎/写真 2.png"]["original_size"] == [30, 60]


def test_every_bad_file_reported_with_reason(messy_tree, messy_build):
    _, _, skipped = messy_tree
    out, _ = messy_build
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    reasons = {r["path"]: r["reason"] for r in report["skipped_files"]}
    assert set(reasons) == set(skipped)
    for path, fragment in skipped.items():
        assert fragment in reasons[path], (path, reasons[path])
    identities = {r["identity"]: r["reason"] for r in report["skipped_identities"]}
    assert set(identities) == {"few", "empty_person", ".hidden"}
    assert report["cross_identity_duplicates"][0]["paths"] == ["alice/a.jpg", "bob/2.jpg"]


def test_manifest_counts_labels_and_splits(messy_tree, messy_build):
    out, _ = messy_build
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    samples = _read_samples(out)
    all_classes = []
    for split, meta in manifest["splits"].items():
        assert meta["classes"] == sorted(meta["classes"])
        labels = [int(s["cls"]) for s in samples[split]]
        assert labels == sorted(labels) and set(labels) == set(range(len(meta["classes"])))
        assert np.bincount(labels).tolist() == meta["images_per_class"]
        assert meta["num_samples"] == len(samples[split]) == sum(sh["samples"] for sh in meta["shards"])
        for s in samples[split]:
            assert json.loads(s["json"])["identity"] == meta["classes"][int(s["cls"])]
            image = Image.open(io.BytesIO(s["png"]))
            assert image.size == (24, 24) and image.mode == "RGB"
        all_classes += meta["classes"]
    assert sorted(all_classes) == sorted(["alice", "bob", "carol", "山田 太郎"])
    assert len(manifest["splits"]["val"]["classes"]) == 1 and "test" not in manifest["splits"]
    assert verify(out, progress=False) == []


def test_centre_crop_keeps_the_middle():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    square = np.asarray(shards.square_resize(Image.fromarray(wide), 10))
    assert square.shape == (10, 10, 3)
    assert np.all(square[..., 1] > 200) and np.all(square[..., 0] < 50) and np.all(square[..., 2] < 50)


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left red, right blue as stored
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=100)
    image = shards.decode_rgb(buffer.getvalue())
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[:15].mean((0, 1)), np.asarray(image)[25:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_byte_identical_for_one_and_two_workers(synth_tree, tmp_path):
    options = BuildOptions(size=32, format="jpg", max_samples=10, val_identities="0.25", test_identities="2", seed=5)
    build(synth_tree, tmp_path / "w1", options, workers=1, progress=False)
    build(synth_tree, tmp_path / "w2", options, workers=2, progress=False)
    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert len([n for n in one if n.endswith(".tar")]) >= 8
    assert one == two
    build(synth_tree, tmp_path / "w2", options, workers=2, progress=False)  # rerun on a finished build
    assert _files(tmp_path / "w2") == one


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from facedist.data.shards import BuildOptions, build
    from facedist.data.shards.tar import ShardWriter

    add, calls = ShardWriter.add, []
    def add_then_die(self, members):
        add(self, members)
        calls.append(1)
        if len(calls) == int(sys.argv[3]):  # mid-shard: finished shards, a temp file and .build.json left
            os.kill(os.getpid(), signal.SIGKILL)
    ShardWriter.add = add_then_die
    build(sys.argv[1], sys.argv[2], BuildOptions(size=32, max_samples=8, val_identities="3", seed=1), progress=False)
    """
)


def test_killed_build_reruns_to_identical_output(synth_tree, tmp_path):
    reference = tmp_path / "reference"
    options = BuildOptions(size=32, max_samples=8, val_identities="3", seed=1)
    build(synth_tree, reference, options, workers=1, progress=False)

    out = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(synth_tree), str(out), "21"])
    assert run.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and shards.BUILD_STATE in left
    assert any(name.endswith(shards.TMP_SUFFIX) for name in left)  # the shard being written
    first_inode = (out / "train-000000.tar").stat().st_ino

    build(synth_tree, out, options, workers=2, progress=False)
    assert _files(out) == _files(reference)
    assert (out / "train-000000.tar").stat().st_ino == first_inode  # finished shards were kept, not redone


def test_verify_names_the_bad_shard_and_sample(synth_tree, tmp_path, capsys):
    out = tmp_path / "out"
    build(synth_tree, out, BuildOptions(size=32, max_samples=16), workers=1, progress=False)
    assert cli_main(["verify", str(out), "--quiet"]) == 0

    index = ShardIndex(out, "train")
    row = index._rows[20]
    shard = out / f"train-{int(row['shard']):06d}.tar"
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]) + 2 : int(row["offset"]) + int(row["size"])] = bytes(int(row["size"]) - 2)
    shard.write_bytes(bytes(data))
    assert any(shard.name in p and "sha256" in p for p in verify(out, progress=False))

    manifest = json.loads((out / "manifest.json").read_text())  # checksum made to match: decoding must catch it
    manifest["splits"]["train"]["shards"][int(row["shard"])]["sha256"] = shards.file_sha256(shard)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["verify", str(out), "--quiet"]) == 1
    assert f"{shard.name}: sample train_{20:09d}: image does not decode" in capsys.readouterr().err


def test_clear_errors(synth_tree, tmp_path, capsys):
    assert cli_main(["build", str(tmp_path / "nope"), str(tmp_path / "o1"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err

    flat = tmp_path / "flat"
    _write(flat / "a.jpg", _image_bytes("JPEG", 1))
    assert cli_main(["build", str(flat), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no identity folders" in capsys.readouterr().err

    out = tmp_path / "o3"
    assert cli_main(["build", str(synth_tree), str(out), "--size", "16", "--quiet", "--workers", "1"]) == 0
    assert cli_main(["build", str(synth_tree), str(out), "--size", "24", "--quiet", "--workers", "1"]) == 2
    assert "already holds a different dataset" in capsys.readouterr().err

    foreign = tmp_path / "o4"
    _write(foreign / "thesis.pdf", b"%PDF")
    with pytest.raises(ShardError, match="not empty"):
        build(synth_tree, foreign, BuildOptions(), progress=False)
    with pytest.raises(ShardError, match="exceed the 16 usable identities"):
        build(synth_tree, tmp_path / "o5", BuildOptions(val_identities="10", test_identities="0.5"), progress=False)
    with pytest.raises(ShardError, match="--format 'gif'"):
        build(synth_tree, tmp_path / "o6", BuildOptions(format="gif"), progress=False)


def test_max_bytes_and_formats(synth_tree, tmp_path):
    for image_format in ("webp", "png"):
        out = tmp_path / image_format
        build(synth_tree, out, BuildOptions(size=32, format=image_format, max_bytes=20_000), progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        shard_list = manifest["splits"]["train"]["shards"]
        assert len(shard_list) > 1 and all(s["bytes"] <= 20_000 for s in shard_list)
        assert all(p.stat().st_size <= 20_000 for p in out.glob("*.tar"))
        assert verify(out, progress=False) == []


def test_webdataset_reads_the_shards(synth_shards):
    import webdataset as wds

    for split in ("train", "val"):
        index = ShardIndex(synth_shards, split)
        urls = sorted(str(p) for p in synth_shards.glob(f"{split}-*.tar"))
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
        samples = list(dataset)
        assert len(samples) == index.num_samples
        for i, sample in enumerate(samples):
            assert sample["__key__"] == f"{split}_{i:09d}"
            assert sample["cls"] == int(index.labels[i])
            assert sample["json"]["identity"] == index.class_names[sample["cls"]]
            assert sample["jpg"].size == (32, 32)


@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL faces not found at {ORL}")
def test_orl_faces(tmp_path):
    out = tmp_path / "orl"
    options = BuildOptions(size=64, val_identities="5", test_identities="0.125", seed=0)
    summary = build(ORL, out, options, workers=2, progress=False)
    expected = sorted(p.relative_to(ORL).as_posix() for p in ORL.glob("*/*.pgm"))
    assert summary["identities"] == {"train": 30, "val": 5, "test": 5}
    assert summary["images"] == len(expected) == 400
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(n == 10 for meta in manifest["splits"].values() for n in meta["images_per_class"])
    report = json.loads((out / "report.json").read_text())
    assert {r["path"] for r in report["skipped_files"]} == {p.name for p in ORL.iterdir() if p.is_file()}
    assert verify(out, progress=False) == []


def test_source_changed_during_build_is_an_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for n in range(2):
        _write(src / f"p{n}/a.png", _image_bytes("PNG", n))
    plan_then_edit = shards.builder.make_plan

    def edit_after_planning(*args, **kwargs):
        plan = plan_then_edit(*args, **kwargs)
        (src / "p1/a.png").write_bytes(_image_bytes("PNG", 99))
        return plan

    monkeypatch.setattr(shards.builder, "make_plan", edit_after_planning)
    with pytest.raises(ShardError, match="p1/a.png: changed since it was checked"):
        build(src, tmp_path / "out", BuildOptions(size=16), progress=False)
    with pytest.raises(ShardError, match="is inside SRC"):
        build(src, src / "shards", BuildOptions(size=16), progress=False)


def test_info_summarises_each_split(synth_shards, capsys):
    from conftest import SYNTH_IDENTITIES, SYNTH_IMAGES_PER_IDENTITY, SYNTH_VAL_IDENTITIES

    assert cli_main(["info", str(synth_shards)]) == 0
    text = capsys.readouterr().out
    train = SYNTH_IDENTITIES - SYNTH_VAL_IDENTITIES
    assert f"train: {train} identities, {train * SYNTH_IMAGES_PER_IDENTITY} images" in text
    assert f"val: {SYNTH_VAL_IDENTITIES} identities, {SYNTH_VAL_IDENTITIES * SYNTH_IMAGES_PER_IDENTITY} images" in text
    assert cli_main(["info", str(synth_shards / "nope")]) == 2


def test_build_where_no_image_survives_fails_in_one_line_without_manifest(synth_tree, tmp_path, capsys):
    src = tmp_path / "junk"
    png = _image_bytes("PNG", 1)
    for n in range(3):
        _write(src / f"p{n}/a.jpg", b"not an image at all\n")
        _write(src / f"p{n}/b.png", png[: len(png) // 2])
    out = tmp_path / "junk_out"
    assert cli_main(["build", str(src), str(out), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "none of the 6 files is a usable image (3 not an image, 3 truncated image)" in err
    assert str(out / "report.json") in err
    assert not (out / "manifest.json").exists() and verify_refuses(out)
    assert len(json.loads((out / "report.json").read_text())["skipped_files"]) == 6

    out = tmp_path / "too_few"
    args = ["build", str(synth_tree), str(out), "--size", "16", "--quiet", "--workers", "1"]
    assert cli_main([*args, "--min-images", "7"]) == 2
    assert "no identity has --min-images 7 usable images (the most any has is 6)" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert cli_main([*args, "--min-images", "6"]) == 0  # the failed build's report.json does not block OUT
    assert (out / "manifest.json").exists()


def verify_refuses(out: Path) -> bool:
    with pytest.raises(ShardError, match="not a finished facedist shard folder"):
        verify(out, progress=False)
    return True


def test_a_requested_split_that_rounds_to_no_identity_is_an_error(synth_tree, tmp_path):
    with pytest.raises(ShardError, match="--val-identities 0.01 gives no identity of the 16 usable ones"):
        build(synth_tree, tmp_path / "out", BuildOptions(size=16, val_identities="0.01"), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_disk_full_is_one_line_and_the_same_command_resumes(synth_tree, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    build(synth_tree, reference, BuildOptions(size=32, max_samples=8, val_identities="3", seed=1), progress=False)
    addfile, calls = tarfile.TarFile.addfile, []

    def addfile_until_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 40:  # mid-shard, after some shards are finished
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return addfile(self, *args, **kwargs)

    out = tmp_path / "full"
    command = ["build", str(synth_tree), str(out), "--size", "32", "--max-samples", "8", "--val-identities", "3"]
    command += ["--seed", "1", "--quiet", "--workers", "1"]
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_until_full)
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no space left for OUT {out}" in err and "run the same command again" in err
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and not any(name.endswith(shards.TMP_SUFFIX) for name in left)
    assert "train-000000.tar" in left  # finished shards stay

    monkeypatch.undo()
    assert cli_main(command) == 0
    assert _files(out) == _files(reference)


def _grey_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_16_bit_grey_is_scaled_by_its_bit_depth_like_its_8_bit_twin(tmp_path):
    eight = np.random.default_rng(0).integers(40, 200, (48, 40), dtype=np.uint8)  # not spanning 0..255
    for sixteen in (eight.astype(np.uint16) * 257, eight.astype(np.uint16) << 8):  # both usual widenings
        png16 = _grey_png(sixteen)
        assert Image.open(io.BytesIO(png16)).mode.startswith("I;16")
        assert np.array_equal(np.asarray(shards.decode_rgb(png16)), np.asarray(shards.decode_rgb(_grey_png(eight))))
        assert np.array_equal(decode.decode_rgb(png16), np.asarray(shards.decode_rgb(png16)))  # OpenCV agrees

    src = tmp_path / "src"
    _write(src / "a/eight.png", _grey_png(eight))
    _write(src / "b/sixteen.png", _grey_png(eight.astype(np.uint16) * 257))
    build(src, tmp_path / "out", BuildOptions(size=32, format="png"), progress=False)
    index = ShardIndex(tmp_path / "out", "train")
    assert index.read_image_bytes(0) == index.read_image_bytes(1)  # the same stored pixels


def test_images_below_min_size_are_reported(tmp_path, capsys):
    src = tmp_path / "src"
    _write(src / "a/ok.jpg", _image_bytes("JPEG", 1, size=(40, 30)))
    _write(src / "a/pixel.png", _image_bytes("PNG", 2, size=(1, 1)))
    _write(src / "a/strip.png", _image_bytes("PNG", 3, size=(200, 15)))
    out = tmp_path / "out"
    assert cli_main(["build", str(src), str(out), "--size", "16", "--quiet", "--workers", "1"]) == 0
    reasons = {r["path"]: r["reason"] for r in json.loads((out / "report.json").read_text())["skipped_files"]}
    assert reasons == {
        "a/pixel.png": "too small (1x1 px, shorter side < --min-size 16)",
        "a/strip.png": "too small (200x15 px, shorter side < --min-size 16)",
    }
    assert cli_main(["build", str(src), str(tmp_path / "o2"), "--size", "16", "--min-size", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "o2/report.json").read_text())["skipped_files"] == []
    with pytest.raises(ShardError, match="--min-size must be >= 1"):
        build(src, tmp_path / "o3", BuildOptions(min_size=0), progress=False)


def test_report_keeps_non_utf8_names_recoverable(tmp_path):
    src = tmp_path / "src"
    _write(src / "good/a.jpg", _image_bytes("JPEG", 1))
    raw_file, raw_folder = b"bad\xffname.jpg", b"caf\xe9"
    with open(os.path.join(os.fsencode(src / "good"), raw_file), "wb") as f:
        f.write(_image_bytes("JPEG", 2))
    os.makedirs(os.path.join(os.fsencode(src), raw_folder))
    with open(os.path.join(os.fsencode(src), raw_folder, b"x.jpg"), "wb") as f:
        f.write(_image_bytes("JPEG", 3))
    out = tmp_path / "out"
    build(src, out, BuildOptions(size=16), progress=False)
    report = json.loads((out / "report.json").read_bytes().decode("utf-8"))  # strict UTF-8
    (skipped_file,) = report["skipped_files"]
    assert skipped_file["path"] == "good/bad\ufffdname.jpg"
    assert os.path.isfile(os.path.join(os.fsencode(src), name_bytes(skipped_file)))
    assert name_bytes(skipped_file) == b"good/" + raw_file
    (skipped_folder,) = report["skipped_identities"]
    assert name_bytes(skipped_folder, "identity") == raw_folder


def test_identity_links_are_followed_and_loops_read_once(tmp_path):
    src = tmp_path / "src"
    _write(tmp_path / "real/1.jpg", _image_bytes("JPEG", 1))
    _write(tmp_path / "real/2.jpg", _image_bytes("JPEG", 2))
    src.mkdir()
    os.symlink(tmp_path / "real", src / "alice", target_is_directory=True)
    os.symlink(tmp_path / "real", src / "alice_again", target_is_directory=True)
    os.symlink(src, src / "loop", target_is_directory=True)
    out = tmp_path / "out"
    summary = build(src, out, BuildOptions(size=16), progress=False)
    assert summary["identities"] == {"train": 1} and summary["images"] == 2
    identities = {
        r["identity"]: r["reason"] for r in json.loads((out / "report.json").read_text())["skipped_identities"]
    }
    assert identities == {
        "alice_again": "same folder as identity 'alice'",
        "loop": "same folder as SRC itself (a symbolic-link loop)",
    }
