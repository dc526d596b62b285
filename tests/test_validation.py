"""Evaluation during training: every rank's share embedded and gathered (zero rows allowed), a missing split."""

import contextlib

import pytest
import torch
from dist_utils import run_distributed
from tiny_model import TINY_MODEL_OVERRIDES

from facedist.config import load_config
from facedist.data.index import ShardIndex
from facedist.data.shards import ShardError
from facedist.evaluation.validation import embed_split, validation_index
from facedist.model import build_model, preprocessing

OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "eval.max_images=2",
    "eval.batch_size=1",
    "data.num_workers=0",
]


def _embed(rank, world_size, shards):
    cfg = load_config(None, [*OVERRIDES, f"data.shards={shards}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    embeddings, labels = embed_split(
        model, ShardIndex(shards, "val"), cfg, preprocessing(model, 32), "cpu", contextlib.nullcontext
    )
    return embeddings, labels


@pytest.mark.distributed
def test_a_rank_without_validation_images_contributes_zero_rows(synth_shards):
    """2 images on 3 ranks: rank 2 has none, and every rank still gets both, as on one process."""
    expected, expected_labels = _embed(0, 1, str(synth_shards))
    assert expected.shape == (2, 16)
    for embeddings, labels in run_distributed(_embed, 3, str(synth_shards)):
        torch.testing.assert_close(embeddings, expected)
        assert torch.equal(labels, expected_labels)


def test_evaluating_without_a_validation_split_says_what_to_do(synth_shards):
    cfg = load_config(None, [f"data.shards={synth_shards}", "data.split_val=holdout"])
    with pytest.raises(ShardError) as err:
        validation_index(cfg)
    assert (
        "no split 'holdout'" in str(err.value)
        and "eval.every=0" in str(err.value)
        and "--val-identities" in str(err.value)
    )
    assert validation_index(load_config(None, [f"data.shards={synth_shards}", "eval.every=0"])) is None


def test_validation_embeds_with_flip_when_the_run_records_eval_flip(synth_shards):
    """eval.flip=true (stored as preprocessing["flip"]): validation scores image + mirror, as inference will."""
    from facedist.data.dataset import make_eval_loader

    cfg = load_config(None, [*OVERRIDES, f"data.shards={synth_shards}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    index, prep = ShardIndex(synth_shards, "val"), preprocessing(model, 32)
    plain, _ = embed_split(model, index, cfg, prep, "cpu", contextlib.nullcontext)
    flipped, _ = embed_split(model, index, cfg, {**prep, "flip": True}, "cpu", contextlib.nullcontext)
    images = torch.cat([batch[0] for batch in make_eval_loader(index, prep, 2, max_images=2)])
    with torch.no_grad():
        torch.testing.assert_close(plain, model(images))
        torch.testing.assert_close(flipped, model(images) + model(images.flip(-1)))
