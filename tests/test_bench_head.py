"""The head benchmark's figures: state per rank ~ C / W, and a training-step peak that holds head and backbone."""

import json

import pytest

from facedist.benchmarks.head import main
from facedist.config import ModelConfig
from facedist.model import build_model


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "head.json"
    main(
        [
            "--classes",
            "30001",
            "--rates",
            "1.0,0.1",
            "--world-sizes",
            "1,2",
            "--batch",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--backbone",
            "resnet10t",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["backbone"] == "resnet10t" and result["device"] == "cpu"
    return {(r["world_size"], r["sample_rate"]): r for r in result["results"]}


def test_head_state_per_rank_is_proportional_to_classes_over_ranks(rows):
    assert rows[1, 1.0]["rows_per_rank"] == 30001 and rows[2, 1.0]["rows_per_rank"] == 15001
    assert rows[2, 1.0]["state_mb_per_rank"] == pytest.approx(
        rows[1, 1.0]["state_mb_per_rank"] * 15001 / 30001, abs=0.1
    )


def test_training_step_peak_counts_backbone_and_head(rows):
    model = build_model(ModelConfig(backbone="resnet10t", embedding_dim=512, image_size=32))
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for row in rows.values():
        # at the optimizer step: weights, gradients and both AdamW moments of the backbone, plus the head's state
        assert row["train_peak_mb_per_rank"] >= row["state_mb_per_rank"] + 4 * params_mb - 0.2, row
        assert row["train_step_ms"] > 0 and row["step_ms"] > 0  # speed itself is the benchmark's printout, not a test


def test_softmax_overhead_is_reported_against_the_training_step(rows):
    for rate in (1.0, 0.1):
        row = rows[2, rate]
        assert row["softmax_overhead_pct"] == pytest.approx(
            100 * row["softmax_overhead_ms"] / row["train_step_ms"], abs=0.02
        )
        assert "softmax_overhead_pct" not in rows[1, rate]  # one process: nothing distributed to cost


def test_face_backbone_with_sgd_and_sampling(tmp_path):
    """IResNet's frozen embedding-BN scale and SGD's head optimizer go through the training-step measurement."""
    out = tmp_path / "face.json"
    main(
        [
            "--classes",
            "300",
            "--rates",
            "0.1",
            "--world-sizes",
            "1",
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--backbone",
            "iresnet18_narrow",
            "--image-size",
            "112",
            "--optim",
            "sgd",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["results"]
    assert row["train_step_ms"] > 0 and row["train_peak_mb_per_rank"] > 0
