import math

import numpy as np
import pytest
import torch

from facedist.evaluation.identification import enrolment, identification_metrics, open_set_split
from facedist.evaluation.metrics import cosine_scores, quantise


def _ranked_probes(num_identities=8):
    """Identity c: gallery image e_c, then a probe closer to (rank_c - 1) other templates than to its own."""
    eye = np.eye(num_identities)
    embeddings, labels, expected_rank = [], [], []
    for c in range(num_identities):
        rank = c % num_identities + 1
        others = [(c + k) % num_identities for k in range(1, rank)]
        probe = 3.0 * eye[c] + 4.0 * eye[others].sum(0)  # cos to each other template > cos to its own
        embeddings += [eye[c], probe]
        labels += [c, c]
        expected_rank.append(rank)
    return np.array(embeddings), np.array(labels), np.array(expected_rank)


def test_cmc_on_constructed_ranks():
    embeddings, labels, rank = _ranked_probes()
    m = identification_metrics(embeddings, labels)
    assert m["cmc"] == {"rank1": np.mean(rank <= 1), "rank5": np.mean(rank <= 5)}
    assert m["num_probes"] == 8 and m["num_gallery_identities"] == 8
    assert (
        identification_metrics(torch.from_numpy(embeddings), torch.from_numpy(labels), chunk_size=1)["cmc"] == m["cmc"]
    )


def test_tie_with_another_identity_counts_against_the_probe():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # probe equally close to both templates
    m = identification_metrics(embeddings, np.array([0, 1, 0]), ranks=(1, 2))
    assert m["cmc"] == {"rank1": 0.0, "rank2": 1.0}


def test_enrolment_takes_the_first_images_of_each_identity():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    assert enrolment(labels, 1).tolist() == [True, True, False, True, False, False, False]
    assert enrolment(labels, 2).tolist() == [True, True, True, True, True, False, False]


def test_template_is_the_mean_of_the_enrolled_images():
    # identity 0 enrols two images at 45 degrees either side of x; its probe lies on x
    embeddings = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 0.05], [0.8, 0.7], [0.8, 0.7], [0.8, 0.7]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert identification_metrics(embeddings, labels, gallery_per_identity=2)["cmc"]["rank1"] == 1.0
    assert identification_metrics(embeddings, labels, gallery_per_identity=1)["cmc"]["rank1"] == 0.5


def _brute_force_open_set(embeddings, labels, fpirs, fraction, seed):
    """Every search scored against every enrolled template; FNIR at FPIR by trying every threshold."""
    num_identities = labels.max() + 1
    distractors = open_set_split(num_identities, fraction, seed)
    enrolled_ids = [c for c in range(num_identities) if c not in distractors]
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(num_identities)])
    q = quantise(embeddings)
    scores = cosine_scores(q, quantise(embeddings[first[enrolled_ids]])).numpy()
    mated = [i for i in range(len(labels)) if labels[i] in enrolled_ids and i not in first]
    nonmated_top = np.array([scores[i].max() for i in range(len(labels)) if labels[i] in distractors])
    own = {c: k for k, c in enumerate(enrolled_ids)}
    hit_score = []
    for i in mated:
        s = scores[i]
        unique_top = (s >= s[own[labels[i]]]).sum() == 1
        hit_score.append(s[own[labels[i]]] if unique_top else -np.inf)
    hit_score = np.array(hit_score)
    fnir = {}
    for f in fpirs:
        if f * len(nonmated_top) < 10:
            fnir[f] = None
            continue
        feasible = [
            t for t in np.unique(hit_score) if (nonmated_top >= t).sum() <= math.floor(f * len(nonmated_top) + 1e-9)
        ]
        fnir[f] = 1.0 - max((hit_score >= t).mean() for t in feasible) if feasible else 1.0
    return fnir, len(mated), len(nonmated_top)


@pytest.mark.parametrize("fraction, seed", [(0.5, 0), (0.3, 1)])
def test_open_set_fnir_at_fpir_equals_brute_force(fraction, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(60), 5)
    embeddings = 1.2 * rng.normal(size=(60, 6))[labels] + rng.normal(size=(300, 6))
    fpirs = (0.2, 0.1, 0.05, 0.01)
    m = identification_metrics(embeddings, labels, fpirs=fpirs, distractor_fraction=fraction, seed=seed, chunk_size=7)
    expected, num_mated, num_nonmated = _brute_force_open_set(embeddings, labels, fpirs, fraction, seed)
    assert m["num_mated_searches"] == num_mated and m["num_nonmated_searches"] == num_nonmated
    for f in fpirs:
        got = m["fnir_at_fpir"][f"{f:.0e}"]
        assert got == (None if expected[f] is None else pytest.approx(expected[f], abs=1e-12)), f
    assert m["fnir_at_fpir"]["2e-01"] is not None and m["fnir_at_fpir"]["1e-02"] is None


def test_open_set_split_is_seeded_and_keeps_an_enrolled_identity():
    assert open_set_split(10, 0.5, 0) == open_set_split(10, 0.5, 0) != open_set_split(10, 0.5, 1)
    assert len(open_set_split(10, 0.5, 0)) == 5 and len(open_set_split(2, 0.99, 0)) == 1


def test_degenerate_galleries():
    m = identification_metrics(np.eye(3), np.arange(3))  # one image each: nothing to search with
    assert m["cmc"] is None and m["num_probes"] == 0 and m["num_nonmated_searches"] == 2
    m = identification_metrics(np.eye(3), np.zeros(3))  # one identity: no open set
    assert m["cmc"] == {"rank1": 1.0, "rank5": 1.0} and m["fnir_at_fpir"] is None
    with pytest.raises(ValueError, match="gallery_per_identity"):
        identification_metrics(np.eye(3), np.zeros(3), gallery_per_identity=0)
