from __future__ import annotations

import json
from pathlib import Path

import pytest

from dogbench import heads
from dogbench.config import (
    DEFAULT_BACKBONES,
    HEAD_KINDS,
    BackboneConfig,
    ConfigError,
    DataConfig,
    FeatureConfig,
    Precision,
    RunConfig,
    TuneConfig,
    load_config,
    parse_backbone_spec,
    parse_value,
    resolve,
    saved_to_doc,
)

FULL_TOML = """
# dogbench run --config this.toml
out = "runs/demo"

[data]
root = "/data/dogs"
crop_to_box = true
val_fraction = 0.25

[features]
batch_size = 16
precision = "fp32"

[backbones.cnn]
model = "resnet50_a1"
weights = "weights/resnet.safetensors"

[backbones.vit]
model = "vit_small_patch14_dinov2"
img_size = 224
dynamic_img_size = true
crop_pct = 1.0
interpolation = "bilinear"
mean = [0.5, 0.5, 0.5]

[tune]
trials = 12
heads = ["mlp"]
"""


def _write_toml(tmp_path: Path, text: str = FULL_TOML) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_head_kinds_match_heads_module() -> None:
    assert HEAD_KINDS == heads.HEAD_KINDS


def test_defaults_are_the_two_reference_backbones() -> None:
    cfg = resolve({})
    assert [(b.label, b.model, b.weights) for b in cfg.backbones] == [
        ("vit", "vit_s16", "hub"),
        ("resnet", "resnet50", "hub"),
    ]
    assert tuple((b.label, b.model) for b in cfg.backbones) == DEFAULT_BACKBONES
    assert cfg.data == DataConfig() and cfg.features == FeatureConfig() and cfg.tune == TuneConfig()


