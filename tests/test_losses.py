"""facedist's pair losses against pytorch-metric-learning on one process, same global batch, W = 1, 2, 3."""

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from pytorch_metric_learning import distances, losses, miners

from facedist.config import LossConfig
from facedist.losses import Objective

P, M, DIM = 12, 4, 8  # global batch: 12 identities x 4 images = 48 rows
MARGIN = 0.3
VARIANTS = [
    ("triplet", "none"),
    ("triplet", "semihard"),
    ("triplet", "hard"),
    ("contrastive", "none"),
    ("multi_similarity", "none"),
]


def _batch():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(P * M, DIM, generator=g)
    labels = torch.arange(P).repeat_interleave(M)[torch.randperm(P * M, generator=g)]  # classes spread over ranks
    layer = torch.nn.Linear(DIM, 6, bias=False)
    torch.nn.init.normal_(layer.weight, generator=g)
    return inputs, labels, layer


def _pml_reference(pair, miner):
    """Loss and weight gradient of PML's loss on the whole batch in one process (the reference)."""
    inputs, labels, layer = _batch()
    cosine = distances.CosineSimilarity()
    loss_fn = {
        "triplet": losses.TripletMarginLoss(margin=MARGIN, distance=cosine),
        "contrastive": losses.ContrastiveLoss(pos_margin=1.0, neg_margin=MARGIN, distance=cosine),
        "multi_similarity": losses.MultiSimilarityLoss(distance=cosine),
    }[pair]
    embeddings = layer(inputs)
    mined = (
        miners.TripletMarginMiner(margin=MARGIN, type_of_triplets=miner, distance=cosine)(embeddings, labels)
        if miner != "none"
        else None
    )
    loss = loss_fn(embeddings, labels, mined)
    loss.backward()
    return loss.detach(), layer.weight.grad


def _step(rank, world, variants, loss_scale=1.0, chunk_elements=None):
    """facedist's loss and DDP-averaged gradient on rank r's slice of the global batch, per variant."""
    results = []
    for pair, miner in variants:
        inputs, labels, layer = _batch()
        part = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
        objective = Objective(LossConfig(pair=pair, miner=miner, pair_margin=MARGIN))
        if chunk_elements:
            objective.pair.chunk_elements = chunk_elements
        loss, logged = objective(layer(inputs[part]), labels[part], step=0)
        (loss * loss_scale).backward()
        grad = layer.weight.grad
        if world > 1:  # what DDP does: average gradients over ranks
            dist.all_reduce(grad)
            grad /= world
        results.append((logged["loss"], grad))
    return results


def _compare(per_rank, variants):
    for i, variant in enumerate(variants):
        ref_loss, ref_grad = _pml_reference(*variant)
        assert ref_loss > 0 and ref_grad.abs().sum() > 0, variant
        for results in per_rank:
            loss, grad = results[i]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=lambda m: f"{variant} loss: {m}")  # noqa: B023
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{variant} grad: {m}")  # noqa: B023


def test_one_process_equals_pml_whole_and_in_chunks_of_anchors():
    _compare([_step(0, 1, VARIANTS)], VARIANTS)
    _compare([_step(0, 1, VARIANTS, chunk_elements=5 * P * M)], VARIANTS)  # 5 anchors per chunk


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_processes_equal_pml_on_the_global_batch(world):
    _compare(run_distributed(_step, world, VARIANTS), VARIANTS)


@pytest.mark.distributed
def test_mis_scaled_loss_is_caught():
    """Scaling the loss by W once more (a classic DDP bug) doubles the gradient: the comparison must see it."""
    variant = [("triplet", "none")]
    _, ref_grad = _pml_reference(*variant[0])
    _, grad = run_distributed(_step, 2, variant, 2.0)[0][0]
    assert not torch.allclose(grad, ref_grad, rtol=1e-3)
