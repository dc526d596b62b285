import json

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve

from facedist.evaluation.metrics import (
    FARS,
    _pair_from_index,
    balanced_pairs,
    cosine_scores,
    count_scores,
    far_key,
    kfold_accuracy,
    pair_list_metrics,
    pair_scores,
    quantise,
    roc_metrics,
    verification_metrics,
)


def _embeddings(n_ids=30, per_id=6, dim=8, signal=1.0, seed=0, round_to=None, duplicates=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = signal * centres[labels] + rng.normal(size=(len(labels), dim))
    if round_to:  # coarse values: many tied scores
        emb = np.round(emb * round_to) / round_to
    if duplicates:  # exact copies of other images: ties across genuine and impostor pairs
        emb[:duplicates] = emb[-duplicates:]
    return emb.astype(np.float32), labels


def _all_pair_scores(emb, labels):
    """The all-in-memory reference: one N x N matrix product, every pair i < j listed."""
    q = quantise(emb)
    scores = cosine_scores(q, q).numpy()
    i, j = np.triu_indices(len(labels), k=1)
    return scores[i, j], labels[i] == labels[j]


def _sklearn_reference(scores, same):
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    tar = {far_key(f): float(tpr[fpr <= f * (1 + 1e-12)].max()) for f in FARS}
    # the usual EER recipe: the root of 1 - FAR - TAR(FAR) on the interpolated ROC
    eer = brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-12)
    return roc_auc_score(same, scores), tar, eer


