import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_model import save_tiny_model

from facedist.inference import embed_paths
from facedist.inference_cli import compare_main, embed_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Identity tree: 3 people x 2 random images of varied sizes."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for person in ("ann", "bob", "cyd"):
        (root / person).mkdir()
        for k in range(2):
            size = rng.integers(40, 90, 2)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / person / f"{k}.png")
    return root


def _one_line_exit(argv, main):
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value.code)
    assert "\n" not in message and err.value.code != 0
    return message


def _cosine(tiny, a, b, flip=False):
    model, pre, _ = tiny
    vectors = embed_paths(model, [a, b], pre, flip=flip).vectors
    return float(vectors[0] @ vectors[1])


def test_compare_with_explicit_threshold(tiny, faces, capsys):
    _, _, file = tiny
    a, b = faces / "ann" / "0.png", faces / "bob" / "1.png"
    cosine = _cosine(tiny, a, b)
    for threshold, verdict in ((cosine - 0.01, "same person"), (cosine + 0.01, "different people")):
        compare_main(["--checkpoint", str(file.parent), str(a), str(b), "--threshold", str(threshold)])
        line = capsys.readouterr().out.strip()
        assert line.endswith(verdict) and f"cosine similarity {cosine:.4f}" in line


def test_compare_uses_stored_far_threshold_and_its_flip(tiny, faces, capsys):
    _, _, file = tiny
    a, b = faces / "ann" / "0.png", faces / "ann" / "1.png"
    cosine = _cosine(tiny, a, b, flip=True)
    (file.parent / "thresholds.json").write_text(
        json.dumps({"far": {"1e-03": cosine + 0.05, "1e-02": cosine - 0.05}, "flip": True, "source": "test"})
    )
    try:
        compare_main(["--checkpoint", str(file.parent.parent.parent), str(a), str(b)])  # the output_dir
        stored = file.parent / "thresholds.json"
        assert capsys.readouterr().out.strip().endswith(f"(FAR 1e-03 from {stored}): different people")
        compare_main(["--checkpoint", str(file), str(a), str(b), "--far", "0.01"])
        out = capsys.readouterr().out
        assert f"cosine similarity {cosine:.4f}" in out and out.strip().endswith("same person")
        message = _one_line_exit(["--checkpoint", str(file), str(a), str(b), "--far", "1e-6"], compare_main)
        assert "FAR 1e-06" in message and "1e-03" in message
    finally:
        (file.parent / "thresholds.json").unlink()


def test_compare_default_far_works_after_a_small_evaluation(tiny, faces, capsys):
    """Too few impostor pairs resolve no 1e-3 threshold: the default takes the smallest FAR that was resolved."""
    _, _, file = tiny
    a, b = faces / "ann" / "0.png", faces / "bob" / "0.png"
    stored = file.parent / "thresholds.json"
    stored.write_text(json.dumps({"far": {"1e-01": 0.2, "1e-02": 0.9}, "flip": False, "source": "test"}))
    try:
        compare_main(["--checkpoint", str(file), str(a), str(b)])
        assert "threshold 0.9000 (FAR 1e-02 from" in capsys.readouterr().out
    finally:
        stored.unlink()


def test_compare_bad_inputs_are_one_line(tiny, faces, tmp_path):
    _, _, file = tiny
    a = faces / "ann" / "0.png"
    assert "thresholds.json" in _one_line_exit(["--checkpoint", str(file), str(a), str(a)], compare_main)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x89PNG garbage")
    assert str(broken) in _one_line_exit(
        ["--checkpoint", str(file), str(a), str(broken), "--threshold", "0.3"], compare_main
    )
    assert "does not exist" in _one_line_exit(["--checkpoint", str(tmp_path / "nope"), str(a), str(a)], compare_main)


def test_compare_align_reports_image_without_face(tiny, tmp_path):
    pytest.importorskip("cv2")
    _, _, file = tiny
    blank = tmp_path / "wall.png"
    Image.new("RGB", (120, 120), (200, 200, 200)).save(blank)
    message = _one_line_exit(
        ["--checkpoint", str(file), str(blank), str(blank), "--threshold", "0.3", "--align"], compare_main
    )
    assert "no face found" in message and "wall.png" in message


