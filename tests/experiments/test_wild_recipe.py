"""The in-the-wild recipe search's helpers: identity splits (splits.py), the table and its acceptance check
(wild_table.py), and the article recipes run_recipes.sh reads from the relit-ORL search."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facedist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "launch" / "experiments" / "wild_recipe"
sys.path.insert(0, str(HERE))
from splits import assign, write_splits  # noqa: E402

NAMES = [f"{i:05d}" for i in range(40)]


def test_splits_keep_test_identities_apart_and_dev_inside_both_trainings():
    splits = assign(NAMES, seed=3, test=10, dev_test=5)
    a, b, dev, dev2 = (splits[s] for s in ("A", "B", "dev", "dev2"))
    assert len(a["test"]) == len(b["test"]) == 10 and not set(a["test"]) & set(b["test"])
    for split in (a, b):
        assert not set(split["train"]) & set(split["test"]) and len(split["train"]) + 10 == len(NAMES)
    assert set(a["train"]) == set(b["test"]) | set(dev["train"]) | set(dev["test"])
    for choose in (dev, dev2):  # the dev splits never see a test identity of A or B, and sit inside both trainings
        seen = set(choose["train"]) | set(choose["test"])
        assert not seen & (set(a["test"]) | set(b["test"])) and seen <= set(a["train"]) & set(b["train"])
        assert len(choose["test"]) == 5 and not set(choose["train"]) & set(choose["test"])
    assert not set(dev["test"]) & set(dev2["test"])
    assert assign(list(reversed(NAMES)), seed=3, test=10, dev_test=5) == splits  # order of listing does not matter
    assert assign(NAMES, seed=4, test=10, dev_test=5)["A"]["test"] != a["test"]


def test_splits_refuse_too_few_identities():
    with pytest.raises(ValueError, match="40 identities cannot make two test sets of 15"):
        assign(NAMES, seed=0, test=15, dev_test=5)


def test_write_splits_links_folders_once_and_refuses_other_splits(tmp_path):
    src = tmp_path / "src"
    for name in NAMES:
        (src / name).mkdir(parents=True)
        (src / name / "a.jpg").write_bytes(b"x")
    out = tmp_path / "splits"
    splits = assign(NAMES, seed=0, test=10, dev_test=5)
    assert write_splits(src, out, splits)
    link = out / "A" / "test" / splits["A"]["test"][0]
    assert link.is_symlink() and (link / "a.jpg").read_bytes() == b"x"
    assert json.loads((out / "splits.json").read_text()) == splits
    assert not write_splits(src, out, splits)  # the same splits again: kept
    with pytest.raises(ValueError, match="already holds other splits"):
        write_splits(src, out, assign(NAMES, seed=1, test=10, dev_test=5))


def test_splits_cli_missing_source_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HERE / "splits.py"), str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.strip() == f"{tmp_path / 'nowhere'}: no such folder of identities"
    assert not (tmp_path / "out").exists()


def _runs(out: Path, split: str, name: str, aucs: list[float], tars: list[float]) -> None:
    for seed, (auc, tar) in enumerate(zip(aucs, tars)):
        run = out / split / name / f"seed{seed}"
        run.mkdir(parents=True, exist_ok=True)
        scores = {"auc": auc, "tar@far=1e-3": tar, "rank1": 0.5, "pairs_accuracy": 0.7 + seed / 100}
        (run / "test.json").write_text(json.dumps(scores))


def _table(out: Path) -> str:
    names = ["faces_wild", "the candidate", "triplet_adamw_cosine", "the article's recipe"]
    command = [sys.executable, str(HERE / "wild_table.py"), str(out), *names]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def test_table_mean_std_rows_and_acceptance(tmp_path):
    out = tmp_path / "wild"
    # A: AUC gain 0.06 against a std of 0.01, TAR gain 0.01 against none: both beat; B too
    _runs(out, "A", "faces_wild", [0.90, 0.91, 0.92], [0.10, 0.10, 0.10])
    _runs(out, "A", "triplet_adamw_cosine", [0.85, 0.85, 0.85], [0.09, 0.09, 0.09])
    _runs(out, "B", "faces_wild", [0.90, 0.90], [0.20, 0.20])
    _runs(out, "B", "triplet_adamw_cosine", [0.80, 0.80], [0.10, 0.10])
    _runs(out, "dev", "faces_wild", [0.5], [0.0])
    printed = _table(out)
    assert (
        "| faces_wild | A | 3 | 0.910 ± 0.010 | 0.100 ± 0.000 | 0.500 ± 0.000 | 0.710 ± 0.010 | the candidate |"
        in printed
    )
    assert "| faces_wild | dev | 1 | 0.500 | 0.000 | 0.500 | 0.700 | the candidate |" in printed
    split_a = next(line for line in printed.splitlines() if line.startswith("- split A"))
    assert "auc +0.060 vs 3 x std 0.030: beats; tar@far=1e-3 +0.010 vs 3 x std 0.000: beats" in split_a
    assert "Done when (both splits, both metrics): met" in printed
    _runs(out, "B", "faces_wild", [0.90, 0.90, 0.90], [0.20, 0.20, 0.0])  # a third seed spreads B's TAR
    printed = _table(out)
    assert "tar@far=1e-3 +0.033 vs 3 x std 0.346: does NOT beat" in printed
    assert "Done when (both splits, both metrics): NOT met" in printed


def test_table_acceptance_needs_two_seeds_on_both_splits(tmp_path):
    out = tmp_path / "wild"
    _runs(out, "A", "faces_wild", [0.9], [0.1])
    printed = _table(out)
    assert "- split A: needs 2+ seeds of faces_wild and triplet_adamw_cosine (has 1, 0)" in printed
    assert "NOT met" in printed


def test_run_recipes_keeps_finished_runs_in_results_and_trains_nothing_twice(tmp_path):
    data, out, results = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    (data / "A").mkdir(parents=True)
    (data / "A" / "manifest.json").write_text("{}")
    (data / "A.pairs.txt").write_text("10\t300\n")
    _runs(out, "A", "faces_wild", [0.9], [0.1])  # finished in runs/, not yet recorded
    (out / "A" / "faces_wild" / "seed0.log").write_text("facedist train: start\rtrain: 1/2 [00:01]\r\ntraining: 5 s\n")
    _runs(results, "A", "triplet_adamw_cosine", [0.8], [0.05])  # recorded by an earlier checkout, runs/ gone
    environment = {"SPLITS": "A", "SEEDS": "0", "ONLY": "faces_wild triplet_adamw_cosine"}
    environment |= {"DATA": str(data), "OUT": str(out), "RESULTS": str(results), "NICE": "0"}
    done = subprocess.run(
        ["bash", str(HERE / "run_recipes.sh")], env=os.environ | environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    record = results / "A" / "faces_wild" / "seed0"
    assert json.loads((record / "test.json").read_text())["auc"] == 0.9
    assert (record / "run.log").read_text() == "facedist train: start\ntraining: 5 s\n"  # no progress bars
    assert not (out / "A" / "triplet_adamw_cosine").exists()  # not trained again
    assert "| faces_wild | A | 1 | 0.900 |" in done.stdout and "| triplet_adamw_cosine | A | 1 | 0.800 |" in done.stdout


def _article_overrides() -> dict[str, str]:
    """$baseline and $adamw as run_recipes.sh reads them from the relit-ORL search."""
    script = "source <(sed -n '/^baseline=/,/^adamw=/p' launch/experiments/finetune_recipe/compare_recipes.sh)"
    printed = subprocess.run(
        ["bash", "-c", script + '; echo $baseline; echo "|"; echo $adamw'],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    baseline, adamw = printed.split("|")
    return {"$baseline": " ".join(baseline.split()), "$adamw": " ".join(adamw.split())}


def test_every_run_loads_and_the_article_recipe_is_the_relit_orl_one():
    article = _article_overrides()
    lines = [line for line in (HERE / "runs.tsv").read_text().splitlines() if not line.startswith("#")]
    loaded = {}
    for line in lines:
        name, round_, config, given, _what = line.split("\t")
        assert round_ in ("measure", "dev")
        words = [] if given == "-" else " ".join(article.get(word, word) for word in given.split()).split()
        loaded[name] = load_config(ROOT / config, words)
    adamw = loaded["triplet_adamw_cosine"]
    assert (adamw.loss.pair, adamw.loss.head, adamw.optim.name) == ("triplet", "none", "adamw_cosine")
    assert (adamw.data.classes_per_batch, adamw.data.images_per_class, adamw.data.augment.gamma) == (8, 4, 0)
    assert loaded["triplet_radam_sf"].optim.name == "radam_schedulefree"
    assert {"faces_wild", "faces_finetune", "triplet_adamw_cosine", "triplet_radam_sf"} <= set(loaded)


def test_candidate_config_spends_the_budget():
    cfg = load_config(ROOT / "configs" / "faces_wild.yaml")
    assert cfg.data.images_per_step() * cfg.train.max_steps == 38_400


def test_ensemble_scores_the_mean_cosine_and_refuses_other_photos():
    from ensemble import ensemble

    from facedist.evaluation.protocol import score

    rng = np.random.default_rng(0)
    identities = np.repeat([f"id{i}" for i in range(20)], 6)
    paths = np.array([f"{name}/{i % 6}.jpg" for i, name in enumerate(identities)])
    centres = rng.normal(size=(20, 16))[np.repeat(np.arange(20), 6)]
    noisy = [(centres + rng.normal(scale=2.0, size=centres.shape), identities, paths) for _ in range(2)]
    alone = [score(vectors, identities, paths)["auc"] for vectors, _, _ in noisy]
    together = ensemble(noisy)
    first_unit = noisy[0][0] / np.linalg.norm(noisy[0][0], axis=1, keepdims=True)
    second_unit = noisy[1][0] / np.linalg.norm(noisy[1][0], axis=1, keepdims=True)
    np.testing.assert_allclose(
        together @ together.T, (first_unit @ first_unit.T + second_unit @ second_unit.T) / 2, atol=1e-6
    )
    assert score(together, identities, paths)["auc"] > max(alone) + 0.01  # independent noise averages out
    with pytest.raises(ValueError, match="different photos"):
        ensemble([noisy[0], (noisy[1][0], identities, paths[::-1])])


def test_ensemble_cli_missing_file_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(HERE / "ensemble.py"), str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "a.npz" in result.stderr and "Traceback" not in result.stderr
