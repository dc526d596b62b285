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


def _require(key: str, value: Any, ok: bool, rule: str) -> None:
    """One line naming the key, the rule it breaks and the value given."""
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {value}")


def _require_positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        _require(f"{section}.{name}", getattr(obj, name), getattr(obj, name) > 0, "> 0")


def _require_non_negative(section: str, obj: Any, names: tuple[str, ...]) -> None:
    """None passes: a key not set yet, whose default depends on another (`_fill_dependent_defaults`)."""
    for name in names:
        value = getattr(obj, name)
        _require(f"{section}.{name}", value, value is None or value >= 0, ">= 0")


@dataclass
class AugmentConfig:
    """Training augmentation. Face-aware defaults (aligned faces): mirror only; no aspect change, no black corners
    (replicated border). Geometry is one affine warp per image on the CPU; the photometric factors apply on the
    training device. Every draw is keyed by (train.seed, step, position in the global batch): same views for any W.
    """

    hflip: bool = True  # mirror left-right with probability 0.5
    crop_scale_min: float = 1.0  # square crop of area fraction uniform in [crop_scale_min, 1] (zoom in); (0, 1]
    translate: float = 0.0  # shift uniform in +-translate x the image side, on each axis; >= 0
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]; >= 0
    brightness: float = 0.0  # factor uniform in [max(0, 1 - brightness), 1 + brightness]; >= 0, 0 disables
    contrast: float = 0.0  # same range, blending with the image's mean grey level; >= 0, 0 disables
    saturation: float = 0.0  # same range, blending with the pixel's grey level; >= 0, 0 disables
    gamma: float = 0.0  # exponent uniform in [1 - gamma, 1 + gamma] (a uint8 lookup table); [0, 1), 0 disables
    # light from one side, at a random angle: x (1 + s * ramp -1 -> 1 across the face), s uniform in [0, shading]
    shading: float = 0.0  # [0, 1] (the dark side's factor is 1 - s); 0 disables

    def validate(self) -> None:
        _require("data.augment.crop_scale_min", self.crop_scale_min, 0.0 < self.crop_scale_min <= 1.0, "in (0, 1]")
        for name in ("translate", "rotation", "brightness", "contrast", "saturation", "gamma", "shading"):
            value = getattr(self, name)
            _require(f"data.augment.{name}", value, value >= 0, ">= 0 (0 disables)")
        _require(
            "data.augment.shading", self.shading, self.shading <= 1, "<= 1 (the dark side's factor is 1 - shading)"
        )
        gamma_rule = "< 1 (the exponent is drawn in [1 - gamma, 1 + gamma])"
        _require("data.augment.gamma", self.gamma, self.gamma < 1, gamma_rule)


@dataclass
class DataConfig:
    """The training and validation images: which shards, and how batches are drawn from them."""

    shards: str = "shards/synth"  # folder written by `facedist-shards build` (manifest.json and the shard files)
    split_train: str = "train"  # the manifest's split to train on
    split_val: str = "val"  # the manifest's split evaluated every eval.every steps
    # class_balanced: P identities x M images per process (pair losses); random: images uniform (margin heads)
    sampler: Literal["class_balanced", "random"] = "class_balanced"
    classes_per_batch: int = 8  # P: identities per process and step (class_balanced; global batch W x P x M); >= 1
    images_per_class: int = 4  # M: images of each identity per step (class_balanced); >= 1, >= 2 for a pair loss
    batch_size: int = 128  # images per process and step (random sampler); >= 1
    num_workers: int = 2  # DataLoader worker processes per rank (read, decode, warp); 0: in the main process
    # where JPEGs are decoded: cpu (the workers), gpu (nvJPEG + warp on the device; JPEG shards on CUDA, else cpu)
    decode: Literal["cpu", "gpu"] = "cpu"
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation (AugmentConfig)

    def images_per_step(self) -> int:
        """Images per process and step: batch_size for the random sampler, P x M for class_balanced."""
        return self.batch_size if self.sampler == "random" else self.classes_per_batch * self.images_per_class

    def validate(self) -> None:
        _require_positive("data", self, ("batch_size", "classes_per_batch", "images_per_class"))
        _require_non_negative("data", self, ("num_workers",))
        self.augment.validate()