def _read_embeddings(out: Path) -> tuple[list[str], list[bytes], list[str], np.ndarray]:
    """(path texts, path bytes, identities, embeddings) of a facedist-embed output, either format."""
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        assert set(table) == {"path", "path_bytes", "identity", "embedding"}
        return table["path"], table["path_bytes"], table["identity"], np.array(table["embedding"])
    with np.load(out) as data:  # no pickle needed: text and bytes arrays
        assert set(data.files) == {"embeddings", "identity", "path", "path_bytes"}
        return list(data["path"]), list(data["path_bytes"]), list(data["identity"]), data["embeddings"]


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_embed_writes_every_image_and_its_exact_file_name(tiny, faces, tmp_path, suffix):
    """A file name that is not UTF-8 (Linux allows any bytes) is written as text and recoverable byte for byte."""
    model, pre, file = tiny
    tree = tmp_path / "faces"
    shutil.copytree(faces, tree)
    odd_folder = os.fsdecode(bytes(tree) + b"/d\xe9sir\xe9")  # Latin-1 "désiré"
    os.mkdir(odd_folder)
    shutil.copy(faces / "ann" / "0.png", os.path.join(odd_folder, os.fsdecode(b"caf\xe9.png")))
    out = tmp_path / f"emb{suffix}"
    embed_main(["--checkpoint", str(file.parent), "--folder", str(tree), "--out", str(out), "--num-workers", "0"])
    texts, raw, identities, vectors = _read_embeddings(out)
    files = sorted(os.fsencode(p) for p in Path(tree).rglob("*.png"))
    assert sorted(raw) == files and len(files) == 7
    assert texts == [b.decode("utf-8", "replace") for b in raw]
    assert "d\ufffdsir\ufffd" in identities and f"{tree}/d\ufffdsir\ufffd/caf\ufffd.png" in texts
    assert identities == [Path(text).relative_to(tree).parts[0] for text in texts]
    expected = embed_paths(model, [os.fsdecode(b) for b in raw], pre).vectors  # os.fsdecode(path_bytes) opens it
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


@pytest.mark.integration
def test_embed_and_compare_flip_as_the_checkpoint_records_unless_told(faces, tmp_path, capsys):
    model, pre, file = save_tiny_model(tmp_path / "run", flip=True)  # trained with eval.flip=true
    paths = sorted(faces.rglob("*.png"))
    flipped, plain = (embed_paths(model, paths, pre, flip=flip).vectors for flip in (True, False))
    assert not np.allclose(flipped, plain, atol=1e-3)
    for args, expected in (([], flipped), (["--no-flip"], plain), (["--flip"], flipped)):
        out = tmp_path / f"emb{len(args)}{''.join(args)}.npz"
        embed_main(["--checkpoint", str(file), "--folder", str(faces), "--out", str(out), "--num-workers", "0", *args])
        with np.load(out) as data:
            order = [paths.index(Path(p)) for p in data["path"]]
            np.testing.assert_allclose(data["embeddings"], expected[order], atol=1e-6)
    for args, vectors in (([], flipped), (["--no-flip"], plain)):
        compare_main(["--checkpoint", str(file), str(paths[0]), str(paths[3]), "--threshold", "0.5", *args])
        assert f"cosine similarity {float(vectors[0] @ vectors[3]):.4f}" in capsys.readouterr().out


def test_embed_rejects_unknown_format(tiny, faces, tmp_path):
    _, _, file = tiny
    with pytest.raises(SystemExit) as err:
        embed_main(["--checkpoint", str(file), "--folder", str(faces), "--out", str(tmp_path / "e.csv")])
    assert err.value.code == 2 and not (tmp_path / "e.csv").exists()


