"""Frozen, typed configuration for every stage, loaded from TOML and overridden from the command line.

One override syntax everywhere: ``section.key=value`` (``tune.trials=5``, ``features.batch_size=32``,
``backbones.vit.img_size=224``); values are parsed as TOML literals, falling back to plain strings.
The resolved config is written beside every result (``config.json``) so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from dogbench.atomic import atomic_write_text
from dogbench.errors import DogbenchError

DEFAULT_BACKBONES: tuple[tuple[str, str], ...] = (("vit", "vit_s16"), ("resnet", "resnet50"))


class HeadKind(StrEnum):
    """Classifier heads the tuner can pick (dogbench.heads implements them)."""

    LOGISTIC = "logistic"  # multinomial L2 logistic regression solved by full-batch L-BFGS (the probe's model)
    LINEAR = "linear"
    MLP = "mlp"


HEAD_KINDS: tuple[str, ...] = tuple(kind.value for kind in HeadKind)
PRUNERS: tuple[str, ...] = ("halving", "hyperband", "median", "none")  # dogbench.tune.make_pruner
FROZEN = "frozen"  # the method of the frozen protocol (a tuned head on cached features)
FINETUNE_METHODS: tuple[str, ...] = ("lora", "partial", "full", "lp-ft")  # dogbench.training
METHODS: tuple[str, ...] = (FROZEN, *FINETUNE_METHODS)


class Precision(StrEnum):
    """Numeric precision of the backbone forward pass. AUTO = bf16 on a GPU that supports it, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ConfigError(DogbenchError, ValueError):
    """A config file or override that cannot be understood; the message names the key and the valid choices."""


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # official Stanford Dogs layout, Kaggle copy, archives, or class-per-folder
    crop_to_box: bool = False  # crop each image to its first annotated box (Stanford Dogs Annotation/)
    # the box-crop ablation: every backbone twice, with crop_to_box as set and flipped ("<label>-whole" or
    # "<label>-box"), as comparable rows of one run (same split, same test images, paired tests)
    box_ablation: bool = False
    val_fraction: float = 0.2  # validation carved from train, stratified and seeded; tuning never sees test
    test_fraction: float = 0.2  # only for a flat class-per-folder dataset without train/ and test/
    split_seed: int = 0
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    download: bool = True  # fetch the official archives when no data is found
    data_url: str | None = None  # mirror for the official archives
    # second test sets: folders in any layout (every image of each is a test image) whose class names are the
    # dataset's (matched ignoring case, "_", "-" and spaces); scored with the same heads, reported per set
    extra_test: tuple[str, ...] = ()
    # a subset of the classes for quick trials: the first N (in the dataset's order), or class names (matched like
    # extra_test's); None = every class. Features of a subset are its own cache entries.
    classes: int | tuple[str, ...] | None = None


@dataclass(frozen=True)
class BackboneConfig:
    label: str  # the name results are reported under, e.g. "vit"
    model: str  # a short alias (see backbones.ALIASES) or any timm model tag
    weights: str = "hub"  # "hub", "random", or a path to .safetensors / torch checkpoint
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, ...)
    input_size: int | tuple[int, ...] | None = None  # preprocessing overrides; None = the model's own config
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    seed: int = 0  # initialisation seed for weights = "random"
    crop_to_box: bool | None = None  # None: data.crop_to_box; set per backbone by data.box_ablation


def crops_to_box(cfg: RunConfig, backbone: BackboneConfig) -> bool:
    """Whether ``backbone``'s images are cropped to their annotated box: its own setting, else ``data.crop_to_box``."""
    return cfg.data.crop_to_box if backbone.crop_to_box is None else backbone.crop_to_box


