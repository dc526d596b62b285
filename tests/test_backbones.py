"""InsightFace's backbones in facedist: state dicts as InsightFace's own code makes them, no neck, fixed
112 px input, strict loading of their weights, timm and ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tiny_model import save_tiny_model

import facedist  # noqa: F401  (torchvision compat before timm)
from facedist.backbones import FACE_BACKBONES
from facedist.config import ModelConfig
from facedist.model import build_model, preprocessing

LISTING = json.loads((Path(__file__).parent / "data" / "insightface_state_dicts.json").read_text())["backbones"]
NARROW = "iresnet18_narrow"


@pytest.mark.parametrize("name", sorted(LISTING))
def test_state_dict_is_insightfaces_key_for_key(name):
    with torch.device("meta"):  # shapes only: iresnet200 has 119M parameters
        backbone = timm.create_model(name, embedding_dim=512)
    ours = [[key, list(value.shape)] for key, value in backbone.state_dict().items()]
    assert ours == [[key, shape] for key, shape in LISTING[name]["state_dict"].items()]
    assert sum(p.numel() for p in backbone.parameters()) == LISTING[name]["parameters"]


def test_every_listed_backbone_is_registered():
    assert set(LISTING) == set(FACE_BACKBONES) - {NARROW}
    assert set(FACE_BACKBONES) <= set(timm.list_models("*"))


@pytest.fixture(scope="module")
def narrow():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=NARROW, embedding_dim=32))


def test_the_backbone_gives_the_embedding_without_a_neck(narrow):
    assert isinstance(narrow.neck, torch.nn.Identity) and not any(k.startswith("neck") for k in narrow.state_dict())
    assert narrow.backbone.forward_features(torch.randn(2, 3, 112, 112)).shape == (2, 64, 7, 7)  # stride-1 stem
    assert narrow(torch.randn(2, 3, 112, 112)).shape == (2, 32)
    assert preprocessing(narrow, 112) == {"image_size": 112, "mean": [0.5] * 3, "std": [0.5] * 3, "color": "RGB"}


def test_embedding_batchnorm_scale_stays_frozen_at_one(narrow):
    model = build_model(ModelConfig(backbone=NARROW, embedding_dim=32)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        model(torch.randn(4, 3, 112, 112)).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(model.backbone.features.weight, torch.ones(32))
    assert not torch.equal(model.backbone.features.bias, torch.zeros(32))  # the rest of it trains


@pytest.mark.parametrize("size", [96, 224])
def test_other_image_sizes_are_refused_in_one_line(size):
    with pytest.raises(ValueError, match=f"model.image_size={size}: iresnet50 takes 112 x 112") as err:
        build_model(ModelConfig(backbone="iresnet50", image_size=size))
    assert "\n" not in str(err.value)


def test_embedding_dim_mismatch_and_timm_weights_are_refused():
    with pytest.raises(ValueError, match="no classifier"):
        timm.create_model(NARROW, num_classes=10)
    with pytest.raises(ValueError, match="model.pretrained=backbone.pth"):
        timm.create_model(NARROW, pretrained=True)


def test_insightface_weights_load_strictly_and_reproduce_the_embedding(narrow, tmp_path):
    narrow.eval()
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in narrow.backbone.state_dict().items()}, path)  # DDP-saved names too
    loaded = build_model(ModelConfig(backbone=NARROW, embedding_dim=32, pretrained=str(path))).eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(images), narrow(images))


def test_a_file_that_does_not_fit_names_missing_and_unexpected_keys(narrow, tmp_path):
    state = dict(narrow.backbone.state_dict())
    state["fc.extra"] = state.pop("fc.bias")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\], unexpected keys \['fc.extra'\]"):
        build_model(ModelConfig(backbone=NARROW, embedding_dim=32, pretrained=str(tmp_path / "bad.pth")))
    state = dict(narrow.backbone.state_dict(), **{"fc.bias": torch.zeros(7)})
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"fc.bias has shape \(7,\), backbone expects \(32,\)"):
        build_model(ModelConfig(backbone=NARROW, embedding_dim=32, pretrained=str(tmp_path / "shape.pth")))


class _NotATensor:
    pass


def test_weights_are_read_with_weights_only(tmp_path):
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="not a readable weights file"):
        build_model(ModelConfig(backbone=NARROW, embedding_dim=32, pretrained=str(tmp_path / "pickle.pth")))


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from facedist.inference_cli import export_main

    model, _, file = save_tiny_model(tmp_path / "run", image_size=112, backbone=NARROW)
    export_main(["--checkpoint", str(file.parent), "--onnx", str(tmp_path / "model.onnx")])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 112, 112)
    (got,) = session.run(["embeddings"], {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), atol=1e-4, rtol=1e-4)