def _check_against_sklearn(m, scores, same):
    auc, tar, eer = _sklearn_reference(scores, same)
    assert m["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["eer"] == pytest.approx(eer, abs=1e-9)
    for key, value in m["tar_at_far"].items():
        if value is not None:
            assert value == tar[key], key


@pytest.mark.parametrize("signal, round_to, duplicates", [(1.0, None, 0), (0.3, None, 0), (1.0, 1, 0), (1.0, 2, 20)])
def test_all_pairs_metrics_match_sklearn(signal, round_to, duplicates):
    emb, labels = _embeddings(signal=signal, round_to=round_to, duplicates=duplicates)
    scores, same = _all_pair_scores(emb, labels)
    m = verification_metrics(emb, labels, chunk_size=16)
    assert m["num_genuine"] == same.sum() and m["num_impostor"] == (~same).sum()
    _check_against_sklearn(m, scores, same)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_tied_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    genuine = np.round(rng.normal(1.0, 1.0, 700), 1)  # rounded: ties within and across the two sets
    impostor = np.round(rng.normal(0.0, 1.0, 30_000), 1)
    m = roc_metrics(count_scores(genuine, impostor))
    scores, same = np.concatenate([genuine, impostor]), np.repeat([True, False], [700, 30_000])
    _check_against_sklearn(m, scores, same)
    assert m["tar_at_far"]["1e-03"] is not None and m["tar_at_far"]["1e-04"] is None


@pytest.mark.parametrize("chunk", [1, 3, 64, None, 100_000])
def test_chunked_equals_all_in_memory(chunk):
    emb, labels = _embeddings(round_to=2, duplicates=30)  # many exact ties
    scores, same = _all_pair_scores(emb, labels)
    reference = roc_metrics(count_scores(scores[same], scores[~same]))
    m = verification_metrics(emb, labels, chunk_size=chunk, histogram_bins=32)
    histogram = m.pop("score_histogram")
    assert m == reference
    edges = np.asarray(histogram["edges"])
    assert histogram["genuine"] == np.histogram(scores[same], edges)[0].tolist()
    assert histogram["impostor"] == np.histogram(scores[~same], edges)[0].tolist()


def test_torch_and_numpy_inputs_agree_and_labels_may_be_names():
    emb, labels = _embeddings(n_ids=12, per_id=4)
    names = np.array([f"person_{k}" for k in labels])
    shuffle = np.random.default_rng(0).permutation(len(labels))  # labels need not be sorted
    a = verification_metrics(emb, labels, chunk_size=5)
    b = verification_metrics(torch.from_numpy(emb[shuffle]), names[shuffle], chunk_size=7)
    assert a == b


def test_exact_cases():
    labels = np.repeat(np.arange(10), 3)
    perfect = np.eye(10, dtype=np.float32)[labels]  # same identity: cos 1, different: cos 0
    m = verification_metrics(perfect, labels)
    assert m["auc"] == 1.0 and m["eer"] == 0.0
    assert all(v == 1.0 for v in m["tar_at_far"].values() if v is not None)
    reversed_ = roc_metrics(count_scores(np.zeros(30), np.ones(400)))  # every impostor above every genuine
    assert reversed_["auc"] == 0.0 and reversed_["eer"] == 1.0 and reversed_["tar_at_far"]["1e-01"] == 0.0
    assert reversed_["thresholds_at_far"]["1e-01"] is None
    identical = np.ones((30, 3), dtype=np.float32)  # every score equal: no separation at all
    m = verification_metrics(identical, labels)
    assert m["auc"] == 0.5 and m["eer"] == 0.5
    rng = np.random.default_rng(0)  # same distribution, no ties: close to 0.5
    m = roc_metrics(count_scores(rng.normal(size=3000), rng.normal(size=30_000)))
    assert m["auc"] == pytest.approx(0.5, abs=0.02) and m["eer"] == pytest.approx(0.5, abs=0.03)


def test_tar_at_far_step_rule_by_hand():
    impostor = np.arange(100) / 100  # 0.00 ... 0.99
    genuine = np.array([0.3, 0.6, 0.89, 0.9, 0.95])
    m = roc_metrics(count_scores(genuine, impostor), fars=(1e-1,))
    # FAR 0.1 allows 10 of 100 impostors: t = 0.89 accepts 11 (score >= t); t = 0.9 accepts 10 -> TAR 2/5
    assert m["tar_at_far"]["1e-01"] == 0.4 and m["thresholds_at_far"]["1e-01"] == 0.9


def test_far_resolvable_only_with_ten_impostors():
    genuine = np.linspace(0.5, 1.0, 50)
    assert roc_metrics(count_scores(genuine, np.zeros(1000)), fars=(1e-2,))["tar_at_far"]["1e-02"] == 1.0
    m = roc_metrics(count_scores(genuine, np.zeros(999)), fars=(1e-2,))
    assert m["tar_at_far"]["1e-02"] is None and m["thresholds_at_far"]["1e-02"] is None
    emb, labels = _embeddings(n_ids=5, per_id=4)  # 190 pairs, 160 impostors: 1e-1 resolvable, 1e-2 not
    m = verification_metrics(emb, labels)
    assert m["tar_at_far"]["1e-01"] is not None
    assert all(m["tar_at_far"][far_key(f)] is None for f in FARS[1:])


def test_thresholds_give_the_reported_rates():
    emb, labels = _embeddings(n_ids=40, per_id=5)
    scores, same = _all_pair_scores(emb, labels)
    m = verification_metrics(emb, labels)
    for key in ("1e-01", "1e-02"):
        accepted = scores >= m["thresholds_at_far"][key]
        assert accepted[~same].sum() <= float(key) * (~same).sum()
        assert accepted[same].mean() == m["tar_at_far"][key]


def test_roc_curve_is_downsampled_and_monotone():
    emb, labels = _embeddings(n_ids=60, per_id=8)
    m = verification_metrics(emb, labels, roc_points=100)
    far, tar = np.array(m["roc"]["far"]), np.array(m["roc"]["tar"])
    assert len(far) <= 110 and far[0] == tar[0] == 0.0 and far[-1] == tar[-1] == 1.0
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all()


def test_bad_inputs_name_the_problem():
    emb, labels = _embeddings(n_ids=3, per_id=2)
    emb[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4"):
        verification_metrics(emb, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        verification_metrics(emb[:4], labels)
    with pytest.raises(ValueError, match="two or more images"):
        verification_metrics(np.eye(4), np.arange(4))
    with pytest.raises(ValueError, match="two identities"):
        verification_metrics(np.eye(4), np.zeros(4))


def test_pair_numbers_decode_to_every_pair_once():
    i, j = _pair_from_index(np.arange(45))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(*np.triu_indices(10, k=1)))
    big = np.array([2**40 + 12345, 2**45 - 1, 10**14 + 7])  # where float sqrt alone is off
    i, j = _pair_from_index(big)
    assert ((0 <= i) & (i < j)).all() and (j * (j - 1) // 2 + i == big).all()


def test_balanced_pairs_are_balanced_distinct_and_seeded():
    labels = np.repeat(np.arange(50), np.arange(50) % 5 + 1)  # uneven identities, some with one image
    a, b, same = balanced_pairs(labels, pairs_per_side=200, seed=3)
    assert same.sum() == 200 and (~same).sum() == 200
    assert ((labels[a] == labels[b]) == same).all() and (a != b).all()
    assert len({(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())}) == 400
    assert all(np.array_equal(x, y) for x, y in zip((a, b, same), balanced_pairs(labels, 200, seed=3)))
    assert not np.array_equal(a, balanced_pairs(labels, 200, seed=4)[0])
    few = np.array([0, 0, 1, 2, 3])  # one genuine pair only: one of each
    assert balanced_pairs(few)[2].tolist() in ([True, False], [False, True])


def test_kfold_accuracy_picks_the_best_training_threshold():
    rng = np.random.default_rng(0)
    same = np.tile(np.repeat([True, False], 30), 10)  # LFW layout: 10 folds of 30 + 30
    scores = np.round(np.where(same, rng.normal(1, 1, 600), rng.normal(-1, 1, 600)), 1)
    result = kfold_accuracy(scores, same)
    accuracies = []
    for fold in range(10):
        test = np.zeros(600, dtype=bool)
        test[fold * 60 : (fold + 1) * 60] = True
        # brute force over every candidate threshold: the best training accuracy is attained by some t
        candidates = np.unique(scores[~test])[::-1]  # ties: the highest threshold wins
        train_accuracy = [np.mean((scores[~test] >= t) == same[~test]) for t in candidates]
        best = candidates[int(np.argmax(train_accuracy))]
        accuracies.append(np.mean((scores[test] >= best) == same[test]))
    assert result["mean"] == pytest.approx(np.mean(accuracies)) and result["std"] == pytest.approx(np.std(accuracies))
    assert kfold_accuracy(np.r_[np.ones(20), np.zeros(20)], np.repeat([True, False], 20))["mean"] == 1.0


def test_pair_list_metrics_on_a_balanced_sample():
    emb, labels = _embeddings(n_ids=40, per_id=5, signal=1.5)
    a, b, same = balanced_pairs(labels, pairs_per_side=300)
    scores = pair_scores(emb, a, b)
    all_scores, all_same = _all_pair_scores(emb, labels)
    assert np.isin(scores, all_scores).all()  # the same exact scores as the all-pairs pass
    m = pair_list_metrics(scores, same)
    assert 0.6 < m["accuracy_kfold"]["mean"] <= 1.0 and 0.6 < m["average_precision"] <= 1.0
    assert m["num_pairs"] == 600 and m["num_same_pairs"] == 300
    with pytest.raises(ValueError, match="both"):
        pair_list_metrics(scores[same], same[same])


def test_eval_benchmark_prints_pairs_per_second(capsys):
    from facedist.benchmarks.eval import main

    assert main(["--sizes", "300,500", "--dim", "16", "--devices", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["pairs"] for r in report["results"]] == [300 * 299 // 2, 500 * 499 // 2]
    assert all(r["pairs_per_s"] > 0 and r["num_genuine"] == r["images"] * 9 // 2 for r in report["results"])