def with_box_ablation(cfg: RunConfig) -> RunConfig:
    """With ``data.box_ablation``, every backbone without its own crop setting twice: as configured (crop set to
    ``data.crop_to_box``) and flipped, labelled ``<label>-whole`` or ``<label>-box``. Idempotent."""
    if not cfg.data.box_ablation:
        return cfg
    crop = cfg.data.crop_to_box
    backbones: list[BackboneConfig] = []
    for b in cfg.backbones:
        if b.crop_to_box is not None:
            backbones.append(b)
            continue
        twin = f"{b.label}-{'whole' if crop else 'box'}"
        backbones += [dataclasses.replace(b, crop_to_box=crop),
                      dataclasses.replace(b, label=twin, crop_to_box=not crop)]
    return dataclasses.replace(cfg, backbones=tuple(backbones))


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DECODERS = ("auto", "pil")
PREPROCESS_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


@dataclass(frozen=True)
class FeatureConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = Precision.AUTO
    batch_size: int | None = None  # None = auto: 64 on CPU; on a GPU the largest power of two <= 512 that fits
    # None = auto: on CPU, decode in the main process between forward passes (threads over all cores: the model
    # needs every core, and worker processes fighting it for them slow it down); on a GPU, cores - 1 worker
    # processes (at most 8). 0 = in the main process; N = N DataLoader worker processes.
    num_workers: int | None = None
    prefetch: int = 4  # batches each worker process keeps ready
    # JPEGs >= 4x the resize target are decoded at 1/2..1/8 scale keeping 2x the target (part of the key)
    reduced_decode: bool = True
    # auto = libjpeg-turbo through torchvision.io and a uint8 tensor resize for RGB/grey JPEGs (1.5x PIL on
    # full-size photos here), PIL for the rest and for reduced decoding; pil = PIL only, exactly timm's transform
    decoder: str = "auto"
    compile: bool = False  # torch.compile the backbone (part of the key); `dogbench bench --compile` measures it
    # glibc only: keep freed memory in the heap for reuse instead of mapping and unmapping every large activation
    # (page faults were a third of ResNet50's CPU forward time at batch 64); set false for the allocator default.
    reuse_host_memory: bool = True
    chunk_size: int = 512  # images per resumable chunk on disk
    cache_dir: str | None = None  # default: $DOGBENCH_CACHE/features


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 100  # 100 trials take well under a minute on cached features (docs/BENCHMARKS.md)
    timeout_s: float = 900.0
    heads: tuple[str, ...] = ("logistic", "linear", "mlp")
    max_epochs: int = 150
    storage: str | None = None  # any Optuna storage URL; default: SQLite in the run folder
    seed: int = 0
    baseline: bool = True  # the logistic-regression probe with C swept on validation; the search's first trial
    pruner: str = "halving"  # multi-fidelity pruning of epoch-trained trials: one of PRUNERS (docs/BENCHMARKS.md)
    device: str = "auto"  # where heads train; auto = the features' device
    # distributed tuning (tune.storage a PostgreSQL URL, several workers on one study): the study's name (default:
    # derived from the backbone and features), and how a dead worker is noticed: heartbeats every heartbeat_s,
    # its trial failed and queued again grace_s after its last one (Optuna's RDBStorage heartbeat)
    study: str | None = None
    heartbeat_s: int = 10
    grace_s: int = 60


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning (``dogbench finetune``, or ``methods`` beyond "frozen" in ``dogbench run``).

    The recipe follows the published ones: AdamW with a cosine schedule and linear warm-up, layer-wise lr decay
    for ViTs, label smoothing 0.1, drop-path 0.1, weight decay 0.05 and timm's training transform (random resized
    crop, flip, colour jitter 0.4 or RandAugment) are timm's ``train.py`` defaults and the BEiT / MAE ViT
    fine-tuning recipe (Bao et al. 2022, He et al. 2022: AdamW, wd 0.05, layer decay 0.65-0.75, drop-path 0.1,
    cosine, warm-up 5 of 100 epochs); LoRA (Hu et al. 2022) rank 8, alpha 16 on the attention and MLP
    projections; LP-FT (Kumar et al. 2022) starts from the linear probe and fine-tunes at a smaller lr. Per-method
    defaults (``None`` below) are ``dogbench.training.METHOD_DEFAULTS`` (README lists them). VPT's Stanford Dogs
    configs (Jia et al. 2022) tune lr and weight decay on validation: ``trials`` does the same.
    """

    methods: tuple[str, ...] = (FROZEN,)  # rows of the ladder: any of METHODS; frozen always runs (lp-ft needs it)
    epochs: int = 10
    batch_size: int = 32  # images per forward pass; an optimizer step takes batch_size * grad_accum images
    grad_accum: int = 1
    lr: float | None = None  # peak lr at batch_size * grad_accum images; None = the method's default
    layer_decay: float | None = None  # lr x decay^(depth - layer); None = the method's default (1.0 on CNNs)
    weight_decay: float | None = None
    head_lr_scale: float | None = None  # the head's lr / the peak lr; None = the method's default (10x for full)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.1
    drop_path: float | None = None  # stochastic depth rate for the models that have it; None = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop's area range (timm's default)
    color_jitter: float = 0.4  # timm's default; ignored with randaugment
    randaugment: str | None = None  # a timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" (MAE / DeiT)
    mixup: float = 0.0  # mixup alpha (0 = off); DeiT uses 0.8
    cutmix: float = 0.0  # cutmix alpha (0 = off); DeiT uses 1.0
    ema_decay: float = 0.0  # keep an EMA of the weights and evaluate it (0 = off); timm uses 0.9998
    lora_rank: int | None = None
    lora_alpha: float | None = None  # None = 2 x rank
    lora_dropout: float = 0.0
    partial_blocks: int = 2  # "partial": the last N blocks (ViT) or stages (CNN) + final norm + head trainable
    # batch norms keep their pretrained running statistics (eval mode) while their scale and shift train: statistics
    # of 32-image batches are far from them (EfficientNet-Lite0 here: the probe's head on train-mode features
    # scores 0.09 instead of 0.82, benchmarks/lpft_checks.py), the frozen-BN practice of detection fine-tuning;
    # false = timm's train mode
    freeze_bn_stats: bool = True
    patience: int = 3  # stop after this many epochs without a better validation top-1
    precision: Precision = Precision.AUTO  # auto = bf16 autocast where bf16 matmuls are fast (AMX CPU, GPU sm80+)
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    checkpoint_every: int = 0  # optimizer steps between training-state checkpoints (0 = at each epoch's end only)
    # WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): after training, the weights
    # (1 - a) * start + a * fine-tuned for each a listed here, next to a = 1, scored on validation; the best is the
    # model (full, partial, lp-ft; start = the pretrained backbone with the starting head). () = off
    wise: tuple[float, ...] = ()
    # refit on train + validation, as the frozen heads are for their test score: once the recipe, its epoch count
    # (the best epoch) and the WiSE-FT weight are chosen on validation, train again from the start on both splits
    # for that many epochs (lp-ft: from the probe refit on both), keep the last epoch, and score that on test;
    # the temperature stays the one fitted on validation by the model chosen there. Doubles the training cost
    refit: bool = False
    trials: int = 0  # Optuna trials over lr, layer decay, weight decay (and LoRA rank) on validation; 0 = defaults
    pruner: str = "hyperband"  # multi-fidelity pruning of trials on per-epoch validation top-1: one of PRUNERS
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    n_bootstrap: int = 2000
    seed: int = 0
    # repeat the validation split, the head search, the refit and the test scoring with seeds 0..N-1 on the
    # cached features (seed 0 is the run itself): mean and spread per model and per comparison
    seeds: int = 1


@dataclass(frozen=True)
class ShotsConfig:
    """Data efficiency on the cached features: test top-1 with k training images per class (the few-shot
    curves of the CLIP and DINOv2 papers). Off while ``shots`` is empty; ``--shots 1,2,5,10,20,all``."""

    shots: tuple[int | str, ...] = ()  # images per class; "all" = the whole training split
    seeds: int = 3  # draws of the k images per point (seeds 0..N-1)
    trials: int = 10  # Optuna trials of the tuned head per point (the full study's budget would cost 100x)


@dataclass(frozen=True)
class BenchConfig:
    """``dogbench bench``: rounds of (matmul peak, model alone, decode alone, end to end, hand-written recipe)."""

    images: int = 256  # images per decode / end-to-end / recipe pass, spread evenly over the dataset
    repeats: int = 5  # rounds; every figure is the median over rounds, every ratio the median of per-round ratios
    model_batches: int = 4  # timed forward passes of synthetic batches per round (after 2 warm-up passes)
    recipe: bool = True  # time torchvision ImageFolder + timm eval transform + default DataLoader on the same images
    compare_compile: bool = False  # also time the model alone under torch.compile (compile time reported)
    matmul_size: int | None = None  # square matmul for the FLOP peak; None = 2048 on CPU, 8192 on a GPU
    # `dogbench bench --train`: the training step alone vs end-to-end fine-tuning vs the hand-written training loop
    # (model_batches + 1 steps of finetune.batch_size images each, the first one warm-up)
    train: bool = False


@dataclass(frozen=True)
class ReportConfig:
    """The HTML/Markdown report that ``dogbench run`` writes at the end (``dogbench report`` makes it alone)."""

    enabled: bool = True  # write report.html and report.md into the run folder after evaluation
    examples: int = 12  # test images in the predictions grid (right and wrong, each model's top-3)
    explain: int = 6  # of those, how many get attention rollout / Grad-CAM overlays (0: none, no model reload)
    confused_pairs: int = 8  # most-confused breed pairs shown with thumbnails
    seed: int = 0  # which test images the grid shows


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    backbones: tuple[BackboneConfig, ...] = ()
    features: FeatureConfig = FeatureConfig()
    tune: TuneConfig = TuneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvalConfig = EvalConfig()
    shots: ShotsConfig = ShotsConfig()
    bench: BenchConfig = BenchConfig()
    report: ReportConfig = ReportConfig()
    out: str | None = None  # run folder; default runs/<timestamp>

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "features": FeatureConfig,
    "tune": TuneConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvalConfig,
    "shots": ShotsConfig,
    "bench": BenchConfig,
    "report": ReportConfig,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(section: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown key '{key}' in [{section}].{hint} Valid keys: {', '.join(valid)}")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a field's type hint (bool is not an int here; an int is a valid float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, list | tuple)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str or (isinstance(hint, type) and issubclass(hint, Enum)):
        return isinstance(value, str)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    return True


def _numbers(key: str, values: Any, example: str) -> tuple[float, ...]:
    """A list of plain numbers (not booleans, strings or lists) as floats; ConfigError naming ``key`` otherwise."""
    if not isinstance(values, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key} must be a list of numbers, e.g. {example}, got {values!r}")
    return tuple(float(v) for v in values)


def _check_types(cls: type, section: str, values: Mapping[str, Any]) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _accepts(hints[key], value):
            raise ConfigError(f"{section}.{key} must be of type {_type_name(hints[key])}, got {value!r}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _coerce(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    valid = _field_names(cls)
    for key in values:
        if key not in valid:
            raise _unknown_key(section, key, valid)
    if cls is TuneConfig and isinstance(values.get("heads"), str):
        values = {**values, "heads": [values["heads"]]}
    if cls is DataConfig and isinstance(values.get("extra_test"), str):
        values = {**values, "extra_test": [values["extra_test"]]}
    if cls is DataConfig and isinstance(values.get("classes"), str):  # --classes 20, --classes a,b,c
        text = values["classes"].strip()
        values = {**values, "classes": int(text) if text.isdigit() else
                  [c.strip() for c in text.split(",") if c.strip()]}
    if cls is FinetuneConfig and isinstance(values.get("methods"), str):  # --set finetune.methods=lora,full
        values = {**values, "methods": [m.strip() for m in values["methods"].split(",") if m.strip()]}
    if cls is FinetuneConfig and isinstance(values.get("wise"), str | int | float):  # --set finetune.wise=0.5,0.75
        try:
            values = {**values, "wise": [float(a) for a in str(values["wise"]).split(",") if a.strip()]}
        except ValueError:
            raise ConfigError(f"{section}.wise must be numbers in [0, 1], e.g. 0.25,0.5,0.75, got "
                              f"{values['wise']!r}") from None
    if cls is ShotsConfig and isinstance(values.get("shots"), str | int):
        values = {**values, "shots": str(values["shots"]).split(",")}
    _check_types(cls, section, values)
    kwargs = dict(values)
    if cls in (FeatureConfig, FinetuneConfig) and "precision" in kwargs:
        try:
            kwargs["precision"] = Precision(kwargs["precision"])
        except ValueError:
            choices = ", ".join(p.value for p in Precision)
            raise ConfigError(f"{section}.precision '{kwargs['precision']}' is not one of: {choices}") from None
    if cls is FinetuneConfig:
        if "methods" in kwargs:
            kwargs["methods"] = tuple(kwargs["methods"])
        for key, example in (("crop_scale", "[0.25, 1.0]"), ("wise", "[0.25, 0.5, 0.75]")):
            if key in kwargs:
                kwargs[key] = _numbers(f"{section}.{key}", kwargs[key], example)
    if cls is TuneConfig and "heads" in kwargs:
        kwargs["heads"] = tuple(kwargs["heads"])
    if cls is ShotsConfig and "shots" in kwargs:
        kwargs["shots"] = parse_shots(kwargs["shots"])
    if cls is DataConfig and "extra_test" in kwargs:
        kwargs["extra_test"] = tuple(str(p) for p in kwargs["extra_test"])
    if cls is DataConfig and isinstance(kwargs.get("classes"), list | tuple):
        kwargs["classes"] = tuple(str(c) for c in kwargs["classes"])
    return cls(**kwargs)


def absolute_path(path: str) -> str:
    """``~`` expanded, made absolute, ``..`` collapsed (symlinks kept: the path stays the one the user gave)."""
    return os.path.abspath(os.path.expanduser(path))


def parse_shots(value: Any) -> tuple[int | str, ...]:
    """``[1, 2, "all"]`` or ``"1,2,5,all"`` -> (1, 2, 5, "all"); ConfigError for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[int | str] = []
    for item in items:
        text = str(item).strip()
        if text == "all":
            out.append("all")
        elif text.isdigit() and int(text) >= 1:
            out.append(int(text))
        else:
            raise ConfigError(f"shots.shots: {item!r} is neither a number of images per class >= 1 nor 'all'")
    return tuple(out)