@dataclass
class ModelConfig:
    """The embedding network: backbone, neck, input size and normalisation."""

    # a timm model name, or a face backbone of facedist.backbones (iresnet18..200, iresnet18_narrow, mobilefacenet)
    backbone: str = "tf_efficientnetv2_b0"
    pretrained: str | None = None  # local backbone weights file loaded at start; nothing is downloaded; None: random
    init_from: str | None = None  # fine-tune: a run, checkpoint or weights file; fresh step, optimizer and head
    embedding_dim: int = 512  # length of the embedding vector (the neck's output); >= 1
    image_size: int = 112  # side in pixels of the square model input (images are resized to it); 112 for faces
    # BatchNorm: batch (each process's batch statistics), sync (across ranks; GPUs only), frozen (running statistics)
    bn: Literal["batch", "sync", "frozen"] = "batch"
    # lighting normalisation inside the model (model.py): retinex (divides out slow shading), equalize (grey histogram)
    input_norm: Literal["none", "retinex", "equalize"] = "none"
    neck: Literal["pool", "gdc"] = "pool"  # how the feature map becomes a vector: average, or learned per position
    input_scale: float = 1.0  # the backbone sees the image this many times larger (bilinear, inside the model); [1, 4]
    channels_last: bool = False  # NHWC memory format (faster convolutions on tensor-core GPUs)
    compile: bool = False  # torch.compile the model (the first steps are slower while it compiles)

    def validate(self) -> None:
        _require_positive("model", self, ("embedding_dim", "image_size"))
        scale_rule = "in [1, 4] (to shrink images, lower model.image_size)"
        _require("model.input_scale", self.input_scale, 1.0 <= self.input_scale <= 4.0, scale_rule)
        if self.pretrained and self.init_from:
            raise ConfigError(
                "model.pretrained and model.init_from are both set: init_from replaces the pretrained weights; set one"
            )


@dataclass
class LossConfig:
    """The training objective: pair_weight x pair loss + head_weight x margin-head loss (+ AdaRand).

    A margin head (heads/margins.py) replaces the target logit s x cos(theta) by s x f(theta), theta the angle
    between the embedding and its class centre: arcface cos(theta + m), cosface cos(theta) - m, sphereface
    A-Softmax's psi(m x theta), combined InsightFace's cos(m1 x theta + m2) - m3 (arcface = (1, m, 0),
    cosface = (1, 0, m)). The AdaCos heads have no margin and set s themselves."""

    pair: Literal["none", "triplet", "contrastive", "multi_similarity"] = "triplet"  # pair loss over the global batch
    # cosine margin: triplet relu(s_an - s_ap + margin); contrastive: negatives pushed below it; multi_similarity: none
    pair_margin: float = 0.1
    # triplets counted: none (all with s_an > s_ap - margin), semihard (those with s_an < s_ap), hard (s_an >= s_ap)
    miner: Literal["none", "hard", "semihard"] = "none"
    # margin softmax over every identity, its class centres sharded across ranks; none: pair loss only
    head: Literal["none", "arcface", "cosface", "sphereface", "adacos_fixed", "adacos", "combined"] = "none"
    scale: float = 64.0  # s, the logits' scale (s x cosine); ignored by the AdaCos heads; > 0
    # arcface: added to the angle (radians); cosface: taken from the cosine; sphereface: integer >= 1; unset: paper's
    margin: float | None = None
    m1: float = 1.0  # combined head: angle multiplier in cos(m1 x theta + m2) - m3; > 0, 1 for none
    m2: float = 0.5  # combined head: added to the angle, radians (ArcFace's m); 0 for none
    m3: float = 0.0  # combined head: taken from the cosine (CosFace's m); 0 for none
    # arcface, combined: margin only where cos(theta) > 0, cos - m3 elsewhere (not the fallback past m1 x theta+m2=pi)
    easy_margin: bool = False
    # share of the C classes in each step's softmax (Partial FC: the batch's + random); (0, 1]; < 1: not ScheduleFree
    sample_rate: float = 1.0
    head_weight: float = 1.0  # weight of the margin-head loss in the total; >= 0
    pair_weight: float = 1.0  # weight of the pair loss in the total; >= 0
    head_lr_scale: float = 1.0  # the head's (and AdaRand's class means') lr = optim.lr x this; > 0
    # AdaRand (Yamaguchi et al. 2024) fine-tuning regulariser: pull features to draws of per-class Gaussians
    adarand: bool = False
    adarand_lambda: float = 1.0  # AdaRand's weight: lambda x mean ||feature - draw||^2 / D; >= 0

    def validate(self) -> None:
        _require_positive("loss", self, ("scale", "head_lr_scale"))
        _require_non_negative("loss", self, ("head_weight", "pair_weight", "adarand_lambda"))
        _require("loss.sample_rate", self.sample_rate, 0.0 < self.sample_rate <= 1.0, "in (0, 1]")
        if self.pair == "none" and self.head == "none":
            raise ConfigError("loss.pair and loss.head are both 'none': choose at least one loss")
        if self.miner != "none" and self.pair != "triplet":
            raise ConfigError(f"loss.miner={self.miner}: mines triplets for loss.pair=triplet, not {self.pair}")


