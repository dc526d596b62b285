"""LFW-style pairs files both ways: `facedist-shards pairs` draws one, `facedist-shards bin` packs one into a .bin
that facedist's .bin reader (and facedist-eval --bin) reads; bad input is one line naming file and line."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facedist.data.cli import main as shards_main
from facedist.data.pairs import PairsError, pair_images, read_pairs
from facedist.evaluation import bins

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
needs_orl = pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present at ../shared/data/orl_faces")

# LFW's View 2 layout, written by hand: 2 folds of 3 same pairs then 3 different pairs, tab-separated
HAND_WRITTEN = """2\t3
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Akhmed_Zakayev\t2\t3
Abel_Pacheco\t1\tAkhmed_Zakayev\t2
Abel_Pacheco\t2\tJean_Lemounier\t1
Akhmed_Zakayev\t3\tJean_Lemounier\t1
Amber_Tamblyn\t1\t2
Anders_Ebbeson\t2\t3
Anders_Ebbeson\t1\t3
Amber_Tamblyn\t1\tAnders_Ebbeson\t1
Amber_Tamblyn\t2\tAnthony_Fauci\t2
Anders_Ebbeson\t3\tAnthony_Fauci\t1
"""
LFW_COUNTS = {
    "Abel_Pacheco": 4,
    "Akhmed_Zakayev": 3,
    "Jean_Lemounier": 1,
    "Amber_Tamblyn": 2,
    "Anders_Ebbeson": 3,
    "Anthony_Fauci": 2,
}


def _jpeg(seed: int, size=(40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def lfw(tmp_path):
    """An image folder in LFW's naming (DIR/Name/Name_0001.jpg) and the hand-written pairs file."""
    root = tmp_path / "lfw"
    for k, (name, count) in enumerate(LFW_COUNTS.items()):
        (root / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(_jpeg(10 * k + i))
    (tmp_path / "pairs.txt").write_text(HAND_WRITTEN)
    return root, tmp_path / "pairs.txt"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = shards_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_hand_written_pairs_file_is_read_as_published(lfw):
    _, pairs_file = lfw
    pairs, folds, per_fold = read_pairs(pairs_file)
    assert (folds, per_fold, len(pairs)) == (2, 3, 12)
    assert [p.same for p in pairs] == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert pairs[0].first == ("Abel_Pacheco", 1) and pairs[0].second == ("Abel_Pacheco", 4) and pairs[0].line == 2
    assert pairs[4].first == ("Abel_Pacheco", 2) and pairs[4].second == ("Jean_Lemounier", 1)


def test_eval_pairs_take_each_image_once_in_pair_order_and_read_lfw_view1_headers(lfw, tmp_path):
    """facedist-eval --pairs reads with the same reader: LFW's View 1 header `n` is one fold of n + n pairs."""
    view1 = tmp_path / "view1.txt"
    view1.write_text(
        "2\nAbel_Pacheco\t1\t4\nAkhmed_Zakayev 2 3\n\n"  # any whitespace, blank lines skipped
        "Abel_Pacheco\t1\tAkhmed_Zakayev\t2\nJean_Lemounier 1 Abel_Pacheco 4\n"
    )
    paths, identities, a, b, same = pair_images(view1, tmp_path / "lfw")
    stems = [
        "Abel_Pacheco_0001",
        "Abel_Pacheco_0004",
        "Akhmed_Zakayev_0002",
        "Akhmed_Zakayev_0003",
        "Jean_Lemounier_0001",
    ]
    assert [p.stem for p in paths] == stems
    assert identities == ["Abel_Pacheco", "Abel_Pacheco", "Akhmed_Zakayev", "Akhmed_Zakayev", "Jean_Lemounier"]
    assert [(paths[i].stem, paths[j].stem) for i, j in zip(a, b)] == [
        ("Abel_Pacheco_0001", "Abel_Pacheco_0004"),
        ("Akhmed_Zakayev_0002", "Akhmed_Zakayev_0003"),
        ("Abel_Pacheco_0001", "Akhmed_Zakayev_0002"),
        ("Jean_Lemounier_0001", "Abel_Pacheco_0004"),
    ]
    assert same.tolist() == [True, True, False, False]
    view1.write_text("1\nAbel_Pacheco\t1\t9\nAbel_Pacheco\t1\tAkhmed_Zakayev\t2\n")
    with pytest.raises(PairsError, match="view1.txt:2: no image Abel_Pacheco_0009"):
        pair_images(view1, tmp_path / "lfw")


def test_bin_packs_lfw_named_files_in_pair_order_for_the_existing_reader(lfw, tmp_path, capsys):
    root, pairs_file = lfw
    code, out, err = _run(capsys, "bin", "--pairs", pairs_file, "--images", root, tmp_path / "lfw.bin")
    assert code == 0, err
    assert "wrote 12 pairs" in out
    images, issame = bins.read_bin(tmp_path / "lfw.bin")
    expected = []
    for line in HAND_WRITTEN.splitlines()[1:]:
        fields = line.split("\t")
        named = [(fields[0], fields[1]), (fields[0], fields[2])] if len(fields) == 3 else [fields[:2], fields[2:]]
        expected += [(root / name / f"{name}_{int(i):04d}.jpg").read_bytes() for name, i in named]
    assert images == expected  # JPEG files stored byte for byte, two a pair, in pair order
    assert issame.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert bins.load_set(tmp_path / "lfw.bin").name == "lfw"


def test_facedist_eval_reads_what_bin_writes(lfw, tmp_path, capsys):
    from tiny_model import save_tiny_model

    from facedist.evaluation.cli import main as eval_main

    root, pairs_file = lfw
    assert _run(capsys, "bin", "--pairs", pairs_file, "--images", root, tmp_path / "lfw.bin")[0] == 0
    _, _, model_file = save_tiny_model(tmp_path / "model", image_size=32)
    args = ["--checkpoint", model_file, "--bin", tmp_path / "lfw.bin", "--out", tmp_path / "eval", "--num-workers", "0"]
    assert eval_main([str(a) for a in args]) == 0
    metrics = json.loads((tmp_path / "eval" / "lfw" / "metrics.json").read_text())
    assert metrics["num_pairs"] == 12 and len(metrics["fold_accuracies"]) == 10


def test_other_folders_use_the_ith_file_of_the_sorted_list(tmp_path, capsys):
    root = tmp_path / "photos"
    for name in ("ann", "bob"):
        (root / name).mkdir(parents=True)
        for k, stem in enumerate(("z_last", "a_first", "m_middle")):
            (root / name / f"{stem}.jpg").write_bytes(_jpeg(hash((name, k)) % 1000))
    (tmp_path / "pairs.txt").write_text("1\t1\nann\t1\t3\nann\t2\tbob\t3\n")
    assert _run(capsys, "bin", "--pairs", tmp_path / "pairs.txt", "--images", root, tmp_path / "s.bin")[0] == 0
    images, _ = bins.read_bin(tmp_path / "s.bin")
    order = [("ann", "a_first"), ("ann", "z_last"), ("ann", "m_middle"), ("bob", "z_last")]
    assert images == [(root / name / f"{stem}.jpg").read_bytes() for name, stem in order]


def test_pairs_draws_lfw_view2_folds_of_disjoint_identities(synth_tree, tmp_path, capsys):
    out = tmp_path / "pairs.txt"
    code, stdout, err = _run(capsys, "pairs", synth_tree, out, "--folds", "4", "--per-fold", "5", "--seed", "3")
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert lines[0] == "4\t5" and len(lines) == 1 + 4 * 10
    pairs, folds, per_fold = read_pairs(out)
    identities = [set() for _ in range(folds)]
    for k, pair in enumerate(pairs):
        fold = k // (2 * per_fold)
        assert pair.same == (k % (2 * per_fold) < per_fold)
        identities[fold] |= {pair.first[0], pair.second[0]}
        assert all(1 <= number <= 6 for number in (pair.first[1], pair.second[1]))  # 6 images an identity
        assert pair.first != pair.second
    for a in range(folds):
        for b in range(a + 1, folds):
            assert not identities[a] & identities[b]  # as in LFW's View 2
        fold_pairs = [(p.first, p.second) for p in pairs[a * 10 : (a + 1) * 10]]
        assert len(set(fold_pairs)) == 10  # no pair twice in a fold
    again = tmp_path / "again.txt"
    assert _run(capsys, "pairs", synth_tree, again, "--folds", "4", "--per-fold", "5", "--seed", "3")[0] == 0
    assert again.read_text() == out.read_text()
    # and they pack: the synthetic tree's files by sorted position
    assert _run(capsys, "bin", "--pairs", out, "--images", synth_tree, tmp_path / "synth.bin")[0] == 0
    assert bins.read_bin(tmp_path / "synth.bin")[1].sum() == 20


def test_more_folds_than_the_identities_allow_is_one_line_and_no_file(synth_tree, tmp_path, capsys):
    out = tmp_path / "pairs.txt"
    code, _, err = _run(capsys, "pairs", synth_tree, out, "--folds", "20", "--per-fold", "5")
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "fold" in err and str(synth_tree) in err and "--per-fold 5" in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ("10 300 extra\n", "pairs.txt:1: the header must be 'folds per_fold'"),
        ("two\t1\nAbel_Pacheco\t1\t2\nAbel_Pacheco\t1\tAmber_Tamblyn\t1\n", "pairs.txt:1: the header"),
        ("1\t2\nAbel_Pacheco\t1\t2\n", "1 pair lines, but the header '1 2' says 4"),
        ("1\t1\nAbel_Pacheco\t1\tAmber_Tamblyn\t1\nAbel_Pacheco\t1\t2\n", "pairs.txt:2: expected 'name i j'"),
        ("1\t1\nAbel_Pacheco\t1\tx\nAbel_Pacheco\t1\tAmber_Tamblyn\t1\n", "pairs.txt:2: image number 'x'"),
        ("1\t1\nNo_One\t1\t2\nAbel_Pacheco\t1\tAmber_Tamblyn\t1\n", "pairs.txt:2: no identity 'No_One'"),
        ("1\t1\nAbel_Pacheco\t1\t7\nAbel_Pacheco\t1\tAmber_Tamblyn\t1\n", "pairs.txt:2: no image Abel_Pacheco_0007"),
        ("1\t1\nAbel_Pacheco\t1\t2\nAbel_Pacheco\t1\tAbel_Pacheco\t3\n", "pairs.txt:3: a different pair names"),
    ],
)
def test_bad_pairs_files_are_one_line_naming_file_and_line(lfw, tmp_path, capsys, content, needle):
    root, pairs_file = lfw
    pairs_file.write_text(content)
    code, _, err = _run(capsys, "bin", "--pairs", pairs_file, "--images", root, tmp_path / "out.bin")
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.bin").exists() and not list(tmp_path.glob(".out.bin*"))


