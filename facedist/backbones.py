"""InsightFace's face backbones as timm models: IResNet-18/34/50/100/200 and MobileFaceNet (GDC head).

    timm.create_model("iresnet50", embedding_dim=512)   # any facedist code path: model.backbone=iresnet50

Written here from the architecture of arcface_torch's `backbones/` (not copied): module and parameter
names are InsightFace's, so its released `backbone.pth` files load strictly; the test compares every key
and shape with a listing made by running InsightFace's own code (tests/data/insightface_state_dicts.json).
These networks end in the embedding (FC + BatchNorm1d), so facedist adds no neck (`gives_embedding`),
and the FC sits over the 7 x 7 map of a 112 x 112 input: the input size is fixed.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

import facedist  # noqa: F401  (torchvision compat before timm)

INPUT_SIZE = 112
_FINAL_MAP = 7  # 112 px after four stride-2 stages (IResNet) or the four stride-2 convs (MobileFaceNet)


def _face_cfg(**overrides) -> dict:
    # InsightFace normalises RGB in [0, 1] with mean = std = 0.5; no classifier, no weights to download
    return {
        "url": "",
        "num_classes": -1,
        "input_size": (3, INPUT_SIZE, INPUT_SIZE),
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": "conv1",
        "classifier": "",
        **overrides,
    }


default_cfgs = {
    name: _face_cfg()
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "iresnet18_narrow")
}
default_cfgs["mobilefacenet"] = _face_cfg(first_conv="layers.0.layers.0")


def _check_input(img_size, in_chans: int) -> None:
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if size != (INPUT_SIZE, INPUT_SIZE) or in_chans != 3:
        raise ValueError(
            f"face backbones take 3 x {INPUT_SIZE} x {INPUT_SIZE} images (the embedding FC sits over "
            f"a {_FINAL_MAP} x {_FINAL_MAP} map), got {in_chans} x {size[0]} x {size[1]}"
        )


class IBasicBlock(nn.Module):
    """BN, conv3x3, BN, PReLU, conv3x3 (carrying the stage's stride), BN; plus the (downsampled) input."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """Stride-1 stem (conv3x3, BN, PReLU; no max-pool), four stages of IBasicBlocks (stride 2 in each
    first block), then BN2d, dropout, flatten, FC and BatchNorm1d with its scale frozen at 1."""

    gives_embedding = True

    def __init__(
        self,
        layers,
        widths=(64, 128, 256, 512),
        embedding_dim: int = 512,
        dropout: float = 0.0,
        img_size=INPUT_SIZE,
        in_chans: int = 3,
    ):
        super().__init__()
        _check_input(img_size, in_chans)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        channels = widths[0]
        for i, (blocks, width) in enumerate(zip(layers, widths), start=1):
            stage = [IBasicBlock(channels, width, stride=2)] + [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * _FINAL_MAP * _FINAL_MAP, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        self.num_features = self.head_hidden_size = embedding_dim
        for m in self.modules():  # InsightFace's initialisation; the FC keeps nn.Linear's default
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.bn2(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvBN(nn.Module):
    """Conv (no bias), BN and, unless `linear`, PReLU: MobileFaceNet's ConvBlock / LinearBlock."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        linear: bool = False,
    ):
        super().__init__()
        parts = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.layers = nn.Sequential(*parts, *([] if linear else [nn.PReLU(out_channels)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthwiseBlock(nn.Module):
    """1x1 expansion to `expanded`, depthwise 3x3 (with the stride), linear 1x1 projection; residual option."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(in_channels, expanded),
            ConvBN(expanded, expanded, 3, stride, 1, groups=expanded),
            ConvBN(expanded, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class ResidualStage(nn.Module):
    def __init__(self, channels: int, blocks: int, expanded: int):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthwiseBlock(channels, channels, expanded, 1, residual=True) for _ in range(blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: a 7x7 depthwise conv + BN over the last map, flatten, FC (no bias), BN1d."""

    def __init__(self, channels: int, embedding_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(channels, channels, _FINAL_MAP, groups=channels, linear=True),
            nn.Flatten(),
            nn.Linear(channels, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's `mbf` (blocks 1, 4, 6, 2 at width scale 2): stem, depthwise stages, 1x1 to 512, GDC."""

    gives_embedding = True

    def __init__(
        self, embedding_dim: int = 512, blocks=(1, 4, 6, 2), scale: int = 2, img_size=INPUT_SIZE, in_chans: int = 3
    ):
        super().__init__()
        _check_input(img_size, in_chans)
        if blocks[0] != 1:
            raise ValueError("MobileFaceNet here has a single stem block (blocks[0] = 1), as arcface_torch's mbf")
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList(
            [
                ConvBN(3, c1, 3, 2, 1),
                ConvBN(
                    c1, c1, 3, 1, 1, groups=64
                ),  # grouped, not depthwise: InsightFace's choice, kept for its weights
                DepthwiseBlock(c1, c1, 128, 2),
                ResidualStage(c1, blocks[1], 128),
                DepthwiseBlock(c1, c2, 256, 2),
                ResidualStage(c2, blocks[2], 256),
                DepthwiseBlock(c2, c2, 512, 2),
                ResidualStage(c2, blocks[3], 256),
            ]
        )
        self.conv_sep = ConvBN(c2, 512)
        self.features = GDC(512, embedding_dim)
        self.num_features = self.head_hidden_size = embedding_dim
        for m in self.modules():  # InsightFace's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.conv_sep(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _build(cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f"{variant}: timm has no weights for it; use model.pretrained=backbone.pth (InsightFace's)")
    if kwargs.pop("num_classes", 0):  # facedist asks for num_classes=0 (no classifier): that is what these are
        raise ValueError(f"{variant} ends in the embedding and has no classifier; set embedding_dim instead")
    return build_model_with_cfg(cls, variant, pretrained=False, **kwargs)


@register_model
def iresnet18(pretrained: bool = False, **kwargs) -> IResNet:
    return _build(IResNet, "iresnet18", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def iresnet34(pretrained: bool = False, **kwargs) -> IResNet:
    return _build(IResNet, "iresnet34", pretrained, layers=(3, 4, 6, 3), **kwargs)


@register_model
def iresnet50(pretrained: bool = False, **kwargs) -> IResNet:
    return _build(IResNet, "iresnet50", pretrained, layers=(3, 4, 14, 3), **kwargs)


@register_model
def iresnet100(pretrained: bool = False, **kwargs) -> IResNet:
    return _build(IResNet, "iresnet100", pretrained, layers=(3, 13, 30, 3), **kwargs)


@register_model
def iresnet200(pretrained: bool = False, **kwargs) -> IResNet:
    return _build(IResNet, "iresnet200", pretrained, layers=(6, 26, 60, 6), **kwargs)


@register_model
def iresnet18_narrow(pretrained: bool = False, **kwargs) -> IResNet:
    """IResNet-18 at 1/8 of the width (8..64 channels): the recipe's network for CPU smoke tests."""
    return _build(IResNet, "iresnet18_narrow", pretrained, layers=(2, 2, 2, 2), widths=(8, 16, 32, 64), **kwargs)


@register_model
def mobilefacenet(pretrained: bool = False, **kwargs) -> MobileFaceNet:
    return _build(MobileFaceNet, "mobilefacenet", pretrained, **kwargs)


FACE_BACKBONES = tuple(default_cfgs)
