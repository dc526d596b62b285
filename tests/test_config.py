import dataclasses
import inspect
from pathlib import Path

import pytest

from facedist.config import Config, ConfigError, LossConfig, OptimConfig, config_from_dict, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ndata:\n  classes_per_batch: 4\n")
    cfg = load_config(
        path,
        [
            "optim.lr=3e-4",
            "train.max_steps=20",
            "model.pretrained=w.safetensors",
            "optim.betas=[0.8, 0.99]",
            "data.augment.hflip=false",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.classes_per_batch == 4
    assert cfg.train.max_steps == 20
    assert cfg.model.pretrained == "w.safetensors"
    assert list(cfg.optim.betas) == [0.8, 0.99]
    assert cfg.data.augment.hflip is False
    assert cfg.model.backbone == "tf_efficientnetv2_b0" and cfg.model.embedding_dim == 512


def test_round_trip_through_dict():
    cfg = load_config(None, ["loss.head=arcface", "optim.name=adamw_cosine"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.name=adam", "optim.name: 'adam' is not one of radam_schedulefree"),
        ("optim.nme=adamw_cosine", "optim.nme"),
        ("nothing.here=1", "nothing"),
        ("train.max_steps=ten", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps: must be > 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of no, bf16, fp16"),
        ("model.bn=group", "model.bn"),
        ("loss.sample_rate=1.5", "loss.sample_rate"),
        ("optim.backbone_lr_scale=0", "optim.backbone_lr_scale: must be in (0, 1]"),
        ("optim.ema_decay=1", "optim.ema_decay: must be in [0, 1)"),
        ("model.input_norm=clahe", "model.input_norm: 'clahe' is not one of none, retinex, equalize"),
        ("model.neck=flatten", "model.neck: 'flatten' is not one of pool, gdc"),
        ("model.input_scale=0.5", "model.input_scale: must be in [1, 4]"),
        ("optim.lr", "key=value"),
        ("loss.scale=0", "loss.scale: must be > 0, got 0.0"),
        ("loss.head_lr_scale=0", "loss.head_lr_scale: must be > 0"),
        ("loss.pair_weight=-1", "loss.pair_weight: must be >= 0"),
        ("loss.adarand_lambda=-0.5", "loss.adarand_lambda: must be >= 0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas: must be each in [0, 1), got [0.9, 1.0]"),
        ("optim.momentum=1", "optim.momentum: must be in [0, 1)"),
        ("train.seed=-1", "train.seed: must be >= 0"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be > 0"),
        ("eval.max_images=-1", "eval.max_images: must be >= 0"),
        ("eval.bn_recal_batches=-1", "eval.bn_recal_batches: must be >= 0"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(unknown)


def test_both_losses_none_is_refused():
    with pytest.raises(ConfigError, match="loss.pair and loss.head"):
        load_config(None, ["loss.pair=none", "loss.head=none"])
    assert isinstance(load_config(None, ["loss.pair=none", "loss.head=arcface"]), Config)


def test_yaml_boolean_words_mean_the_choice_they_spell(tmp_path):
    """YAML 1.1 reads `no` as false: mixed_precision=no must still be the choice "no"."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16", "train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="loss.pair: True is not one of"):
        load_config(None, ["loss.pair=yes"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.name=sgd"], 5e-4),  # arcface_torch's default for SGD
        (["optim.name=adamw_cosine"], 0.0),
        (["optim.name=sgd", "optim.weight_decay=1e-4"], 1e-4),  # set: kept
        (["optim.name=sgd", "optim.weight_decay=0"], 0.0),
    ],
)
def test_weight_decay_default_depends_on_the_optimizer_and_is_shown(overrides, expected):
    cfg = load_config(None, overrides)
    assert cfg.optim.weight_decay == expected and cfg.to_dict()["optim"]["weight_decay"] == expected


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["data.sampler=random", "loss.pair=triplet", "loss.head=arcface"],
            "data.sampler=random with loss.pair=triplet: uniform batches hold few positive pairs",
        ),
        (["model.pretrained=a.pth", "model.init_from=runs/x"], "model.pretrained and model.init_from are both set"),
        (["data.batch_size=0"], "data.batch_size: must be > 0"),
        (["optim.schedule=step"], "optim.schedule: 'step' is not one of polynomial, cosine"),
    ],
)
def test_recipe_combinations_refused_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_images_per_step_follows_the_sampler():
    assert load_config(None, ["data.classes_per_batch=3", "data.images_per_class=5"]).data.images_per_step() == 15
    cfg = load_config(None, ["data.sampler=random", "data.batch_size=12", "loss.pair=none", "loss.head=arcface"])
    assert cfg.data.images_per_step() == 12


@pytest.mark.parametrize("key", ["brightness", "contrast", "saturation", "gamma", "shading", "rotation", "translate"])
def test_negative_augmentation_strengths_are_refused_in_one_line(key):
    with pytest.raises(ConfigError, match=f"data.augment.{key}: must be >= 0"):
        load_config(overrides=[f"data.augment.{key}=-0.1"])
    with pytest.raises(ConfigError, match="data.augment.gamma: must be < 1"):
        load_config(overrides=["data.augment.gamma=1"])
    with pytest.raises(ConfigError, match="data.augment.shading: must be <= 1"):
        load_config(overrides=["data.augment.shading=1.5"])


def test_checkpoint_configs_with_color_jitter_still_load():
    values = Config().to_dict()
    values["data"]["augment"] = {"hflip": True, "rotation": 15.0, "crop_scale_min": 0.8, "color_jitter": 0.2}
    augment = config_from_dict(values).data.augment
    assert (augment.brightness, augment.contrast, augment.saturation, augment.gamma) == (0.2, 0.2, 0.2, 0.0)


@pytest.mark.parametrize("head, margin", [("arcface", 0.5), ("cosface", 0.35), ("sphereface", 4.0), ("adacos", None)])
def test_unset_margin_is_the_heads_paper_value_and_shown_in_to_dict(head, margin):
    cfg = load_config(None, [f"loss.head={head}"])
    assert cfg.loss.margin == margin and cfg.to_dict()["loss"]["margin"] == margin
    assert load_config(None, [f"loss.head={head}", "loss.margin=0.2"]).loss.margin == 0.2  # given: kept
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.warmup_steps=100"], "optim.warmup_steps=100: radam_schedulefree has no warm-up"),
        (["optim.ema_decay=0.99"], "optim.ema_decay: radam_schedulefree already evaluates an average"),
        (["data.augment.rotation=-5"], "data.augment.rotation: must be >= 0"),
        (["eval.projector_points=-1"], "eval.projector_points: must be >= 0"),
        (["eval.timeout_s=0"], "eval.timeout_s: must be > 0"),
    ],
)
def test_silently_ignored_values_are_refused(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert load_config(None, ["optim.name=adamw_cosine", "optim.warmup_steps=100"]).optim.warmup_steps == 100


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)  # unknown keys and out-of-range values are refused
    assert cfg.train.max_steps > 0


@pytest.mark.parametrize(
    "text, where",
    [
        ("model:\n  backbone: [unclosed\n", "line 3, column 1 (while parsing a flow sequence at line 2, column 13)"),
        ("model:\n\tbackbone: resnet18\n", "found character '\\t' that cannot start any token at line 2, column 1"),
        ("optim:\n  lr: 1e-3: 2\n", "mapping values are not allowed here at line 2, column 11"),
    ],
)
def test_a_yaml_syntax_error_names_the_file_line_and_column_in_one_line(tmp_path, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: not valid YAML: ") and where in message and "\n" not in message


def test_a_bad_override_value_or_unreadable_bytes_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.betas=[0.8, 0.9"])
    assert str(err.value).startswith("override 'optim.betas=[0.8, 0.9': the value is not valid YAML: expected ','")
    assert "\n" not in str(err.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\n  backbone: \xff\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: not valid YAML: .* at character 19$"):
        load_config(binary)


def _described(cls: type) -> list[str]:
    """The fields of a config dataclass with no comment on their line or the line above."""
    lines, _ = inspect.getsourcelines(cls)
    missing = []
    for f in dataclasses.fields(cls):
        row = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
        if "  # " not in lines[row] and not lines[row - 1].strip().startswith("#"):
            missing.append(f"{cls.__name__}.{f.name}")
        if dataclasses.is_dataclass(f.default_factory):  # a section: its own fields too
            missing += _described(f.default_factory)
    return missing


def test_every_config_field_says_what_it_is():
    assert _described(Config) == []


def test_a_section_checks_itself():
    with pytest.raises(ConfigError, match="loss.pair and loss.head are both 'none'"):
        LossConfig(pair="none", head="none").validate()
    with pytest.raises(ConfigError, match="radam_schedulefree has no warm-up"):
        OptimConfig(warmup_steps=10).validate()
    LossConfig().validate()