SCHEDULE_FREE = ("radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree")


@dataclass
class OptimConfig:
    """The optimizer of the backbone and neck; the head and AdaRand get the same family (heads/optim.py)."""

    # ScheduleFree RAdam, AdamW or SGD (no schedule); AdamW + warmup + cosine; SGD + warmup + `schedule`
    name: Literal["radam_schedulefree", "adamw_schedulefree", "sgd_schedulefree", "adamw_cosine", "sgd"] = (
        "radam_schedulefree"
    )
    lr: float = 1e-4  # peak learning rate; > 0
    weight_decay: float | None = None  # weight decay coefficient; not set: 5e-4 for sgd (arcface_torch's), else 0; >= 0
    warmup_steps: int = 0  # linear warm-up from 0 to lr, steps (not radam_schedulefree: RAdam warms up itself); >= 0
    backbone_lr_scale: float = 1.0  # the pretrained backbone's lr = lr x this; the neck gets lr; (0, 1]
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decays (RAdam, AdamW); each in [0, 1)
    momentum: float = 0.9  # sgd and sgd_schedulefree; [0, 1)
    nesterov: bool = False  # Nesterov momentum (sgd)
    schedule: Literal["polynomial", "cosine"] = "polynomial"  # sgd's lr decay to 0 at max_steps, after the warmup
    power: float = 2.0  # sgd's polynomial decay: lr x (1 - progress) ** power, arcface_torch's PolynomialLRWarmup
    grad_clip: float = 0.0  # largest global L2 norm of the gradients (backbone and head together); 0 disables
    # evaluate and export a moving average of the weights (decay warmed up, optim.py); [0, 1), 0 disables
    ema_decay: float = 0.0

    def validate(self) -> None:
        _require_positive("optim", self, ("lr",))
        _require_non_negative("optim", self, ("warmup_steps", "grad_clip", "weight_decay"))
        _require("optim.ema_decay", self.ema_decay, 0.0 <= self.ema_decay < 1.0, "in [0, 1) (0 disables)")
        _require("optim.backbone_lr_scale", self.backbone_lr_scale, 0.0 < self.backbone_lr_scale <= 1.0, "in (0, 1]")
        _require("optim.betas", list(self.betas), all(0.0 <= beta < 1.0 for beta in self.betas), "each in [0, 1)")
        _require("optim.momentum", self.momentum, 0.0 <= self.momentum < 1.0, "in [0, 1)")
        if self.ema_decay > 0 and self.name in SCHEDULE_FREE:
            raise ConfigError(
                f"optim.ema_decay: {self.name} already evaluates an average of its weights; set 0 "
                "or use adamw_cosine or sgd"
            )
        if self.name == "radam_schedulefree" and self.warmup_steps > 0:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps}: radam_schedulefree has no warm-up (RAdam's "
                "rectification is its warm-up); set 0 or use adamw_schedulefree, sgd_schedulefree or adamw_cosine"
            )


@dataclass
class TrainConfig:
    """The run itself: length, seed, logging, precision and failure limits."""

    max_steps: int = 1000  # optimizer steps of the whole run (a resumed run continues to it); >= 1
    seed: int = 0  # seeds the initial weights, batch order, augmentation and the head's class sampling; >= 0
    log_every: int = 10  # steps between logged losses (the only steps that read values back to the host); >= 1
    # no: fp32; bf16: autocast; fp16: autocast and loss scaling (GPU only, not with DeepSpeed)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_nonfinite_steps: int = 10  # consecutive skipped steps (non-finite loss or gradient) before stopping; >= 1
    timeout_s: int = 300  # collective timeout, seconds: a rank waiting longer on a dead peer exits with an error

    def validate(self) -> None:
        _require_positive("train", self, ("max_steps", "log_every", "timeout_s", "max_nonfinite_steps"))
        _require_non_negative("train", self, ("seed",))