def parse_backbone_table(label: str, table: Mapping[str, Any]) -> BackboneConfig:
    """``[backbones.<label>]``: ``model`` and ``weights``, preprocessing keys, anything else is a model kwarg."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"[backbones.{label}] must be a table (model = ..., weights = ...), got {table!r}")
    if "model" not in table:
        raise ConfigError(f"[backbones.{label}] needs a 'model' key (a short alias or a timm model tag)")
    kwargs: dict[str, Any] = {}
    pre: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("model", "weights", "seed", "crop_to_box"):
            continue
        if key in PREPROCESS_KEYS:
            pre[key] = tuple(value) if isinstance(value, list) else value
        else:
            kwargs[key] = value
    fixed = {"model": table["model"], "weights": table.get("weights", "hub"), "seed": table.get("seed", 0),
             "crop_to_box": table.get("crop_to_box")}
    _check_types(BackboneConfig, f"backbones.{label}", {**fixed, **pre})
    if fixed["weights"] not in ("hub", "random"):  # stored absolute: report, explain, predict run from anywhere
        fixed["weights"] = absolute_path(fixed["weights"])
    return BackboneConfig(label=label, model_kwargs=kwargs, **fixed, **pre)


def parse_backbone_spec(spec: str) -> BackboneConfig:
    """``LABEL=MODEL[@WEIGHTS][,key=value...]`` e.g. ``vit=vit_small_patch14_dinov2@w.safetensors,img_size=224``."""
    return parse_backbone_table(*backbone_spec_table(spec))


def backbone_spec_table(spec: str) -> tuple[str, dict[str, Any]]:
    """A ``--backbone`` spec as (label, the ``[backbones.<label>]`` table it stands for)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ConfigError(
            f"Bad --backbone '{spec}': expected LABEL=MODEL[@WEIGHTS][,key=value...], e.g. vit=vit_s16 or "
            "cnn=tf_efficientnet_lite0@weights.safetensors"
        )
    head, *pairs = rest.split(",")
    model, _, weights = head.partition("@")
    table: dict[str, Any] = {"model": model, "weights": weights or "hub"}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"Bad --backbone option '{pair}' in '{spec}': expected key=value")
        table[key.strip()] = parse_value(value)
    return label.strip(), table


