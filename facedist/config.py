"""One typed config for a training run: dataclass defaults, a YAML file on top, `key=value` overrides last.

Every knob lives here; modules take the section they need. Unknown keys and bad values fail at start
with one line naming the key and the valid choices (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


@dataclass
class AugmentConfig:
    """Face-aware defaults (aligned faces): mirror only; no aspect change, no black corners (replicated border).
    Geometry is one affine warp per image on the CPU; the photometric factors apply on the training device."""

    hflip: bool = True
    crop_scale_min: float = 1.0  # square crop of area fraction uniform in [crop_scale_min, 1] (zoom in), aspect kept
    translate: float = 0.0  # shift uniform in +-translate x the image side, on each axis
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    brightness: float = 0.0  # factor uniform in [max(0, 1 - brightness), 1 + brightness]; 0 disables
    contrast: float = 0.0  # same, blending with the image's mean grey level
    saturation: float = 0.0  # same, blending with the pixel's grey level
    gamma: float = 0.0  # exponent uniform in [1 - gamma, 1 + gamma] (a uint8 lookup table); 0 disables, < 1
    shading: float = 0.0  # directional light: x (1 + s * ramp), ramp -1 -> 1 across the face at a uniform angle,
    #                       s uniform in [0, shading]; 0 disables, <= 1


@dataclass
class DataConfig:
    shards: str = "shards/synth"
    split_train: str = "train"
    split_val: str = "val"
    sampler: Literal["class_balanced", "random"] = "class_balanced"  # random: uniform over images (margin heads)
    classes_per_batch: int = 8  # P, per process (class_balanced)
    images_per_class: int = 4  # M (class_balanced)
    batch_size: int = 128  # images per process and step (random)
    num_workers: int = 2
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: nvJPEG + warp on the device (JPEG shards, CUDA), else falls back
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def images_per_step(self) -> int:
        """Images per process and step: batch_size for the random sampler, P x M for class_balanced."""
        return self.batch_size if self.sampler == "random" else self.classes_per_batch * self.images_per_class


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnetv2_b0"
    pretrained: str | None = None  # local weights file; nothing is downloaded
    init_from: str | None = None  # fine-tune: a run, checkpoint or weights file; fresh step, optimizer and head
    embedding_dim: int = 512
    image_size: int = 112
    bn: Literal["batch", "sync", "frozen"] = "batch"
    input_norm: Literal["none", "retinex", "equalize"] = "none"  # lighting normalisation inside the model (model.py)
    neck: Literal["pool", "gdc"] = "pool"  # how the feature map becomes a vector: average, or learned per position
    input_scale: float = 1.0  # the backbone sees the image this many times larger (bilinear, inside the model)
    channels_last: bool = False
    compile: bool = False


@dataclass
class LossConfig:
    pair: Literal["none", "triplet", "contrastive", "multi_similarity"] = "triplet"
    pair_margin: float = 0.1
    miner: Literal["none", "hard", "semihard"] = "none"
    head: Literal["none", "arcface", "cosface", "sphereface", "adacos_fixed", "adacos", "combined"] = "none"
    scale: float = 64.0
    margin: float | None = None  # not set: the head's paper value (HEAD_PAPER_MARGINS)
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    easy_margin: bool = False
    sample_rate: float = 1.0
    head_weight: float = 1.0
    pair_weight: float = 1.0
    head_lr_scale: float = 1.0
    adarand: bool = False
    adarand_lambda: float = 1.0


@dataclass
class OptimConfig:
    name: Literal["radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree", "adamw_cosine", "sgd"] = (
        "radam_schedulefree"
    )
    lr: float = 1e-4
    weight_decay: float | None = None  # not set: 5e-4 for sgd (arcface_torch's), else 0
    warmup_steps: int = 0
    backbone_lr_scale: float = 1.0  # the pretrained backbone's lr = lr x this; the neck gets lr
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd and sgd_schedulefree
    nesterov: bool = False  # sgd
    schedule: Literal["polynomial", "cosine"] = "polynomial"  # sgd, after the linear warmup
    power: float = 2.0  # sgd's polynomial decay: lr x (1 - progress) ** power, arcface_torch's PolynomialLRWarmup
    grad_clip: float = 0.0  # global L2 norm; 0 disables
    ema_decay: float = (
        0.0  # evaluate and export a moving average of the weights (decay warmed up, optim.py); 0 disables
    )


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_nonfinite_steps: int = 10  # consecutive skipped steps before training stops
    timeout_s: int = 300  # collective timeout: a rank waiting longer on a dead peer exits with an error


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 disables periodic checkpoints (the final one is always written)
    keep: int = 3


@dataclass
class EvalConfig:
    every: int = 500  # steps; 0 disables
    max_images: int = 0  # 0: the whole validation split
    batch_size: int = 64
    bn_recal_batches: int = 8  # ScheduleFree: batches to re-estimate BN statistics at the eval weights
    projector_points: int = 1000  # TensorBoard projector, last evaluation only: a seeded subset; 0 disables
    timeout_s: int = 3600  # other ranks wait this long for the main one's share (report, plots, TensorBoard)
    bins: list[str] = field(
        default_factory=list
    )  # verification .bin sets (lfw.bin, ...): `<set>_acc` every `every` steps
    flip: bool = False  # flip test-time augmentation (image + mirror), recorded in the checkpoint: the default of
    #                     facedist-eval / -embed / -compare for it (--flip / --no-flip override)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/demo"

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples to lists, so that the dict round-trips through YAML and JSON unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ArcFace (Deng et al. 2019) m = 0.5, CosFace (Wang et al. 2018) m = 0.35, SphereFace (Liu et al. 2017) m = 4;
# the AdaCos heads have no margin and `combined` uses m1/m2/m3, so loss.margin stays unset (None) for them
HEAD_PAPER_MARGINS = {"arcface": 0.5, "cosface": 0.35, "sphereface": 4.0}

YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a field's type annotation; convert YAML/CLI scalars where unambiguous."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false and yes/on/true as booleans
            value = next((word for word in YAML_BOOL_WORDS[value] if word in args), value)
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, args[0], v) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key}: expected a mapping of {', '.join(sorted(f.name for f in dataclasses.fields(current)))}"
                )
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, hints[name], value))


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _fill_dependent_defaults(cfg: Config) -> None:
    """Keys whose default depends on another key: None ("not set") becomes the value actually used."""
    if cfg.optim.weight_decay is None:
        cfg.optim.weight_decay = 5e-4 if cfg.optim.name == "sgd" else 0.0
    if cfg.loss.margin is None:
        cfg.loss.margin = HEAD_PAPER_MARGINS.get(cfg.loss.head)


def _validate(cfg: Config) -> None:
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.classes_per_batch": cfg.data.classes_per_batch,
        "data.images_per_class": cfg.data.images_per_class,
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.image_size": cfg.model.image_size,
        "train.max_steps": cfg.train.max_steps,
        "train.log_every": cfg.train.log_every,
        "optim.lr": cfg.optim.lr,
        "checkpoint.keep": cfg.checkpoint.keep,
        "eval.batch_size": cfg.eval.batch_size,
        "train.timeout_s": cfg.train.timeout_s,
        "eval.timeout_s": cfg.eval.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    for key, value in {
        "data.num_workers": cfg.data.num_workers,
        "checkpoint.every": cfg.checkpoint.every,
        "eval.every": cfg.eval.every,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay,
        "eval.projector_points": cfg.eval.projector_points,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: must be in [0, 1) (0 disables), got {cfg.optim.ema_decay}")
    if cfg.optim.ema_decay > 0 and cfg.optim.name in ("radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree"):
        raise ConfigError(
            f"optim.ema_decay: {cfg.optim.name} already evaluates an average of its weights; set 0 "
            "or use adamw_cosine or sgd"
        )
    if not 1.0 <= cfg.model.input_scale <= 4.0:
        raise ConfigError(
            f"model.input_scale: must be in [1, 4] (to shrink images, lower model.image_size), "
            f"got {cfg.model.input_scale}"
        )
    if not 0.0 < cfg.optim.backbone_lr_scale <= 1.0:
        raise ConfigError(f"optim.backbone_lr_scale: must be in (0, 1], got {cfg.optim.backbone_lr_scale}")
    if not 0.0 < cfg.loss.sample_rate <= 1.0:
        raise ConfigError(f"loss.sample_rate: must be in (0, 1], got {cfg.loss.sample_rate}")
    if cfg.loss.pair == "none" and cfg.loss.head == "none":
        raise ConfigError("loss.pair and loss.head are both 'none': choose at least one loss")
    if cfg.loss.pair != "none" and cfg.data.images_per_class < 2:
        raise ConfigError(
            f"data.images_per_class: pair losses need >= 2 images per class, got {cfg.data.images_per_class}"
        )
    if cfg.loss.miner != "none" and cfg.loss.pair != "triplet":
        raise ConfigError(f"loss.miner={cfg.loss.miner}: mines triplets for loss.pair=triplet, not {cfg.loss.pair}")
    if cfg.loss.adarand and not (cfg.model.pretrained or cfg.model.init_from):
        raise ConfigError(
            "loss.adarand: regularises fine-tuning toward pretrained features; set model.pretrained or model.init_from"
        )
    if cfg.data.sampler == "random" and cfg.loss.pair != "none":
        raise ConfigError(
            f"data.sampler=random with loss.pair={cfg.loss.pair}: uniform batches hold few positive "
            "pairs; use data.sampler=class_balanced for pair losses"
        )
    if cfg.model.pretrained and cfg.model.init_from:
        raise ConfigError(
            "model.pretrained and model.init_from are both set: init_from replaces the pretrained weights; set one"
        )
    if cfg.optim.name == "radam_schedulefree" and cfg.optim.warmup_steps > 0:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps}: radam_schedulefree has no warm-up (RAdam's "
            "rectification is its warm-up); set 0 or use adamw_schedulefree, sgd_schedulefree or adamw_cosine"
        )
    if cfg.loss.head in HEAD_PAPER_MARGINS and cfg.loss.margin is None:
        raise ConfigError(
            f"loss.margin: loss.head={cfg.loss.head} needs a margin (its paper's: {HEAD_PAPER_MARGINS[cfg.loss.head]})"
        )
    names = [Path(path).stem for path in cfg.eval.bins]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.bins: two sets share a name ({', '.join(names)}); each logs as <file stem>_acc")
    if cfg.eval.bins and cfg.eval.every == 0:
        raise ConfigError("eval.bins: evaluated every eval.every steps, but eval.every is 0")
    augment = cfg.data.augment
    if not 0.0 < augment.crop_scale_min <= 1.0:
        raise ConfigError(f"data.augment.crop_scale_min: must be in (0, 1], got {augment.crop_scale_min}")
    for name in ("translate", "rotation", "brightness", "contrast", "saturation", "gamma", "shading"):
        if getattr(augment, name) < 0:
            raise ConfigError(f"data.augment.{name}: must be >= 0 (0 disables), got {getattr(augment, name)}")
    if augment.shading > 1:
        raise ConfigError(
            f"data.augment.shading: must be <= 1 (the dark side's factor is 1 - shading), got {augment.shading}"
        )
    if augment.gamma >= 1:
        raise ConfigError(
            f"data.augment.gamma: must be < 1 (the exponent is drawn in [1 - gamma, 1 + gamma]), got {augment.gamma}"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides, then dependent defaults, then validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _apply(cfg, values)
    for item in overrides:
        _apply(cfg, _parse_override(item))
    _fill_dependent_defaults(cfg)
    _validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `Config.to_dict()` (e.g. from a checkpoint)."""
    cfg = Config()
    augment = values.get("data", {}).get("augment", {})
    if "color_jitter" in augment:  # checkpoints written before brightness/contrast/saturation had their own keys
        augment = {**augment, **dict.fromkeys(("brightness", "contrast", "saturation"), augment["color_jitter"])}
        del augment["color_jitter"]
        values = {**values, "data": {**values["data"], "augment": augment}}
    _apply(cfg, values)
    _fill_dependent_defaults(cfg)
    return cfg
