import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from facedist.evaluation.identification import identification_metrics
from facedist.evaluation.metrics import kfold_accuracy, pair_scores, verification_metrics
from facedist.evaluation.report import evaluate_embeddings

STABLE_KEYS = {
    "auc",
    "eer",
    "tar_at_far",
    "thresholds_at_far",
    "num_genuine",
    "num_impostor",
    "accuracy_kfold",
    "average_precision",
    "cmc",
    "fnir_at_fpir",
}


def _embeddings(n_ids=40, per_id=5, dim=16, signal=1.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_ids), per_id)
    return (signal * rng.normal(size=(n_ids, dim))[labels] + rng.normal(size=(len(labels), dim))).astype(
        np.float32
    ), labels


@pytest.mark.integration
def test_report_writes_every_output(tmp_path):
    emb, labels = _embeddings()
    out = tmp_path / "report"
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        metrics = evaluate_embeddings(
            torch.from_numpy(emb), torch.from_numpy(labels), out_dir=out, tb_writer=writer, step=7, tsne=True
        )
    assert STABLE_KEYS <= metrics.keys()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for name in ("roc", "pr", "score_histogram", "tsne"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    # the report carries the underlying metrics unchanged
    verification = verification_metrics(emb, labels)
    assert metrics["auc"] == verification["auc"] and metrics["tar_at_far"] == verification["tar_at_far"]
    assert metrics["cmc"] == identification_metrics(emb, labels)["cmc"]
    assert metrics["num_images"] == 200 and metrics["num_identities"] == 40

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    auc = events.Scalars("eval/auc")
    assert [(e.step, e.value) for e in auc] == [(7, pytest.approx(metrics["auc"], abs=1e-6))]
    assert {"eval/tar_at_far/1e-01", "eval/cmc/rank1", "eval/accuracy_kfold"} <= set(events.Tags()["scalars"])
    assert {f"eval/{name}" for name in ("roc", "pr", "score_histogram", "tsne")} <= set(events.Tags()["images"])
    assert "eval" in (tmp_path / "tb" / "projector_config.pbtxt").read_text()


def test_accuracy_is_on_a_balanced_sample_not_all_pairs():
    emb, labels = _embeddings(signal=0.0)  # no identity information at all
    metrics = evaluate_embeddings(emb, labels)
    # on all pairs, "always different" would score 1 - genuine/all = 0.98; balanced it is a coin toss
    assert metrics["accuracy_kfold"]["mean"] == pytest.approx(0.5, abs=0.05)
    assert metrics["pairs"]["num_same_pairs"] * 2 == metrics["pairs"]["num_pairs"] == 800
    assert metrics["average_precision"] == pytest.approx(0.5, abs=0.06)


def test_given_pairs_are_used_in_their_order(tmp_path):
    emb, labels = _embeddings()
    same_a, same_b = np.arange(0, 200, 5), np.arange(1, 200, 5)
    diff_a, diff_b = np.arange(0, 200, 5), (np.arange(0, 200, 5) + 5) % 200
    pairs = (np.r_[same_a, diff_a], np.r_[same_b, diff_b], np.repeat([True, False], 40))
    metrics = evaluate_embeddings(emb, labels, pairs=pairs)
    assert metrics["pairs"] == {"source": "given pairs", "num_pairs": 80, "num_same_pairs": 40}
    # the given list, in its order (its folds), is what the accuracy and AP are computed on
    scores = pair_scores(emb, pairs[0], pairs[1])
    assert metrics["accuracy_kfold"] == kfold_accuracy(scores, pairs[2])
    assert metrics["average_precision"] == average_precision_score(pairs[2], scores)
    assert not list(tmp_path.iterdir())  # nothing written without out_dir


def _split_report(rank, world_size, embeddings, labels):
    """The report with its all-pairs and 1:N work split across the ranks, and a stop that rank 1 asks for at
    its third check."""
    from facedist import distributed
    from facedist.evaluation.metrics import EvaluationAbandoned

    metrics = evaluate_embeddings(torch.as_tensor(embeddings), labels, chunk_size=7, split_across_ranks=True)
    checks = []

    def should_stop():
        checks.append(1)
        return distributed.any_rank(rank == min(1, world_size - 1) and len(checks) == 3)

    try:
        verification_metrics(embeddings, labels, chunk_size=7, split_across_ranks=True, should_stop=should_stop)
        abandoned = False
    except EvaluationAbandoned:
        abandoned = True
    return metrics, abandoned, len(checks)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_metrics_split_across_ranks_equal_one_process_exactly(world_size):
    from dist_utils import run_distributed

    embeddings, labels = _embeddings(n_ids=25, per_id=6, dim=8)
    embeddings[:10] = embeddings[-10:]  # exact duplicates: ties between genuine and impostor scores
    reference = evaluate_embeddings(embeddings, labels, chunk_size=7)
    results = (
        [_split_report(0, 1, embeddings, labels)]
        if world_size == 1
        else run_distributed(_split_report, world_size, embeddings, labels)
    )
    assert results[0][0] == reference  # every number, curve and histogram
    assert all(metrics is None for metrics, _, _ in results[1:])  # the rest of the report is rank 0's
    assert all(abandoned and checks == 3 for _, abandoned, checks in results)  # abandoned together


def test_pair_shares_are_balanced_by_pair_count_not_rows():
    from facedist.evaluation.metrics import triangle_share

    n = 1000
    for world_size in (1, 2, 3, 8):
        shares = [triangle_share(n, world_size, r) for r in range(world_size)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, nothing left out
        pairs = [sum(n - 1 - i for i in range(start, stop)) for start, stop in shares]
        assert max(pairs) - min(pairs) <= n  # within one row's pairs of n(n-1)/2W each
    assert triangle_share(n, 2, 0) == (0, 293)  # the first 29% of the rows hold half of the pairs


def test_projector_holds_the_configured_seeded_subset(tmp_path):
    embeddings, labels = _embeddings()
    for points in (0, 7):
        with SummaryWriter(str(tmp_path / str(points))) as writer:
            evaluate_embeddings(embeddings, labels, tb_writer=writer, projector_points=points)
    assert not list((tmp_path / "0").rglob("tensors.tsv"))
    (tsv,) = (tmp_path / "7").rglob("tensors.tsv")
    assert len(tsv.read_text().splitlines()) == 7
