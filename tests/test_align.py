from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="face alignment needs opencv-python-headless (facedist[align])")

from facedist.align import TEMPLATE_FIVE_POINTS, FaceAligner, NoFaceError, similarity_transform  # noqa: E402
from facedist.inference import embed_paths  # noqa: E402

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
needs_orl = pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present at ../shared/data/orl_faces")


def _orl(step):
    return sorted(ORL.glob("s*/*.pgm"))[::step]


def test_similarity_transform_maps_points_and_keeps_shape():
    rng = np.random.default_rng(0)
    for _ in range(20):
        src, dst = rng.uniform(0, 200, (2, 2)), rng.uniform(0, 200, (2, 2))
        matrix = similarity_transform(src, dst)
        np.testing.assert_allclose([matrix[:, :2] @ p + matrix[:, 2] for p in src], dst, atol=1e-9)
        linear = matrix[:, :2]
        np.testing.assert_allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear), atol=1e-9)  # no shear


def test_image_without_face_is_reported():
    flat = Image.fromarray(np.random.default_rng(0).integers(90, 110, (120, 100), dtype=np.uint8))
    with pytest.raises(NoFaceError, match="no face found in flat.png"):
        FaceAligner().align(flat, "flat.png")


@needs_orl
def test_orl_faces_found_and_eyes_mostly_detected():
    aligner = FaceAligner(112)
    results = [aligner.align(Image.open(p), str(p)) for p in _orl(10)]  # 40 images, one per subject
    assert all(r.image.size == (112, 112) and r.image.mode == "RGB" for r in results)
    # measured on all 400: eyes in 88%; a much lower rate means the eye search broke
    assert np.mean([r.eyes_detected for r in results]) >= 0.75


@needs_orl
def test_eyes_follow_a_rotated_face():
    """Rotating a face by 12 degrees turns the detected eye line by the same angle (so alignment, which
    levels the eye line, undoes it); eyes estimated from the upright face box would not turn at all."""
    aligner = FaceAligner(112)
    errors = []
    for path in _orl(20):
        canvas = Image.new("L", (184, 224))  # room around the face, so rotation keeps it whole
        canvas.paste(Image.open(path).convert("L"), (46, 56))
        upright = aligner.align(canvas)
        turned = aligner.align(canvas.rotate(12, resample=Image.Resampling.BILINEAR))  # counter-clockwise
        if upright.eyes_detected and turned.eyes_detected:
            angle = [np.degrees(np.arctan2(*(e[1] - e[0])[::-1])) for e in (upright.eyes, turned.eyes)]
            errors.append(abs(angle[1] - angle[0] + 12))  # image y points down: -12 degrees
    assert len(errors) >= 10 and np.median(errors) < 3


@needs_orl
def test_embed_with_align_skips_and_reports_images_without_face(tmp_path):
    from tiny_model import save_tiny_model

    model, pre, _ = save_tiny_model(tmp_path / "model")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (100, 120), (128, 128, 128)).save(blank)
    face = _orl(400)[0]
    result = embed_paths(model, [face, blank], pre, align=True)
    assert result.indices.tolist() == [0] and result.vectors.shape == (1, 32)
    assert len(result.skipped) == 1 and "blank.png" in result.skipped[0]
    direct = embed_paths(model, [face], pre).vectors
    assert not np.allclose(result.vectors, direct, atol=1e-3)  # the aligned crop was embedded, not the raw image


@needs_orl
def test_shards_build_align_stores_aligned_crops_and_reports_images_without_a_face(tmp_path):
    import io
    import json
    import shutil

    from facedist.data.cli import main as shards_main
    from facedist.data.index import ShardIndex
    from facedist.data.shards import decode_rgb

    src = tmp_path / "src"
    for subject in ("s1", "s2"):
        shutil.copytree(ORL / subject, src / subject)
    flat = np.random.default_rng(0).integers(90, 110, (112, 92), dtype=np.uint8)
    Image.fromarray(flat).save(src / "s1" / "flat.png")
    out = tmp_path / "shards"
    assert (
        shards_main(
            ["build", str(src), str(out), "--align", "--size", "64", "--format", "png", "--workers", "1", "--quiet"]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_files"] == [{"path": "s1/flat.png", "reason": "no face found (--align)"}]
    index = ShardIndex(out, "train")
    assert index.num_samples == 20
    aligner = FaceAligner(64)
    for i in (0, 13):  # the stored image is the aligned crop of its source, not a centre square
        stored = Image.open(io.BytesIO(index.read_image_bytes(i)))
        source = sorted(p for p in src.glob("*/*.pgm"))[i]
        expected = aligner.align(decode_rgb(source.read_bytes()), str(source)).image
        assert stored.size == (64, 64)
        assert np.array_equal(np.asarray(stored), np.asarray(expected))


def test_five_point_alignment_undoes_a_similarity_transform():
    rng = np.random.default_rng(3)
    a = 0.7 * np.exp(0.3j)
    forward = np.array([[a.real, -a.imag, 12.0], [a.imag, a.real, 7.0]])
    landmarks = TEMPLATE_FIVE_POINTS @ forward[:, :2].T + forward[:, 2] + rng.normal(0, 0.01, (5, 2))

    def residual(matrix):
        return np.abs(landmarks @ matrix[:, :2].T + matrix[:, 2] - TEMPLATE_FIVE_POINTS).max()

    estimated = similarity_transform(landmarks, TEMPLATE_FIVE_POINTS)
    assert residual(estimated) < 0.05  # the 0.01-px landmark noise, scaled by 1 / 0.7
    # least squares over all 5 points: closer than the exact fit of the eyes alone
    assert residual(estimated) < residual(similarity_transform(landmarks[:2], TEMPLATE_FIVE_POINTS[:2]))