def parse_value(text: str) -> Any:
    """A TOML literal (``5``, ``3e-4``, ``true``, ``[1, 2]``, ``"x"``) or, failing that, the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_mapping(doc: Mapping[str, Any]) -> RunConfig:
    valid_top = [*SECTIONS, "backbones", "out"]
    for key in doc:
        if key not in valid_top:
            raise _unknown_key("top level", key, valid_top)
    for key in (*SECTIONS, "backbones"):
        if key in doc and not isinstance(doc[key], Mapping):
            raise ConfigError(f"[{key}] must be a table of settings (key = value lines under [{key}]), got "
                              f"{doc[key]!r}")
    if not isinstance(doc.get("out"), str | None):
        raise ConfigError(f"out must be a folder path (a string), got {doc['out']!r}")
    sections = {name: _coerce(cls, name, doc.get(name, {})) for name, cls in SECTIONS.items()}
    # input paths are stored absolute, so every command finds them from any working directory
    if sections["data"].root is not None:
        sections["data"] = dataclasses.replace(sections["data"], root=absolute_path(sections["data"].root))
    if sections["data"].extra_test:
        sections["data"] = dataclasses.replace(sections["data"],
                                               extra_test=tuple(absolute_path(p) for p in sections["data"].extra_test))
    if sections["features"].cache_dir is not None:
        sections["features"] = dataclasses.replace(sections["features"],
                                                   cache_dir=absolute_path(sections["features"].cache_dir))
    storage = sections["tune"].storage
    if storage and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        sections["tune"] = dataclasses.replace(
            sections["tune"], storage="sqlite:///" + absolute_path(storage.removeprefix("sqlite:///")))
    backbones = tuple(parse_backbone_table(label, table) for label, table in doc.get("backbones", {}).items())
    return RunConfig(backbones=backbones, out=doc.get("out"), **sections)


def saved_to_doc(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` (``RunConfig.to_dict()``) back into the TOML-shaped dict ``resolve`` takes."""
    doc = {name: dict(saved.get(name, {})) for name in SECTIONS}
    doc["backbones"] = {}
    for b in saved.get("backbones", []):
        table = {"model": b["model"], "weights": b["weights"], "seed": b.get("seed", 0), **b.get("model_kwargs", {})}
        if b.get("crop_to_box") is not None:
            table["crop_to_box"] = b["crop_to_box"]
        table.update({k: b[k] for k in PREPROCESS_KEYS if b.get(k) is not None})
        doc["backbones"][b["label"]] = table
    if saved.get("out") is not None:
        doc["out"] = saved["out"]
    return doc


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file into a plain nested dict (empty when path is None).

    Relative input paths in the file (``data.root``, backbone weight files) are taken relative to the file's
    folder, so a config works from any working directory; ``out`` and ``features.cache_dir`` stay relative to
    the working directory, like the command-line flags.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid TOML: {err}") from None
    return _anchor_paths(doc, path.resolve().parent)