@pytest.mark.integration
def test_console_script_exits_nonzero_with_one_line(tmp_path):
    script = Path(sys.executable).parent / "facedist-compare"
    if not script.exists():
        pytest.skip("facedist not installed with its console scripts (pip install -e .)")
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    done = subprocess.run([str(script), "--checkpoint", str(bogus), "a.png", "b.png"], capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and str(bogus) in done.stderr


def test_a_photo_embeds_like_its_png_shard(tiny, faces, tmp_path):
    """Non-square photos of other sizes: facedist-embed --folder preprocesses them as the shard builder does."""
    from facedist.data.index import ShardIndex
    from facedist.data.shards import BuildOptions, build
    from facedist.inference import ImageDataset, ShardImages, embed_dataset

    model, pre, file = tiny
    out = tmp_path / "emb.npz"
    embed_main(["--checkpoint", str(file), "--folder", str(faces), "--out", str(out), "--num-workers", "0"])
    with np.load(out) as data:
        from_folder = data["embeddings"]
    build(faces, tmp_path / "shards", BuildOptions(size=pre["image_size"], format="png"), progress=False)
    images = ShardImages(ShardIndex(tmp_path / "shards", "train"), pre["image_size"])
    from_shards = embed_dataset(model, ImageDataset(images, pre, names=images.names())).vectors
    assert len(from_shards) == len(from_folder) == 6
    distance = np.abs(from_shards[:, None, :] - from_folder[None, :, :]).max(axis=2)  # shard row x photo
    assert sorted(distance.argmin(axis=1).tolist()) == list(range(6))  # a one-to-one match ...
    assert distance.min(axis=1).max() < 1e-5  # ... within 1e-5


def _junk_tree(faces: Path, root: Path) -> dict[str, str]:
    """A copy of `faces` with four files that cannot be embedded; {file name: a word its reason must hold}."""
    shutil.copytree(faces, root)
    (root / "ann" / "notes.jpg").write_bytes(b"not an image at all")
    (root / "bob" / "empty.png").write_bytes(b"")
    cut = (faces / "cyd" / "0.png").read_bytes()
    (root / "cyd" / "cut.png").write_bytes(cut[: len(cut) // 2])
    Image.new("RGB", (1, 1)).save(root / "cyd" / "dot.png")
    return {"notes.jpg": "not an image", "empty.png": "zero-byte", "cut.png": "readable", "dot.png": "16 px"}


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_embed_writes_the_rest_and_lists_every_skipped_image(tiny, faces, tmp_path, capsys, suffix):
    _, _, file = tiny
    junk = _junk_tree(faces, tmp_path / "faces")
    out = tmp_path / f"emb{suffix}"
    argv = ["--checkpoint", str(file), "--folder", str(tmp_path / "faces"), "--out", str(out), "--num-workers", "0"]
    embed_main(argv)
    texts, *_ = _read_embeddings(out)
    assert sorted(Path(t).name for t in texts) == ["0.png", "0.png", "0.png", "1.png", "1.png", "1.png"]
    report = json.loads((tmp_path / f"emb{suffix}.skipped.json").read_text())
    assert report["images"] == 10 and report["embedded"] == 6
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == set(junk) and all(word in reasons[name] for name, word in junk.items())
    captured = capsys.readouterr()
    summary = captured.out.strip()
    assert "\n" not in summary and "6 embeddings" in summary and "4 images skipped" in summary
    assert "skipped.json" in summary
    assert "object at 0x" not in captured.out + captured.err + json.dumps(report)

    # --strict: one line, exit 1, nothing written (and the rerun without junk removes the stale list)
    out.unlink()
    message = _one_line_exit([*argv, "--strict"], embed_main)
    assert "4 of 10 images" in message and "--strict" in message and "object at 0x" not in message
    assert not out.exists()
    embed_main(["--checkpoint", str(file), "--folder", str(faces), "--out", str(out), "--num-workers", "0"])
    assert out.exists() and not (tmp_path / f"emb{suffix}.skipped.json").exists()


def test_compare_refuses_an_image_below_the_minimum_size(tiny, faces, tmp_path, capsys):
    _, _, file = tiny
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    argv = ["--checkpoint", str(file), str(faces / "ann" / "0.png"), str(dot), "--threshold", "0.3"]
    message = _one_line_exit(argv, compare_main)
    assert str(dot) in message and "1x1 px" in message and "16 px" in message
    assert compare_main([*argv, "--min-size", "0"]) == 0  # the user's call: then it is compared
    assert "cosine similarity" in capsys.readouterr().out


def test_embed_follows_linked_identity_folders_without_looping(tiny, faces, tmp_path):
    _, _, file = tiny
    tree = tmp_path / "linked"
    tree.mkdir()
    for person in ("ann", "bob", "cyd"):
        (tree / person).symlink_to(faces / person, target_is_directory=True)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "back").symlink_to(tree, target_is_directory=True)  # a link back up: must not loop
    (tree / "dee").symlink_to(tmp_path / "extra", target_is_directory=True)
    out = tmp_path / "emb.npz"
    embed_main(["--checkpoint", str(file), "--folder", str(tree), "--out", str(out), "--num-workers", "0"])
    texts, _, identities, _ = _read_embeddings(out)
    assert sorted(identities) == ["ann", "ann", "bob", "bob", "cyd", "cyd"]
    assert all(Path(t).resolve().parent.parent == faces.resolve() for t in texts)


def test_embed_with_no_usable_image_is_one_line_and_writes_no_embeddings(tiny, tmp_path):
    _, _, file = tiny
    (tmp_path / "faces" / "ann").mkdir(parents=True)
    (tmp_path / "faces" / "ann" / "notes.jpg").write_bytes(b"not an image")
    out = tmp_path / "emb.npz"
    argv = ["--checkpoint", str(file), "--folder", str(tmp_path / "faces"), "--out", str(out), "--num-workers", "0"]
    message = _one_line_exit(argv, embed_main)
    assert "none of the 1 images" in message and "emb.npz.skipped.json" in message and not out.exists()
    assert json.loads((tmp_path / "emb.npz.skipped.json").read_text())["skipped"][0]["reason"].startswith("not an")