def test_toml_file_resolves_every_section(tmp_path: Path) -> None:
    cfg = resolve(load_config(_write_toml(tmp_path)))

    assert cfg.out == "runs/demo"
    assert cfg.data.root == "/data/dogs" and cfg.data.crop_to_box is True and cfg.data.val_fraction == 0.25
    assert cfg.features.batch_size == 16 and cfg.features.precision is Precision.FP32
    assert cfg.tune.trials == 12 and cfg.tune.heads == ("mlp",)
    cnn, vit = cfg.backbones
    # relative input paths are taken relative to the config file's folder
    assert cnn == BackboneConfig(label="cnn", model="resnet50_a1", weights=str(tmp_path / "weights/resnet.safetensors"))
    assert vit.label == "vit" and vit.model == "vit_small_patch14_dinov2" and vit.weights == "hub"
    # Model kwargs go to timm.create_model; preprocessing keys go to their own fields.
    assert dict(vit.model_kwargs) == {"img_size": 224, "dynamic_img_size": True}
    assert vit.crop_pct == 1.0 and vit.interpolation == "bilinear" and vit.mean == (0.5, 0.5, 0.5)
    assert vit.input_size is None and vit.std is None


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    assert load_config(None) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = _write_toml(tmp_path, "[tune\ntrials = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_backbone_spec_with_weights_and_kwargs() -> None:
    b = parse_backbone_spec("vit=vit_small_patch14_dinov2@w.safetensors,img_size=224")
    assert b.label == "vit" and b.model == "vit_small_patch14_dinov2"
    assert b.weights == str(Path.cwd() / "w.safetensors")  # stored absolute
    assert dict(b.model_kwargs) == {"img_size": 224}

    plain = parse_backbone_spec("cnn=resnet50")
    assert plain == BackboneConfig(label="cnn", model="resnet50", weights="hub")

    pre = parse_backbone_spec("v=vit_s16@random,crop_pct=0.9,interpolation=bicubic")
    assert pre.weights == "random" and pre.crop_pct == 0.9 and pre.interpolation == "bicubic"
    assert dict(pre.model_kwargs) == {}


@pytest.mark.parametrize("spec", ["resnet50", "=resnet50", "cnn=", "cnn=resnet50,img_size"])
def test_bad_backbone_spec_shows_the_syntax(spec: str) -> None:
    with pytest.raises(ConfigError, match="expected"):
        parse_backbone_spec(spec)


def test_backbone_specs_replace_the_file_backbones(tmp_path: Path) -> None:
    cfg = resolve(load_config(_write_toml(tmp_path)), backbone_specs=["a=resnet10t@random", "b=test_vit@random"])
    assert [(b.label, b.model, b.weights) for b in cfg.backbones] == [
        ("a", "resnet10t", "random"),
        ("b", "test_vit", "random"),
    ]


def test_overrides_are_parsed_as_toml_literals() -> None:
    cfg = resolve(
        {"tune": {"trials": 40}},
        overrides=[
            "tune.trials=5",
            'features.precision="bf16"',
            "features.cache_dir=/tmp/c",
            "tune.heads=linear",
            "data.val_fraction=0.1",
            "out=runs/x",
        ],
    )
    assert cfg.tune.trials == 5
    assert cfg.features.precision is Precision.BF16
    assert cfg.features.cache_dir == "/tmp/c"
    assert cfg.tune.heads == ("linear",)
    assert cfg.data.val_fraction == 0.1
    assert cfg.out == "runs/x"


def test_overrides_do_not_mutate_the_callers_dict() -> None:
    doc = {"tune": {"trials": 40}}
    resolve(doc, overrides=["tune.trials=5"])
    assert doc == {"tune": {"trials": 40}}


def test_override_of_a_backbone_key() -> None:
    doc = {"backbones": {"vit": {"model": "test_vit"}}}
    cfg = resolve(doc, overrides=["backbones.vit.img_size=64", "backbones.vit.crop_pct=0.5"])
    assert dict(cfg.backbones[0].model_kwargs) == {"img_size": 64} and cfg.backbones[0].crop_pct == 0.5


@pytest.mark.parametrize("override", ["trials=5", "tune.trials", "=5"])
def test_bad_override_syntax(override: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        resolve({}, overrides=[override])


def test_parse_value_falls_back_to_string() -> None:
    assert parse_value("5") == 5
    assert parse_value("3e-4") == pytest.approx(3e-4)
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value('"x"') == "x"
    assert parse_value("bf16") == "bf16"


def test_unknown_section_key_suggests_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        resolve({"tune": {"trails": 5}})
    message = str(err.value)
    assert "'trails'" in message and "[tune]" in message
    assert "Did you mean 'trials'?" in message
    for name in ("trials", "timeout_s", "heads", "max_epochs", "storage", "seed", "baseline"):
        assert name in message


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'features'") as err:
        resolve({"feature": {"batch_size": 3}})
    assert "backbones" in str(err.value)


def test_unknown_key_via_override() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        resolve({}, overrides=["features.batchsize=3"])


def test_bad_precision_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        resolve({}, overrides=["features.precision=fp8"])
    message = str(err.value)
    assert "fp8" in message
    for choice in Precision:
        assert choice.value in message


def test_duplicate_backbone_labels_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        resolve({}, backbone_specs=["a=resnet50", "a=vit_s16"])


def test_backbone_table_needs_a_model() -> None:
    with pytest.raises(ConfigError, match="'model'"):
        resolve({"backbones": {"vit": {"weights": "random"}}})


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.val_fraction=1.0", "val_fraction"),
        ("features.batch_size=0", "batch_size"),
        ("features.chunk_size=0", "chunk_size"),
        ("tune.trials=-1", "trials"),
        ("tune.heads=['linear', 'svm']", "linear, mlp"),
    ],
)
def test_validation_names_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve({}, overrides=[override])


@pytest.mark.parametrize("override", ["tune.trials=five", "data.val_fraction=abc", "features.batch_size=big"])
def test_wrongly_typed_value_is_a_config_error(override: str) -> None:
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(ConfigError, match=key):
        resolve({}, overrides=[override])


