"""The embedding model: an optional lighting normalisation and upscaling of the input, a timm backbone without
classifier, then a neck to D dims: global average pooling (or MobileFaceNet's global depthwise convolution),
linear, BatchNorm.

Backbones that end in the embedding themselves (InsightFace's IResNets and MobileFaceNet, facedist/backbones.py)
get no neck, and their InsightFace weights load strictly by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import facedist  # noqa: F401  (torchvision compat before timm)
from facedist.backbones import FACE_BACKBONES
from facedist.config import ModelConfig

log = logging.getLogger(__name__)

_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.fc.", "head.", "last_linear.")


class RetinexNormalisation(nn.Module):
    """Lighting normalisation of normalised RGB input, inside the model so that training, evaluation,
    facedist-embed/-compare and the ONNX export apply it identically.

    Retinex: an image is albedo x shading, and shading from one light varies slowly across the face. In
    log intensity that product is a sum, so subtracting a Gaussian-blurred local mean removes the smooth
    shading and gamma (a scale in log space) is undone by dividing by the local RMS contrast. The result
    is grey, about unit variance (squashed by tanh to +-3), copied to the backbone's 3 input channels.
    Buffers are not persistent: the state dict is that of the model without it.
    """

    def __init__(self, mean, std, image_size: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        sigma = image_size / 16  # ~7 px at 112: wider than eyes and mouth, narrower than the shading
        radius = int(3 * sigma)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        self.register_buffer("kernel", (taps / taps.sum()).view(1, 1, 1, -1), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        radius = self.kernel.shape[-1] // 2
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), self.kernel)
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), self.kernel.transpose(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = (images * self.std + self.mean).mean(1, keepdim=True).clamp(min=0)
        log = torch.log(grey + 1 / 255)  # 1/255: one grey level, so black pixels stay finite
        detail = log - self._blur(log)
        contrast = torch.sqrt(self._blur(detail * detail) + 1e-4)
        return (3 * torch.tanh(detail / contrast / 3)).expand(-1, images.shape[1], -1, -1)


class HistogramEqualisation(nn.Module):
    """Grey histogram equalisation of normalised RGB input, inside the model like `RetinexNormalisation`.

    Each pixel becomes its mid-rank among the image's 256 grey levels (the fraction of pixels darker, plus half
    those as bright), so any global monotonic change of intensity (gamma, contrast, brightness, short of
    clipping) gives the same input: the backbone sees one uniform histogram whatever the exposure. The 256-bin
    histogram is a scatter-add and a cumulative sum (exact integer counts in float32, exportable to ONNX); the
    result is normalised as the backbone expects and copied to its 3 input channels. Buffers not persistent.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count, _, height, width = images.shape
        grey = (images.float() * self.std + self.mean).mean(1).view(count, -1)
        levels = (grey * 255).round().clamp(0, 255).long()
        histogram = torch.zeros(count, 256, device=images.device).scatter_add_(1, levels, torch.ones_like(grey))
        below_and_half = histogram.cumsum(1) - histogram / 2
        ranks = below_and_half.gather(1, levels).view(count, 1, height, width) / (height * width)
        return ((ranks - self.mean) / self.std).to(images.dtype)


def upscaling(scale: float) -> nn.Module:
    return nn.Identity() if scale == 1 else nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)


def global_depthwise_conv(map_shape: tuple[int, int, int]) -> nn.Sequential:
    """MobileFaceNet's GDC: one learned weight per channel and position over the whole final map, so the
    embedding can weight the eyes more than the cheeks (average pooling weights all alike). Starts as average
    pooling, so fine-tuning starts from the pretrained features' pooled vector."""
    channels, height, width = map_shape
    conv = nn.Conv2d(channels, channels, (height, width), groups=channels, bias=False)
    nn.init.constant_(conv.weight, 1 / (height * width))
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.Flatten())


class EmbeddingModel(nn.Module):
    """[input normalisation ->] [upscaling ->] backbone features [-> GDC] -> Linear -> BatchNorm1d: the
    insightface-style neck, unnormalised output. `input_scale` > 1 enlarges the image (bilinear) before the
    backbone (ImageNet features were learned on objects larger than a 112-px face's eyes). `map_shape`
    (channels, height, width of the backbone's unpooled output) selects the GDC neck; the backbone then
    gives that map. A backbone with `gives_embedding` already ends
    in FC + BatchNorm1d to `embedding_dim`: no neck."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        input_norm: nn.Module | None = None,
        map_shape: tuple[int, int, int] | None = None,
        input_scale: float = 1.0,
    ):
        super().__init__()
        self.input_norm = input_norm or nn.Identity()
        self.input_resize = upscaling(input_scale)
        self.embedding_dim = embedding_dim
        self.backbone = backbone
        # timm models with a pre-logits layer (e.g. MobileNetV3) output head_hidden_size, not num_features
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        if getattr(backbone, "gives_embedding", False):
            if features != embedding_dim:
                raise ValueError(f"model.embedding_dim={embedding_dim}: the backbone gives {features}-d embeddings")
            self.neck = nn.Identity()
        else:
            pooling = [] if map_shape is None else list(global_depthwise_conv(map_shape))
            self.neck = nn.Sequential(
                *pooling,
                nn.Linear(features if map_shape is None else map_shape[0], embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim),
            )
        self.freeze_bn = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(self.input_resize(self.input_norm(images))))

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self.freeze_bn:  # frozen statistics: BN layers always normalise with running stats
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def preprocessing(model: EmbeddingModel, image_size: int) -> dict:
    """What an image must go through before the model: size and the backbone's normalisation."""
    return _preprocessing(model.backbone, image_size)


