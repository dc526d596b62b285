"""Shared pytest fixtures: small synthetic identity trees and shard folders built from them."""

from __future__ import annotations

import pytest
from tiny_model import TINY_MODEL_OVERRIDES

import facedist  # noqa: F401  (torchvision compat before anything imports it)
from facedist.data.shards import BuildOptions, build
from facedist.data.synth import write_synthetic_tree

SYNTH_IDENTITIES = 16
SYNTH_IMAGES_PER_IDENTITY = 6
SYNTH_SIZE = 32
SYNTH_VAL_IDENTITIES = 4


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """A synthetic identity-folder tree: 16 identities x 6 images of 32 px, png."""
    root = tmp_path_factory.mktemp("synth") / "faces"
    write_synthetic_tree(root, SYNTH_IDENTITIES, SYNTH_IMAGES_PER_IDENTITY, size=SYNTH_SIZE, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_tree, tmp_path_factory):
    """Shards of `synth_tree`: 12 train identities (72 images, 3 shards), 4 val (24 images, 1 shard); 32 px jpg."""
    out = tmp_path_factory.mktemp("shards") / "synth"
    options = BuildOptions(size=SYNTH_SIZE, max_samples=32, val_identities=str(SYNTH_VAL_IDENTITIES), seed=0)
    build(synth_tree, out, options, workers=1, progress=False)
    return out


@pytest.fixture
def tiny_model_overrides():
    """The config overrides that make a training run's model tiny (resnet10t, 16-d embeddings, 32 px)."""
    return list(TINY_MODEL_OVERRIDES)
