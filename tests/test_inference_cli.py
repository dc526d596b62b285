import json
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
    assert "no face found in" in message and "wall.png" in message


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_embed_writes_every_image_with_path_and_identity(tiny, faces, tmp_path, suffix):
    model, pre, file = tiny
    out = tmp_path / f"emb{suffix}"
    embed_main(["--checkpoint", str(file.parent), "--folder", str(faces), "--out", str(out), "--num-workers", "0"])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        assert set(table) == {"path", "identity", "embedding"}
        paths, identities, vectors = table["path"], table["identity"], np.array(table["embedding"])
    else:
        with np.load(out) as data:
            assert set(data.files) == {"embeddings", "identity", "path"}
            paths, identities, vectors = list(data["path"]), list(data["identity"]), data["embeddings"]
    assert sorted(paths) == sorted(str(p) for p in faces.rglob("*.png"))
    assert identities == [Path(p).parent.name for p in paths]
    np.testing.assert_allclose(vectors, embed_paths(model, [Path(p) for p in paths], pre).vectors, atol=1e-6)


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