def test_unreadable_photo_names_the_pair_and_skip_missing_drops_it(lfw, tmp_path, capsys):
    root, pairs_file = lfw
    (root / "Akhmed_Zakayev" / "Akhmed_Zakayev_0003.jpg").write_bytes(b"not a jpeg")
    code, _, err = _run(capsys, "bin", "--pairs", pairs_file, "--images", root, tmp_path / "out.bin")
    assert code == 2 and "pairs.txt:3:" in err and "Akhmed_Zakayev_0003.jpg" in err and err.count("\n") == 1
    assert not (tmp_path / "out.bin").exists()
    code, out, err = _run(
        capsys, "bin", "--pairs", pairs_file, "--images", root, tmp_path / "out.bin", "--skip-missing"
    )
    assert code == 0 and "wrote 9 pairs" in out and "3 dropped" in out  # lines 3, 4 and 7 use image 3
    assert [line.split(": ")[1] for line in err.splitlines()] == [f"dropped {pairs_file}:{n}" for n in (3, 4, 7)]
    assert len(bins.read_bin(tmp_path / "out.bin")[1]) == 9


@needs_orl
def test_bin_align_stores_crops_and_reports_a_photo_without_a_face(tmp_path, capsys):
    root = tmp_path / "faces"
    for subject in ("s1", "s2"):
        shutil.copytree(ORL / subject, root / subject)
    # sorted order of s1: 1.pgm, 10.pgm, 2.pgm, ...: "zz_flat.png" is its 11th file
    Image.fromarray(np.full((112, 92), 100, np.uint8)).save(root / "s1" / "zz_flat.png")
    (tmp_path / "pairs.txt").write_text("1\t2\ns1\t1\t2\ns1\t3\t11\ns1\t1\ts2\t1\ns1\t4\ts2\t2\n")
    argv = ["bin", "--pairs", tmp_path / "pairs.txt", "--images", root, tmp_path / "orl.bin", "--align", "--size", "64"]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "pairs.txt:3: no face found in" in err and "zz_flat.png" in err
    code, out, err = _run(capsys, *argv, "--skip-missing")
    assert code == 0 and "wrote 3 pairs" in out
    images, issame = bins.read_bin(tmp_path / "orl.bin")
    assert issame.tolist() == [True, False, False]
    assert {Image.open(io.BytesIO(data)).size for data in images} == {(64, 64)}
