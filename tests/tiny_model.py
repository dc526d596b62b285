"""Tiny models for tests: the config overrides that make a training run's model tiny, and a tiny saved embedding
model for the inference, export and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import torch

import facedist  # noqa: F401  (torchvision compat before timm)
from facedist.checkpoint import EMBEDDING_FILE, CheckpointWriter, save_embedding_model
from facedist.config import Config, ModelConfig
from facedist.model import build_model, preprocessing

TINY_BACKBONE = "mobilenetv3_small_050"
# The model of every training run in the tests: timm's resnet10t, 16-d embeddings of 32 px images.
# Import it where a list is needed at module level or in a subprocess's arguments; tests take the
# `tiny_model_overrides` fixture (conftest.py).
TINY_MODEL_OVERRIDES = ("model.backbone=resnet10t", "model.embedding_dim=16", "model.image_size=32")


def save_tiny_model(
    output_dir: Path,
    image_size: int = 64,
    embedding_dim: int = 32,
    seed: int = 0,
    input_norm: str = "none",
    backbone: str = TINY_BACKBONE,
    flip: bool = False,
    neck: str = "pool",
    input_scale: float = 1.0,
):
    """A training output_dir with one checkpoint (step 7) holding only model.safetensors (random weights,
    non-trivial BN statistics); returns (model in eval mode, preprocessing, the model.safetensors file)."""
    torch.manual_seed(seed)
    cfg = Config(
        model=ModelConfig(
            backbone=backbone,
            embedding_dim=embedding_dim,
            image_size=image_size,
            input_norm=input_norm,
            neck=neck,
            input_scale=input_scale,
        )
    )
    model = build_model(cfg.model)
    with torch.no_grad():  # a few train-mode passes give BN running statistics other than 0/1
        for _ in range(2):
            model(torch.randn(4, 3, image_size, image_size))
    model.eval()
    pre = {**preprocessing(model, image_size), "flip": flip}  # as training stores it (eval.flip)
    writer = CheckpointWriter(output_dir, keep=1, rank=0, barrier=lambda: None)
    checkpoint = writer.save(
        7, {}, {EMBEDDING_FILE: lambda tmp: save_embedding_model(model, pre, cfg.to_dict(), tmp, step=7)}, {}
    )
    return model, pre, checkpoint / EMBEDDING_FILE
