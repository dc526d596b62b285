"""IJB-B/C 1:1 on a generated IJB-style tree, against a direct numpy computation of the published protocol."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve
from tiny_model import save_tiny_model

from facedist.align import TEMPLATE_FIVE_POINTS
from facedist.evaluation import ijb
from facedist.evaluation.cli import main as eval_main
from facedist.inference import preprocess

LOOSE = 96  # side of the generated loose crops


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ijb_run"), image_size=32)


@pytest.fixture(scope="module")
def ijb_tree(tmp_path_factory):
    """6 subjects x 2 templates; 1-3 media a template, 1-3 faces a medium. Each face is the ArcFace template
    mapped into a 96-px loose crop by a random similarity `forward` (kept, for the reference alignment)."""
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(0)
    faces, points, forward, template = [], [], {}, 0
    subject_of = {}
    for subject in range(6):
        for _ in range(2):
            template += 1
            subject_of[template] = subject
            for medium in range(rng.integers(1, 4)):
                for _ in range(rng.integers(1, 4)):
                    name = f"{len(faces) + 1}.jpg"
                    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.6, 0.8)
                    a = scale * np.exp(1j * angle)
                    shift = rng.uniform(5, 20, 2)
                    matrix = np.array([[a.real, -a.imag, shift[0]], [a.imag, a.real, shift[1]]])
                    landmarks = TEMPLATE_FIVE_POINTS @ matrix[:, :2].T + matrix[:, 2]
                    pixels = (rng.integers(0, 255, (LOOSE, LOOSE, 3)) // 4 + 40 * subject).astype(np.uint8)
                    cv2.imwrite(str(root / "loose_crop" / name), pixels[..., ::-1])
                    forward[name] = matrix
                    faces.append(f"{name} {template} {100 * template + medium}")
                    points.append(
                        " ".join([name, *(f"{v:.6f}" for v in landmarks.ravel()), f"{rng.uniform(0.5, 1):.4f}"])
                    )
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    pairs = [f"{t1} {t2} {int(subject_of[t1] == subject_of[t2])}" for t1 in subject_of for t2 in subject_of if t1 < t2]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root, forward


def _reference(root, forward, model, pre):
    """The published protocol written out directly: align by the inverse of the known transform, image +
    flip (not normalised) x faceness, per-medium mean, sum over media, L2-normalise, dot product."""
    size = int(pre["image_size"])
    lines = [line.split() for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    ids = [line.split() for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    crops = []
    for name, *_ in lines:
        image = cv2.imread(str(root / "loose_crop" / name))[..., ::-1]
        inverse = cv2.invertAffineTransform(forward[name]) * (size / 112)
        crops.append(
            preprocess(
                Image.fromarray(cv2.warpAffine(np.ascontiguousarray(image), inverse, (size, size), borderValue=0.0)),
                pre,
            )
        )
    x = torch.stack(crops)
    with torch.no_grad():
        features = (model(x) + model(x.flip(-1))).double().numpy() * np.array([float(fields[-1]) for fields in lines])[
            :, None
        ]
    templates = np.array([int(i[1]) for i in ids])
    media = np.array([int(i[2]) for i in ids])
    template_features = {}
    for t in np.unique(templates):
        medium_means = [features[(templates == t) & (media == m)].mean(0) for m in np.unique(media[templates == t])]
        summed = np.sum(medium_means, axis=0)
        template_features[t] = summed / np.linalg.norm(summed)
    pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    scores = np.array([template_features[a] @ template_features[b] for a, b, _ in pairs])
    return pairs[:, 2], scores


@pytest.mark.integration
def test_ijb_protocol_equals_a_direct_numpy_computation(tiny, ijb_tree, tmp_path):
    model, pre, _ = tiny
    root, forward = ijb_tree
    labels, scores = _reference(root, forward, model, pre)
    metrics = ijb.evaluate_ijb(root, "IJBC", model, pre, tmp_path / "out", batch_size=64, chunk_faces=20)
    saved = np.load(tmp_path / "out" / "ijbc_scores.npz")
    np.testing.assert_allclose(saved["scores"], scores, atol=2e-5)
    assert saved["labels"].tolist() == labels.astype(bool).tolist()
    fpr, tpr, _ = roc_curve(labels, scores)
    for far, tar in metrics["tar_at_far_published"].items():
        assert tar == pytest.approx(tpr[int(np.argmin(np.abs(fpr - float(far))))])
    assert metrics["num_genuine"] == 6 and metrics["num_impostor"] == 60
    assert metrics["tar_at_far_facedist"]["1e-01"] is None  # 0.1 x 60 impostors < 10: not resolvable
    assert (tmp_path / "out" / "roc.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_templates"] == 12


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda root: (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 999 0\n"),
            "template 999 has no faces",
        ),
        (
            lambda root: (root / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n"),
            "line 1: 2 fields, expected 3",
        ),
        (lambda root: (root / "meta" / "ijbc_name_5pts_score.txt").unlink(), "not found"),
    ],
)
def test_broken_ijb_files_are_one_line(tiny, ijb_tree, tmp_path, edit, needle):
    import shutil

    root = tmp_path / "IJBC"
    shutil.copytree(ijb_tree[0], root)
    edit(root)
    with pytest.raises(SystemExit) as err:
        eval_main(
            ["--checkpoint", str(tiny[2]), "--ijb", str(root), "--ijb-name", "IJBC", "--out", str(tmp_path / "o")]
        )
    assert needle in str(err.value.code) and "\n" not in str(err.value.code)


def _ijb_on_rank(rank, world, model_file, root):
    from facedist.checkpoint import load_embedding_model

    model, pre, _ = load_embedding_model(model_file)
    return ijb.evaluate_ijb(root, "IJBC", model, pre, batch_size=64, chunk_faces=20)


@pytest.mark.distributed
@pytest.mark.slow
def test_faces_and_pairs_split_across_two_ranks_equal_one(tiny, ijb_tree):
    from dist_utils import run_distributed

    one = _ijb_on_rank(0, 1, tiny[2], ijb_tree[0])
    for metrics in run_distributed(_ijb_on_rank, 2, tiny[2], ijb_tree[0]):
        assert metrics["tar_at_far_published"] == pytest.approx(one["tar_at_far_published"])
        assert metrics["auc"] == pytest.approx(one["auc"], abs=1e-12)
        assert metrics["num_genuine"] + metrics["num_impostor"] == 66


def test_malformed_pair_file_names_file_and_line(ijb_tree, tmp_path):
    import shutil

    root = tmp_path / "IJBC"
    shutil.copytree(ijb_tree[0], root)
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3\n")
    with pytest.raises(ijb.IJBError, match="ijbc_template_pair_label.txt.*2"):
        ijb.read_meta(root, "IJBC")


ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"


@pytest.mark.integration  # ~10 s: the end-to-end evaluation
@pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present at ../shared/data/orl_faces")
def test_faces_without_landmarks_are_detected_on_their_loose_crop(tiny, ijb_tree, tmp_path):
    import shutil

    from facedist.align import FaceAligner
    from facedist.inference import load_image

    model, pre, _ = tiny
    root = tmp_path / "IJBC"
    shutil.copytree(ijb_tree[0], root)
    shutil.copy(ORL / "s1" / "1.pgm", root / "loose_crop" / "1.jpg")  # a real face (Pillow reads by content)
    points_file = root / "meta" / "ijbc_name_5pts_score.txt"
    rows = [line.split() for line in points_file.read_text().splitlines()]
    rows[0] = [rows[0][0], rows[0][-1]]  # no landmarks: `image faceness`
    rows[1][1:11] = ["nan"] * 10  # noise, nan landmarks: no face to find either
    rows[2][1:11] = ["0"] * 10  # all five at one point: no transform maps them
    points_file.write_text("\n".join(" ".join(row) for row in rows) + "\n")
    meta = ijb.read_meta(root, "IJBC")
    assert np.isnan(meta.landmarks[:3]).all() and np.isfinite(meta.landmarks[3:]).all()
    assert meta.faceness[0] == float(rows[0][1])

    faces = ijb.IJBFaces(root, meta, np.arange(4), pre)
    size = int(pre["image_size"])
    expected = preprocess(FaceAligner(size).align(load_image(root / "loose_crop" / "1.jpg")).image, pre)
    tensor, _, problem, _ = faces[0]
    assert problem == "" and torch.equal(tensor, expected)
    assert faces[1][2:] == ("no landmarks in the meta file and no face found", False)

    metrics = ijb.evaluate_ijb(root, "IJBC", model, pre, tmp_path / "out", batch_size=64, chunk_faces=20)
    assert metrics["faces_detected_for_missing_landmarks"] == 3
    assert [face["image"] for face in metrics["faces_left_out"]] == ["loose_crop/2.jpg", "loose_crop/3.jpg"]
    assert np.isfinite(np.load(tmp_path / "out" / "ijbc_scores.npz")["scores"]).all()
