import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from PIL import Image
from tiny_model import save_tiny_model

from facedist.inference import ImageError, embed_paths, list_images, load_image, preprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _write_images(folder, count, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        path = folder / f"person{k % 3}" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_preprocess_scales_and_normalises(tiny):
    _, pre, _ = tiny
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    got = preprocess(Image.fromarray(pixels), pre)
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.array(pre["mean"])[:, None, None]) / np.array(pre["std"])[
        :, None, None
    ]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    grey = Image.fromarray(pixels[:50, :30, 0])  # other size, one channel: resized, made RGB
    assert preprocess(grey, pre).shape == (3, 64, 64)


def test_unreadable_image_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path in (bad, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    buffer = io.BytesIO()
    Image.new("L", (5, 4), 7).save(buffer, format="PNG")
    assert load_image(buffer.getvalue(), "encoded bytes").mode == "RGB"


def test_embed_paths_equals_model_on_preprocessed_batch(tiny, tmp_path):
    model, pre, _ = tiny
    paths = _write_images(tmp_path, 5)
    batch = torch.stack([preprocess(load_image(p), pre) for p in paths])
    with torch.no_grad():
        plain, mirrored = model(batch), model(batch.flip(-1))
    result = embed_paths(model, paths, pre, batch_size=2)
    np.testing.assert_allclose(result.vectors, F.normalize(plain, dim=1).numpy(), atol=1e-5)
    assert result.indices.tolist() == list(range(5)) and result.skipped == []
    flipped = embed_paths(model, paths, pre, batch_size=3, flip=True)
    np.testing.assert_allclose(flipped.vectors, F.normalize(plain + mirrored, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flipped.vectors, axis=1), 1.0, atol=1e-5)


def test_flip_tta_is_mirror_invariant(tiny, tmp_path):
    model, pre, _ = tiny
    original = _write_images(tmp_path, 1)[0]
    mirror = tmp_path / "mirror.png"
    Image.open(original).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
    vectors = embed_paths(model, [original, mirror], pre, flip=True).vectors
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    assert not np.allclose(*embed_paths(model, [original, mirror], pre).vectors, atol=1e-3)


def test_unreadable_image_in_batch_raises_naming_it(tiny, tmp_path):
    model, pre, _ = tiny
    paths = _write_images(tmp_path, 3)
    bad = tmp_path / "person0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        embed_paths(model, [paths[0], bad, paths[1]], pre)


def test_list_images_identities(tmp_path):
    paths = _write_images(tmp_path, 4)
    (tmp_path / "person0" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.JPG")
    found, identities = list_images(tmp_path)
    assert sorted(found) == sorted(paths + [tmp_path / "loose.JPG"])
    assert dict(zip(found, identities))[tmp_path / "loose.JPG"] == ""
    assert all(identity == path.parent.name for path, identity in zip(found, identities) if identity)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageError, match="not a directory"):
        list_images(tmp_path / "absent")


def _embed_on_rank(rank, world, model_file, paths, bad_paths):
    from facedist.checkpoint import load_embedding_model

    model, pre, _ = load_embedding_model(model_file)
    result = embed_paths(model, paths, pre, batch_size=2, flip=True)
    try:
        embed_paths(model, bad_paths, pre)
        error = None
    except ImageError as err:
        error = str(err)
    return result.vectors, result.indices, error


@pytest.mark.distributed
def test_distributed_embedding_equals_single_process(tiny, tmp_path):
    model, pre, model_file = tiny
    paths = _write_images(tmp_path, 7)  # 7 images on 3 ranks: uneven slices
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    reference = embed_paths(model, paths, pre, flip=True)
    for vectors, indices, error in run_distributed(_embed_on_rank, 3, model_file, paths, [paths[0], paths[1], bad]):
        np.testing.assert_allclose(vectors, reference.vectors, rtol=1e-5, atol=1e-6)
        assert indices.tolist() == list(range(7))
        assert error is not None and "bad.png" in error  # every rank raises, none hangs