def _preprocessing(backbone: nn.Module, image_size: int) -> dict:
    cfg = backbone.pretrained_cfg
    return {
        "image_size": int(image_size),
        "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
        "color": "RGB",
    }


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a corrupt or foreign file
        raise ValueError(
            f"model.pretrained: {path} is not a readable weights file "
            f"({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local weights file into the backbone; a classifier in the file is ignored with a message.

    Keys are matched by name; when names differ (weights packaged for another codebase) but the
    tensors line up one-to-one by order and shape, they are matched by order.
    """
    path = Path(path)
    state = _read_weights(path)
    target = backbone.state_dict()
    if getattr(backbone, "gives_embedding", False):
        _load_strict(backbone, state, target, path)
        return
    notes = []  # said only once the weights have loaded: a refused file ignores nothing
    dropped = [k for k in state if k not in target and k.startswith(_CLASSIFIER_PREFIXES)]
    if dropped:
        notes.append(f"ignoring the file's classifier ({', '.join(dropped)})")
        state = {k: v for k, v in state.items() if k not in dropped}
    if set(state) <= set(target):
        mapped = state
    else:
        src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in target if not k.endswith("num_batches_tracked")]
        if len(src) > len(dst):  # trailing classifier under another name
            notes.append(f"ignoring {len(src) - len(dst)} trailing tensors (classifier)")
            src = src[: len(dst)]
        if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
            unknown = sorted(set(state) - set(target))[:3]
            raise ValueError(f"model.pretrained: {path} does not fit the backbone (unknown keys: {unknown})")
        mapped = {k: v for (_, v), k in zip(src, dst)}
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise ValueError(
                f"model.pretrained: {path}: {key} has shape {tuple(value.shape)}, "
                f"backbone expects {tuple(target[key].shape)}"
            )
    missing = backbone.load_state_dict(mapped, strict=False).missing_keys
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"model.pretrained: {path} lacks backbone weights, e.g. {missing[:3]}")
    for note in notes:
        log.warning("model.pretrained: %s", note)


def _load_strict(backbone: nn.Module, state: dict, target: dict, path: Path) -> None:
    """Exactly the backbone's keys and shapes (InsightFace's names), or one error naming what differs."""
    missing, unexpected = [k for k in target if k not in state], [k for k in state if k not in target]
    if missing or unexpected:

        def some(keys):
            return f"{keys[:4]}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        raise ValueError(
            f"model.pretrained: {path} does not fit {backbone.pretrained_cfg['architecture']}: "
            f"missing keys {some(missing)}, unexpected keys {some(unexpected)}"
        )
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise ValueError(
                f"model.pretrained: {path}: {key} has shape {tuple(value.shape)}, "
                f"backbone expects {tuple(target[key].shape)}"
            )
    backbone.load_state_dict(state, strict=True)


def _final_map_shape(backbone: nn.Module, image_size: int, input_scale: float) -> tuple[int, int, int]:
    """The unpooled output's channels, height and width at this input, from one forward pass (any timm
    model)."""
    was_training = backbone.training
    with torch.no_grad():
        out = backbone.eval()(upscaling(input_scale)(torch.zeros(1, 3, image_size, image_size)))
    backbone.train(was_training)
    if out.dim() != 4:
        raise ValueError(f"model.neck=gdc: {type(backbone).__name__} gives no 2-d feature map ({tuple(out.shape)})")
    return tuple(out.shape[1:])


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> EmbeddingModel:
    """Backbone from timm (no download: weights only from `cfg.pretrained`) + neck, BN mode applied."""
    face = cfg.backbone in FACE_BACKBONES
    if face and cfg.image_size != 112:
        raise ValueError(
            f"model.image_size={cfg.image_size}: {cfg.backbone} takes 112 x 112 faces (its embedding FC "
            "sits over the 7 x 7 map); set model.image_size=112"
        )
    if face and cfg.neck != "pool":
        raise ValueError(f"model.neck={cfg.neck}: {cfg.backbone} ends in its own embedding layer; set model.neck=pool")
    if face and cfg.input_scale != 1:
        raise ValueError(
            f"model.input_scale={cfg.input_scale}: {cfg.backbone} takes 112 x 112 faces as they are; "
            "set model.input_scale=1"
        )
    options = {"embedding_dim": cfg.embedding_dim} if face else {"global_pool": ""} if cfg.neck == "gdc" else {}
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **options)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(f"model.backbone: {err}") from err
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained)
    input_norm = None
    prep = _preprocessing(backbone, cfg.image_size)
    if cfg.input_norm == "retinex":
        input_norm = RetinexNormalisation(prep["mean"], prep["std"], cfg.image_size)
    elif cfg.input_norm == "equalize":
        input_norm = HistogramEqualisation(prep["mean"], prep["std"])
    map_shape = _final_map_shape(backbone, cfg.image_size, cfg.input_scale) if cfg.neck == "gdc" else None
    model = EmbeddingModel(backbone, cfg.embedding_dim, input_norm, map_shape, cfg.input_scale)
    if cfg.bn == "sync":
        if torch.device(device).type != "cuda":
            raise ValueError("model.bn=sync needs GPUs (SyncBatchNorm has no CPU kernel); use batch or frozen")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.freeze_bn = cfg.bn == "frozen"
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)