@dataclass
class CheckpointConfig:
    """Periodic checkpoints under output_dir/checkpoints (resumable on any world size)."""

    every: int = 500  # steps; 0 disables periodic checkpoints (the final one is always written)
    keep: int = 3  # the newest checkpoints kept on disk; older ones are deleted; >= 1

    def validate(self) -> None:
        _require_positive("checkpoint", self, ("keep",))
        _require_non_negative("checkpoint", self, ("every",))


@dataclass
class EvalConfig:
    """Verification on data.split_val (and eval.bins) during training, at the evaluation weights."""

    every: int = 500  # steps between evaluations (and at the last step); 0 disables
    max_images: int = 0  # evaluate the split's first max_images images; 0: the whole validation split
    batch_size: int = 64  # images per process and evaluation batch; >= 1
    bn_recal_batches: int = 8  # ScheduleFree: batches to re-estimate BN statistics at the eval weights; 0: none
    projector_points: int = 1000  # TensorBoard projector, last evaluation only: a seeded subset; 0 disables
    timeout_s: int = 3600  # seconds other ranks wait for the main one's share (report, plots, TensorBoard)
    bins: list[str] = field(default_factory=list)  # verification .bin sets (lfw.bin, ...): `<set>_acc` every `every`
    # flip test-time augmentation (image + mirror); recorded in checkpoints as facedist-eval/-embed/-compare's default
    flip: bool = False

    def validate(self) -> None:
        _require_positive("eval", self, ("batch_size", "timeout_s"))
        _require_non_negative("eval", self, ("every", "max_images", "bn_recal_batches", "projector_points"))
        names = [Path(path).stem for path in self.bins]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.bins: two sets share a name ({', '.join(names)}); each logs as <file stem>_acc")
        if self.bins and self.every == 0:
            raise ConfigError("eval.bins: evaluated every eval.every steps, but eval.every is 0")


@dataclass
class Config:
    """A training run: one section per concern, plus where it writes."""

    data: DataConfig = field(default_factory=DataConfig)  # shards, sampler, batch, workers, augmentation
    model: ModelConfig = field(default_factory=ModelConfig)  # backbone, neck, input size and normalisation
    loss: LossConfig = field(default_factory=LossConfig)  # pair loss, margin head, their weights, AdaRand
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer, learning rate and its schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, seed, logging, precision, failure limits
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # how often, how many kept
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation during training
    output_dir: str = "runs/demo"  # the run's folder: checkpoints, TensorBoard logs, evaluation reports

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Each section's own checks, then the rules that join two sections."""
        for section in (self.data, self.model, self.loss, self.optim, self.train, self.checkpoint, self.eval):
            section.validate()
        if self.loss.pair != "none" and self.data.images_per_class < 2:
            raise ConfigError(
                f"data.images_per_class: pair losses need >= 2 images per class, got {self.data.images_per_class}"
            )
        if self.loss.adarand and not (self.model.pretrained or self.model.init_from):
            raise ConfigError(
                "loss.adarand: regularises fine-tuning toward pretrained features; set model.pretrained or "
                "model.init_from"
            )
        if self.data.sampler == "random" and self.loss.pair != "none":
            raise ConfigError(
                f"data.sampler=random with loss.pair={self.loss.pair}: uniform batches hold few positive "
                "pairs; use data.sampler=class_balanced for pair losses"
            )


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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem, its line and column (1-based, as editors count)
    and, when given, where the construct it was reading began."""
    if isinstance(err, yaml.reader.ReaderError):  # a byte that is not UTF-8, or a control character
        return f"{str(err).splitlines()[0]} at character {err.position}"
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        problem += f" at line {mark.line + 1}, column {mark.column + 1}"
    if context_mark is not None:
        problem += f" ({err.context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return problem


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(err)}") from err
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides, then dependent defaults, then validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_bytes()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _apply(cfg, values)
    for item in overrides:
        _apply(cfg, _parse_override(item))
    _fill_dependent_defaults(cfg)
    cfg.validate()
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