def _anchor_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    def anchored(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and not Path(value).expanduser().is_absolute() else value

    data = doc.get("data")
    if isinstance(data, dict) and "root" in data:
        data["root"] = anchored(data["root"])
    if isinstance(data, dict) and isinstance(data.get("extra_test"), list):
        data["extra_test"] = [anchored(p) for p in data["extra_test"]]
    elif isinstance(data, dict) and isinstance(data.get("extra_test"), str):
        data["extra_test"] = [anchored(data["extra_test"])]
    for table in (doc.get("backbones") or {}).values():
        if isinstance(table, dict) and table.get("weights", "hub") not in ("hub", "random"):
            table["weights"] = anchored(table["weights"])
    return doc


def apply_override(doc: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place."""
    dotted, eq, value = override.partition("=")
    if not eq or not dotted:
        raise ConfigError(f"Bad override '{override}': expected section.key=value, e.g. tune.trials=5")
    *parents, leaf = dotted.strip().split(".")
    if not parents:
        if leaf != "out":
            raise ConfigError(f"Bad override '{override}': expected section.key=value, e.g. tune.trials=5")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Bad override '{override}': '{part}' is not a section")
    node[leaf] = parse_value(value)


def resolve(
    doc: dict[str, Any], *, overrides: Sequence[str] = (), backbone_specs: Sequence[str] = ()
) -> RunConfig:
    """Config file dict + ``key=value`` overrides + ``--backbone`` specs -> a validated RunConfig.

    ``--backbone`` specs replace the file's backbones; with neither, the two reference models are used.
    """
    doc = json.loads(json.dumps(doc))  # deep copy: callers keep their dict
    if backbone_specs:  # replace the file's backbones; overrides of backbones.<label>.key then apply to them
        tables = [backbone_spec_table(s) for s in backbone_specs]
        doc["backbones"] = {label: table for label, table in tables}
        labels = [label for label, _ in tables]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"Backbone labels must be unique, got {labels}")
    for override in overrides:
        apply_override(doc, override)
    cfg = from_mapping(doc)
    if not cfg.backbones:
        cfg = dataclasses.replace(
            cfg, backbones=tuple(BackboneConfig(label=label, model=model) for label, model in DEFAULT_BACKBONES)
        )
    cfg = with_box_ablation(cfg)
    labels = [b.label for b in cfg.backbones]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Backbone labels must be unique, got {labels}")
    _validate(cfg)
    return cfg


def _validate(cfg: RunConfig) -> None:
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if (cfg.features.batch_size is not None and cfg.features.batch_size < 1) or cfg.features.chunk_size < 1:
        raise ConfigError("features.batch_size and features.chunk_size must be at least 1 (omit batch_size: auto)")
    if cfg.features.decoder not in DECODERS:
        raise ConfigError(f"features.decoder '{cfg.features.decoder}' is not one of: {', '.join(DECODERS)}")
    if (cfg.features.num_workers is not None and cfg.features.num_workers < 0) or cfg.features.prefetch < 1:
        raise ConfigError("features.num_workers must be >= 0 (omit it: auto) and features.prefetch >= 1")
    if min(cfg.bench.images, cfg.bench.repeats, cfg.bench.model_batches) < 1:
        raise ConfigError("bench.images, bench.repeats and bench.model_batches must be at least 1")
    if cfg.evaluate.seeds < 1:
        raise ConfigError(f"evaluate.seeds must be >= 1, got {cfg.evaluate.seeds}")
    if cfg.shots.seeds < 1 or cfg.shots.trials < 1:
        raise ConfigError(f"shots.seeds and shots.trials must be >= 1, got {cfg.shots.seeds}, {cfg.shots.trials}")
    if cfg.tune.trials < 1:
        raise ConfigError(f"tune.trials must be >= 1, got {cfg.tune.trials}")
    if not 1 <= cfg.tune.heartbeat_s < cfg.tune.grace_s:
        raise ConfigError(f"tune.heartbeat_s must be >= 1 and below tune.grace_s, got {cfg.tune.heartbeat_s} and "
                          f"{cfg.tune.grace_s}")
    r = cfg.report
    if min(r.examples, r.explain, r.confused_pairs) < 0 or r.explain > r.examples:
        raise ConfigError(
            "report.examples, report.explain and report.confused_pairs must be >= 0, and report.explain at most "
            f"report.examples (it explains images of the grid); got {r.examples}, {r.explain}, {r.confused_pairs}"
        )
    for key, device in (("features.device", cfg.features.device), ("tune.device", cfg.tune.device)):
        if not DEVICE_PATTERN.fullmatch(device):
            raise ConfigError(f"{key} '{device}' is not a device. Valid: auto, cpu, cuda, cuda:N, mps")
    for head in cfg.tune.heads:
        if head not in HEAD_KINDS:
            raise ConfigError(f"Unknown head '{head}' in tune.heads. Valid heads: {', '.join(HEAD_KINDS)}")
    classes = cfg.data.classes
    if (isinstance(classes, int) and classes < 2) or (isinstance(classes, tuple) and len(set(classes)) < 2):
        raise ConfigError(f"data.classes must name at least 2 classes (a count N >= 2 or a list), got {classes!r}")
    f = cfg.finetune
    for method in f.methods:
        if method not in METHODS:
            raise ConfigError(f"Unknown method '{method}' in finetune.methods. Valid methods: {', '.join(METHODS)}")
    if min(f.epochs, f.batch_size, f.grad_accum, f.partial_blocks) < 1 or f.trials < 0 or f.checkpoint_every < 0:
        raise ConfigError("finetune.epochs, batch_size, grad_accum and partial_blocks must be >= 1, finetune.trials "
                          "and finetune.checkpoint_every >= 0")
    if not f.methods:
        raise ConfigError(f"finetune.methods is empty. Valid methods: {', '.join(METHODS)}")
    if (f.lora_rank is not None and f.lora_rank < 1) or f.patience < 1 or not 0.0 <= f.ema_decay < 1.0:
        raise ConfigError(f"finetune.lora_rank and finetune.patience must be >= 1 and finetune.ema_decay in [0, 1), "
                          f"got {f.lora_rank}, {f.patience}, {f.ema_decay}")
    if f.precision is Precision.FP16:
        raise ConfigError("finetune.precision fp16 is not supported (no grad scaler): use auto, bf16 or fp32")
    if len(f.crop_scale) != 2 or not 0.0 < f.crop_scale[0] <= f.crop_scale[1] <= 1.0:
        raise ConfigError(f"finetune.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(f.crop_scale)}")
    if not all(0.0 <= a <= 1.0 for a in f.wise):
        raise ConfigError(f"finetune.wise lists mixing weights in [0, 1] (0 = the start, 1 = the fine-tuned "
                          f"weights), got {list(f.wise)}")
    if f.pruner not in PRUNERS:
        raise ConfigError(f"Unknown finetune.pruner '{f.pruner}'. Valid pruners: {', '.join(PRUNERS)}")
    if cfg.tune.pruner not in PRUNERS:
        raise ConfigError(f"Unknown tune.pruner '{cfg.tune.pruner}'. Valid pruners: {', '.join(PRUNERS)}")


# Keys that say how a run is executed, not what it computes: they may differ between the commands that work on
# one run folder (another device, cache folder, batch size or report setting gives the same results).
EXECUTION_KEYS = (
    "out", "data.strict", "data.download", "data.data_url", "features.device", "features.batch_size",
    "features.num_workers", "features.prefetch", "features.cache_dir", "features.reuse_host_memory", "tune.device",
    "bench", "report",
    # analyses that add to the results without changing the rest: `dogbench evaluate R --seeds 3` adds them
    "evaluate.seeds", "shots", "data.extra_test",
    # fine-tuning rows are added to a run folder method by method; how often training state is saved changes nothing
    "finetune.methods", "finetune.checkpoint_every",
    # where the study lives and how its workers watch each other: not what the search computes
    "tune.storage", "tune.study", "tune.heartbeat_s", "tune.grace_s",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _config_items(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    d["backbones"] = {b.pop("label"): b for b in d["backbones"]}
    return {k: v for k, v in _flatten(d).items()
            if not any(k == e or k.startswith(e + ".") for e in EXECUTION_KEYS)}


def config_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """The keys that change what a run computes, where ``given`` differs from ``saved``: ``key: saved -> given``."""
    a, b = _config_items(saved), _config_items(given)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]