def test_to_dict_round_trips_through_saved_to_doc(tmp_path: Path) -> None:
    cfg = resolve(
        load_config(_write_toml(tmp_path)),
        overrides=["tune.trials=5", 'features.precision="bf16"', "data.split_seed=3", "evaluate.n_bootstrap=10"],
    )
    assert cfg.backbones[1].mean == (0.5, 0.5, 0.5)  # a tuple field, stored as a JSON list
    saved = json.loads(json.dumps(cfg.to_dict()))
    again = resolve(saved_to_doc(saved))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_round_trip_of_defaults_and_specs() -> None:
    for cfg in (resolve({}), resolve({}, backbone_specs=["v=test_vit@random,img_size=32,crop_pct=0.8"])):
        assert resolve(saved_to_doc(json.loads(json.dumps(cfg.to_dict())))) == cfg


def test_save_writes_json_atomically(tmp_path: Path) -> None:
    cfg = resolve({}, overrides=["tune.trials=3"])
    path = tmp_path / "run" / "config.json"
    path.parent.mkdir()
    path.write_text("stale")
    cfg.save(path)
    saved = json.loads(path.read_text())
    assert saved == cfg.to_dict()
    assert saved["tune"]["trials"] == 3 and saved["features"]["precision"] == "auto"
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_save_failure_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dogbench.atomic

    path = tmp_path / "config.json"
    path.write_text("previous")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dogbench.atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        resolve({}).save(path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_box_ablation_twins_every_backbone_once() -> None:
    from dogbench.config import crops_to_box, with_box_ablation

    cfg = resolve({"data": {"crop_to_box": True, "box_ablation": True}},
                  backbone_specs=["cnn=resnet18@random", "vit=vit_s16@random"])
    assert [(b.label, b.crop_to_box) for b in cfg.backbones] == [
        ("cnn", True), ("cnn-whole", False), ("vit", True), ("vit-whole", False)]
    assert [crops_to_box(cfg, b) for b in cfg.backbones] == [True, False, True, False]
    assert with_box_ablation(cfg) == cfg  # idempotent: the saved config resolves to itself
    again = resolve(saved_to_doc(cfg.to_dict()))
    assert again.backbones == cfg.backbones
    plain = resolve({"data": {"box_ablation": True}}, backbone_specs=["cnn=resnet18@random"])
    assert [(b.label, b.crop_to_box) for b in plain.backbones] == [("cnn", False), ("cnn-box", True)]
    off = resolve({}, backbone_specs=["cnn=resnet18@random"])
    assert [b.crop_to_box for b in off.backbones] == [None] and not crops_to_box(off, off.backbones[0])


def test_an_unknown_pruner_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown tune.pruner 'asha'. Valid pruners: halving, hyperband"):
        resolve({"tune": {"pruner": "asha"}})


def test_data_classes_is_a_count_or_names() -> None:
    assert resolve({"data": {"classes": 20}}).data.classes == 20
    assert resolve({"data": {"classes": ["pug", "akita"]}}).data.classes == ("pug", "akita")
    assert resolve({"data": {"classes": "pug, akita"}}).data.classes == ("pug", "akita")  # --classes pug,akita
    assert resolve({"data": {"classes": "20"}}).data.classes == 20  # --classes 20
    assert resolve({}).data.classes is None
    with pytest.raises(ConfigError, match="data.classes must name at least 2 classes"):
        resolve({"data": {"classes": 1}})


def test_closed_choices_are_str_enums_saved_as_their_plain_values() -> None:
    from dogbench.config import DECODERS, FINETUNE_METHODS, FROZEN, METHODS, PRUNERS, Decoder, Method, Pruner

    assert (METHODS, FINETUNE_METHODS, PRUNERS, DECODERS) == (
        ("frozen", "lora", "partial", "full", "lp-ft"), ("lora", "partial", "full", "lp-ft"),
        ("halving", "hyperband", "median", "none"), ("auto", "pil"))
    assert FROZEN == "frozen" and all(type(v) is str for v in (*METHODS, *PRUNERS, *DECODERS, *HEAD_KINDS))
    cfg = resolve({}, overrides=["finetune.methods=lora,lp-ft", "tune.pruner=median", "features.decoder=pil"])
    assert cfg.finetune.methods == (Method.LORA, Method.LP_FT) == ("lora", "lp-ft")
    assert cfg.tune.pruner is Pruner.MEDIAN and cfg.features.decoder is Decoder.PIL
    assert cfg.finetune.pruner == "hyperband"
    saved = cfg.to_dict()
    plain = [saved["finetune"]["methods"], saved["tune"]["pruner"], saved["features"]["decoder"],
             saved["finetune"]["pruner"], saved["features"]["precision"]]
    assert plain == [["lora", "lp-ft"], "median", "pil", "hyperband", "auto"]
    assert all(type(v) is str for v in [*plain[0], *plain[1:]])  # the saved JSON is what plain strings gave


def test_saved_config_keeps_its_key_order() -> None:
    saved = resolve({}).to_dict()
    assert list(saved) == ["data", "backbones", "features", "tune", "finetune", "evaluate", "shots", "bench", "report",
                           "track", "out"]
    assert list(saved["tune"]) == ["trials", "timeout_s", "heads", "max_epochs", "storage", "seed", "baseline",
                                   "pruner", "device", "study", "heartbeat_s", "grace_s", "metric"]
    assert list(saved["finetune"])[:3] == ["methods", "epochs", "batch_size"] and list(saved["finetune"])[-5:] == [
        "trials", "pruner", "seed", "re_prob", "budget_s"]


def test_every_declaration_names_a_field_of_its_section() -> None:
    import dataclasses

    from dogbench.config import SECTIONS

    for name, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.constraints) | set(cls.parsers) <= fields, name


