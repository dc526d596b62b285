"""Parameters and compute of embedding models, counted by torch's flop counter, as JSON.

    python -m facedist.bench model --backbones iresnet50,iresnet100 [--image-size 112]

FLOPs are FlopCounterMode's (convolutions and matrix products of one image's eval-mode forward pass);
MACs = FLOPs / 2, the unit of arcface_torch's "GFLOPs" column.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from facedist.cli_common import DefaultsHelpFormatter
from facedist.config import ModelConfig
from facedist.model import build_model


def count(backbone: str, image_size: int, embedding_dim: int = 512) -> dict:
    model = build_model(ModelConfig(backbone=backbone, image_size=image_size, embedding_dim=embedding_dim)).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    flops = counter.get_total_flops()
    return {
        "backbone": backbone,
        "image_size": image_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "neck": not isinstance(model.neck, torch.nn.Identity),
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facedist.bench model", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--backbones",
        default="iresnet18,iresnet34,iresnet50,iresnet100,iresnet200,mobilefacenet",
        help="comma-separated backbone names (timm's or facedist.backbones')",
    )
    parser.add_argument("--image-size", type=int, default=112, help="input side, pixels")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for backbone in args.backbones.split(","):
        print(json.dumps(count(backbone, args.image_size)), flush=True)
    return 0
