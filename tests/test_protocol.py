"""The recipe's test protocol: all-pairs verification and rank-1 with the first images by file name as gallery."""

import json
from pathlib import Path

import numpy as np
import pytest

from facedist.evaluation.metrics import verification_metrics
from facedist.evaluation.protocol import main, score


def _faces(identities=3, images=8, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    vectors, names, paths = [], [], []
    for i in range(identities):
        for j in range(images):
            vectors.append(centres[i] + 0.8 * rng.normal(size=dim))
            names.append(f"s{i}")
            paths.append(f"root/s{i}/{j:02d}.png")
    return np.asarray(vectors, dtype=np.float32), np.asarray(names), np.asarray(paths)


def test_scores_equal_facedists_metrics_whatever_the_row_order():
    vectors, names, paths = _faces()
    result = score(vectors, names, paths)
    labels = np.unique(names, return_inverse=True)[1]
    assert result["auc"] == pytest.approx(verification_metrics(vectors, labels)["auc"])
    assert result["probes"] == 3 * (8 - 5) and result["images"] == 24
    shuffled = np.random.default_rng(1).permutation(24)
    assert score(vectors[shuffled], names[shuffled], paths[shuffled]) == result


def test_gallery_is_each_identitys_first_images_by_file_name():
    vectors, names, paths = _faces(identities=2, images=6)  # gallery 5, one probe each
    renamed = np.array(
        [p.replace("/05.png", "/00a.png").replace("/00.png", "/05.png").replace("/00a.png", "/00.png") for p in paths]
    )
    vectors[[5, 11]] = -vectors[[0, 6]]  # the image named 05 (a probe) is the opposite of image 00
    assert score(vectors, names, paths, gallery=5)["rank1"] == 0.0  # both probes land on the other identity
    assert score(vectors, names, renamed, gallery=5)["rank1"] == 1.0  # renamed: enrolled, 00 is now the probe


def test_command_line_reads_facedist_embed_npz(tmp_path, capsys):
    vectors, names, paths = _faces()
    np.savez(tmp_path / "e.npz", embeddings=vectors, identity=names, path=paths)
    assert main([str(tmp_path / "e.npz"), "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "m.json").read_text()) and printed["identities"] == 3


def test_pairs_file_accuracy_over_the_same_embeddings_drops_pairs_without_one(tmp_path, capsys):
    """--pairs: the pairs file's images found as facedist-eval --pairs finds them (here the i-th file by name), scored
    with the embeddings already made; a pair naming an image left out of them (no face) is dropped and counted."""
    from facedist.evaluation.metrics import pair_list_metrics, pair_scores

    vectors, names, paths = _faces(images=4)
    paths = np.asarray([str(tmp_path / p) for p in paths])
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(b"")
    keep = np.arange(len(paths)) != 5  # s1/01.png: no embedding
    np.savez(tmp_path / "e.npz", embeddings=vectors[keep], identity=names[keep], path=paths[keep])
    pairs = "2 2\ns0 1 2\ns1 1 2\ns0 1 s1 3\ns1 4 s2 1\ns2 1 4\ns2 2 3\ns0 3 s2 4\ns1 1 s0 4\n"
    (tmp_path / "pairs.txt").write_text(pairs)
    argv = [str(tmp_path / "e.npz"), "--pairs", str(tmp_path / "pairs.txt"), "--images", str(tmp_path / "root")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = [(0, 1), (0, 6), (7, 8), (8, 11), (9, 10), (2, 11), (4, 3)]  # in the full list; s1's (4, 5) dropped
    a, b = (np.array(column) for column in zip(*rows))
    expected = pair_list_metrics(pair_scores(vectors, a, b), [True, False, False, True, True, False, False])
    assert printed["pairs"] == 7 and printed["pairs_dropped"] == 1
    assert printed["pairs_accuracy"] == pytest.approx(expected["accuracy_kfold"]["mean"]), printed
    assert 0 < printed["pairs_accuracy"] < 1, printed  # a value a wrong pairing would move
    (tmp_path / "pairs.txt").write_text("2 2\ns0 1 9\n")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "pairs.txt" in capsys.readouterr().err