def test_interval_words_its_bounds() -> None:
    from dogbench.config import Interval

    assert Interval(1).describe() == ">= 1" and Interval(0, 1, closed="neither").describe() == "in (0, 1)"
    assert Interval(0, 1, closed="left").describe() == "in [0, 1)" and Interval(high=5).describe() == "<= 5"
    assert Interval(1).violation("k", None) is None  # an unset optional field passes
    assert Interval(1, hint="omit it: auto").violation("k", 0) == "k must be >= 1 (omit it: auto), got 0"
    assert Interval(0, 1, closed="left").violation("k", float("nan")) is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.methods=lora,bogus",
         "Unknown method 'bogus' in finetune.methods. Valid methods: frozen, lora, partial, full, lp-ft"),
        ("finetune.methods=[]", "finetune.methods is empty. Valid methods: frozen, lora, partial, full, lp-ft"),
        ("features.decoder=cv2", "Unknown features.decoder 'cv2'. Valid decoders: auto, pil"),
        ("features.precision=3", "Unknown features.precision '3'. Valid precisions: auto, fp32, bf16, fp16"),
        ("finetune.pruner=fast", "Unknown finetune.pruner 'fast'. Valid pruners: halving, hyperband, median, none"),
        ("tune.heads=mlp", None),
        ("features.device=gpu", "features.device 'gpu' is not a device. Valid: auto, cpu, cuda, cuda:N, mps"),
        ("features.num_workers=-1", "features.num_workers must be >= 0 (omit it: auto), got -1"),
        ("finetune.ema_decay=1", "finetune.ema_decay must be in [0, 1), got 1"),
        ("tune.heartbeat_s=60", "tune.heartbeat_s must be below tune.grace_s, got 60 and 60"),
        ("finetune.precision=fp16", "finetune.precision fp16 is not supported"),
        ("finetune.crop_scale=[0.5, 0.2]", "finetune.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1"),
        ("shots.trials=0", "shots.trials must be >= 1, got 0"),
    ],
)
def test_declared_constraints_name_the_key_and_the_valid_values(override: str, message: str | None) -> None:
    if message is None:
        resolve({}, overrides=[override])
        return
    with pytest.raises(ConfigError) as err:
        resolve({}, overrides=[override])
    assert str(err.value).startswith(message)


def test_values_are_checked_by_resolve_not_when_a_saved_config_is_read() -> None:
    from dogbench.config import from_mapping, validate

    cfg = from_mapping({"tune": {"trials": 0}})  # keys and types only, like a saved config.json read back
    assert cfg.tune.trials == 0
    with pytest.raises(ConfigError, match="tune.trials must be >= 1"):
        validate(cfg)
