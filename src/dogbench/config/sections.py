"""The config's sections: frozen dataclasses, Enums for closed choices, and each section's declared checks.

Every section lists its field constraints (``constraints``), the named checks that relate several fields
(``checks``) and its command-line shorthands (``parsers``) beside its fields. docs/guide/defaults.md explains the
settings at length.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dogbench.atomic import atomic_write_text
from dogbench.config.coerce import comma_list, comma_numbers, count_or_names, one_item
from dogbench.config.constraints import ConfigError, Each, Interval, Matches, NonEmpty, OneOf, Section

DEFAULT_BACKBONES: tuple[tuple[str, str], ...] = (("vit", "vit_s16"), ("resnet", "resnet50"))


class HeadKind(StrEnum):
    """Classifier heads the tuner can pick (dogbench.heads implements them)."""

    LOGISTIC = "logistic"  # multinomial L2 logistic regression solved by full-batch L-BFGS (the probe's model)
    LINEAR = "linear"
    MLP = "mlp"


class Precision(StrEnum):
    """Numeric precision of the backbone forward pass. AUTO = bf16 on a GPU that supports it, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Method(StrEnum):
    """Rows of the ladder: the frozen protocol (a tuned head on cached features), then the fine-tuning methods."""

    FROZEN = "frozen"
    LORA = "lora"
    PARTIAL = "partial"
    FULL = "full"
    LP_FT = "lp-ft"


class Pruner(StrEnum):
    """Multi-fidelity pruning of epoch-trained trials (dogbench.tune.make_pruner)."""

    HALVING = "halving"
    HYPERBAND = "hyperband"
    MEDIAN = "median"
    NONE = "none"


class TrackTo(StrEnum):
    """Where a run's curves and figures go besides its folder (``[track] to``)."""

    TENSORBOARD = "tensorboard"  # event files under RUN/tensorboard/
    MLFLOW = "mlflow"  # an MLflow store or tracking server (track.mlflow_uri)


class Balance(StrEnum):
    """Imbalanced classes: NONE, WEIGHTS = class-weighted loss (n / (K n_k)), SAMPLER = class-balanced draws of
    each epoch's rows (full-batch solvers, the logistic head's L-BFGS, use the weights instead)."""

    NONE = "none"
    WEIGHTS = "weights"
    SAMPLER = "sampler"


class TuneMetric(StrEnum):
    """The validation score that chooses heads, trials and epochs: top-1, balanced top-1 (mean per-class recall),
    or macro-F1."""

    TOP1 = "top1"
    BALANCED_TOP1 = "balanced_top1"
    MACRO_F1 = "macro_f1"


class Tta(StrEnum):
    """Test-time augmentation: each image's probabilities averaged over views of it. NONE = the one centre crop,
    FLIP = it and its mirror (timm's validate.py, fastai's tta), FLIP_CROPS = those and the four corner crops of
    the resized image with their mirrors (ten views, as the ten-crop evaluation of AlexNet / ResNet)."""

    NONE = "none"
    FLIP = "flip"
    FLIP_CROPS = "flip+crops"


class Decoder(StrEnum):
    """How images are decoded: AUTO = libjpeg-turbo and a uint8 tensor resize where they apply, PIL = timm's own."""

    AUTO = "auto"
    PIL = "pil"


HEAD_KINDS: tuple[str, ...] = tuple(kind.value for kind in HeadKind)
PRUNERS: tuple[str, ...] = tuple(p.value for p in Pruner)
FROZEN = Method.FROZEN
FINETUNE_METHODS: tuple[str, ...] = tuple(m.value for m in Method if m is not Method.FROZEN)  # dogbench.training
METHODS: tuple[str, ...] = tuple(m.value for m in Method)
DECODERS: tuple[str, ...] = tuple(d.value for d in Decoder)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE = Matches(DEVICE_PATTERN, what="a device", valid="auto, cpu, cuda, cuda:N, mps")
PREPROCESS_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def _at_least_two_classes(data: DataConfig) -> None:
    classes = data.classes
    if (isinstance(classes, int) and classes < 2) or (isinstance(classes, tuple) and len(set(classes)) < 2):
        raise ConfigError(f"data.classes must name at least 2 classes (a count N >= 2 or a list), got {classes!r}")


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the images are, how they are split, and which of them are used."""

    root: str | None = None  # official Stanford Dogs layout, Kaggle copy, archives, or class-per-folder
    crop_to_box: bool = False  # crop each image to its first annotated box (Stanford Dogs Annotation/)
    box_ablation: bool = False  # every backbone twice, box-cropped and whole, as paired rows of one run
    val_fraction: float = 0.2  # validation carved from train, stratified and seeded; tuning never sees test
    test_fraction: float = 0.2  # only for a flat class-per-folder dataset without train/ and test/
    split_seed: int = 0  # seed of the validation split (and of the test split of a flat folder)
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    download: bool = True  # fetch the official archives when no data is found
    data_url: str | None = None  # mirror for the official archives
    extra_test: tuple[str, ...] = ()  # second test sets: folders whose class names are the dataset's
    classes: int | tuple[str, ...] | None = None  # a subset: the first N classes, or names; None = all
    balance: Balance = Balance.NONE  # imbalanced classes: none | weights (weighted loss) | sampler (balanced draws)

    constraints = {"val_fraction": Interval(0, 1, closed="neither")}
    checks = (_at_least_two_classes,)
    parsers = {"extra_test": one_item, "classes": count_or_names}


@dataclass(frozen=True)
class BackboneConfig:
    """One ``[backbones.<label>]`` table: the model, its weights, and preprocessing overrides."""

    label: str  # the name results are reported under, e.g. "vit"
    model: str  # a short alias (see backbones.ALIASES) or any timm model tag
    weights: str = "hub"  # "hub", "random", or a path to .safetensors / torch checkpoint
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, ...)
    input_size: int | tuple[int, ...] | None = None  # preprocessing overrides; None = the model's own config
    crop_pct: float | None = None  # centre crop's share of the resized image (timm's crop_pct)
    crop_mode: str | None = None  # timm's crop_mode: center, squash (resize whole to the input), border
    interpolation: str | None = None  # resize filter: bicubic, bilinear, ...
    mean: tuple[float, float, float] | None = None  # per-channel normalisation mean (RGB, 0..1)
    std: tuple[float, float, float] | None = None  # per-channel normalisation standard deviation
    seed: int = 0  # initialisation seed for weights = "random"
    crop_to_box: bool | None = None  # None: data.crop_to_box; set per backbone by data.box_ablation
    description: str | None = None  # the weights in your words ("saliency-tuned DINOv2 ViT-S/14"), for reports


@dataclass(frozen=True)
class FeatureConfig(Section):
    """Feature extraction: device, precision, batching, decoding and the cache."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = Precision.AUTO
    batch_size: int | None = None  # None = auto: 64 on CPU; on a GPU the largest power of two <= 512 that fits
    num_workers: int | None = None  # None = auto (main process on CPU, cores - 1 up to 8 on a GPU); N = N workers
    prefetch: int = 4  # batches each worker process keeps ready
    reduced_decode: bool = True  # large JPEGs decoded at 1/2..1/8 scale keeping 2x the target (part of the key)
    decoder: Decoder = Decoder.AUTO  # auto = libjpeg-turbo + uint8 tensor resize where possible; pil = PIL only
    compile: bool = False  # torch.compile the backbone (part of the key); `dogbench bench --compile` measures it
    reuse_host_memory: bool = True  # glibc: keep freed memory for reuse (fewer page faults); false = default
    chunk_size: int = 512  # images per resumable chunk on disk
    cache_dir: str | None = None  # default: $DOGBENCH_CACHE/features

    constraints = {
        "device": DEVICE, "batch_size": Interval(1, hint="omit it: auto"),
        "num_workers": Interval(0, hint="omit it: auto"), "prefetch": Interval(1), "chunk_size": Interval(1),
    }


def _heartbeat_below_grace(tune: TuneConfig) -> None:
    if tune.heartbeat_s >= tune.grace_s:
        raise ConfigError(f"tune.heartbeat_s must be below tune.grace_s, got {tune.heartbeat_s} and {tune.grace_s}")


@dataclass(frozen=True)
class TuneConfig(Section):
    """The head search on cached features (Optuna), and how distributed workers share one study."""

    trials: int = 100  # 100 trials take well under a minute on cached features (docs/benchmarks/heads-and-tuning.md)
    timeout_s: float = 900.0  # no new trial is started after this many seconds of a backbone's search
    heads: tuple[str, ...] = ("logistic", "linear", "mlp")  # the heads the search may pick: logistic, linear, mlp
    max_epochs: int = 150  # epochs of an epoch-trained head trial (linear, mlp): the pruner's largest rung
    storage: str | None = None  # any Optuna storage URL; default: SQLite in the run folder
    seed: int = 0  # the sampler's seed (one per worker is derived from it)
    baseline: bool = True  # the logistic-regression probe with C swept on validation; the search's first trial
    pruner: Pruner = Pruner.HALVING  # multi-fidelity pruning of epoch-trained head trials (docs/benchmarks)
    device: str = "auto"  # where heads train; auto = the features' device
    study: str | None = None  # the shared study's name; default: derived from the backbone and features
    heartbeat_s: int = 10  # a worker's heartbeat period (Optuna's RDBStorage heartbeat)
    grace_s: int = 60  # a silent worker's trial is failed and queued again this long after its last heartbeat
    metric: TuneMetric = TuneMetric.TOP1  # what chooses heads, trials, epochs: top1 | balanced_top1 | macro_f1

    constraints = {
        "trials": Interval(1), "heads": Each(OneOf(HeadKind)), "device": DEVICE, "heartbeat_s": Interval(1),
    }
    checks = (_heartbeat_below_grace,)
    parsers = {"heads": one_item}


def _crop_scale_in_unit(f: FinetuneConfig) -> None:
    if len(f.crop_scale) != 2 or not 0.0 < f.crop_scale[0] <= f.crop_scale[1] <= 1.0:
        raise ConfigError(f"finetune.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(f.crop_scale)}")


def _no_fp16_training(f: FinetuneConfig) -> None:
    if f.precision is Precision.FP16:
        raise ConfigError("finetune.precision fp16 is not supported (no grad scaler): use auto, bf16 or fp32")


@dataclass(frozen=True)
class FinetuneConfig(Section):
    """Fine-tuning (``dogbench finetune``, or ``methods`` beyond "frozen" in ``dogbench run``).

    The published recipes' defaults; ``None`` = the method's own default (``dogbench.training.METHOD_DEFAULTS``).
    docs/guide/defaults.md cites the sources.
    """

    methods: tuple[Method, ...] = (Method.FROZEN,)  # rows of the ladder; frozen always runs (lp-ft needs it)
    epochs: int = 10  # training epochs of each fine-tuning method (early stopping may end sooner)
    batch_size: int = 32  # images per forward pass; an optimizer step takes batch_size * grad_accum images
    grad_accum: int = 1  # forward passes whose gradients add up to one optimizer step
    lr: float | None = None  # peak lr at batch_size * grad_accum images; None = the method's default
    layer_decay: float | None = None  # lr x decay^(depth - layer); None = the method's default (1.0 on CNNs)
    weight_decay: float | None = None  # AdamW's; None = the method's default (0.05; LoRA 1e-4)
    head_lr_scale: float | None = None  # the head's lr / the peak lr; None = the method's default (10x for full)
    warmup_epochs: float = 1.0  # linear warm-up of the lr before the cosine, in epochs
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.1  # of the cross-entropy's targets (with mixup: of the mixed targets)
    drop_path: float | None = None  # stochastic depth rate for the models that have it; None = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop's area range (timm's default)
    color_jitter: float = 0.4  # timm's default; ignored with randaugment
    randaugment: str | None = None  # a timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" (MAE / DeiT)
    mixup: float = 0.0  # mixup alpha (0 = off); DeiT uses 0.8
    cutmix: float = 0.0  # cutmix alpha (0 = off); DeiT uses 1.0
    ema_decay: float = 0.0  # keep an EMA of the weights and evaluate it (0 = off); timm uses 0.9998
    lora_rank: int | None = None  # LoRA's rank r; None = the method's default (8)
    lora_alpha: float | None = None  # None = 2 x rank
    lora_dropout: float = 0.0  # dropout on LoRA's input
    partial_blocks: int = 2  # "partial": the last N blocks (ViT) or stages (CNN) + final norm + head trainable
    freeze_bn_stats: bool = True  # batch norms keep their pretrained statistics; false = timm's train mode
    patience: int = 3  # stop after this many epochs without a better validation top-1
    precision: Precision = Precision.AUTO  # auto = bf16 autocast where bf16 matmuls are fast (AMX CPU, GPU sm80+)
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    checkpoint_every: int = 0  # optimizer steps between training-state checkpoints (0 = at each epoch's end only)
    wise: tuple[float, ...] = ()  # WiSE-FT mixing weights scored on validation beside 1.0; () = off
    refit: bool = False  # train again on train + validation with the chosen recipe, score that on test
    trials: int = 0  # Optuna trials over lr, layer decay, weight decay (and LoRA rank) on validation; 0 = defaults
    pruner: Pruner = Pruner.HYPERBAND  # multi-fidelity pruning of trials on per-epoch validation top-1
    seed: int = 0  # seed of the shuffles, augmentations, mixing and initialisation
    re_prob: float = 0.0  # random erasing probability (timm's create_transform re_prob; 0 = off); DeiT uses 0.25
    budget_s: float | None = None  # wall seconds the recipe search may spend (finetune.trials at most); None = no limit

    constraints = {
        "methods": NonEmpty(Method), "epochs": Interval(1), "batch_size": Interval(1), "grad_accum": Interval(1),
        "partial_blocks": Interval(1), "trials": Interval(0), "checkpoint_every": Interval(0),
        "lora_rank": Interval(1), "patience": Interval(1), "ema_decay": Interval(0, 1, closed="left"),
        "re_prob": Interval(0, 1), "budget_s": Interval(1),
        "wise": Each(Interval(0, 1, hint="0 = the start, 1 = the fine-tuned weights")),
    }
    checks = (_no_fp16_training, _crop_scale_in_unit)
    parsers = {"methods": comma_list, "wise": comma_numbers}


def _seeds_single_view(e: EvalConfig) -> None:
    if e.seeds > 1 and e.tta is not Tta.NONE:
        raise ConfigError(f"evaluate.seeds = {e.seeds} repeats the run on single views, so with evaluate.tta = "
                          f"{e.tta.value} its spread would mix views: set evaluate.tta = none for the repetitions, or "
                          "evaluate.seeds = 1")


@dataclass(frozen=True)
class EvalConfig(Section):
    """Test scoring: bootstrap intervals, and repetitions over seeds."""

    n_bootstrap: int = 2000  # resamples of the test set behind each 95% interval
    seed: int = 0  # seed of the bootstrap resamples
    seeds: int = 1  # repeat split, search, refit and scoring with seeds 0..N-1 (seed 0 is the run itself)
    tta: Tta = Tta.NONE  # test-time augmentation of test scoring, predict, serve and export: none | flip | flip+crops

    constraints = {"seeds": Interval(1)}
    checks = (_seeds_single_view,)


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


def _shots(key: str, value: Any) -> Any:
    """``--shots 1,2,all``, one number or a list, parsed by ``parse_shots``; other types go on to the type check."""
    if isinstance(value, str | int):
        return parse_shots(str(value))
    return parse_shots(value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class ShotsConfig(Section):
    """Data efficiency on the cached features: test top-1 with k training images per class (the few-shot
    curves of the CLIP and DINOv2 papers). Off while ``shots`` is empty; ``--shots 1,2,5,10,20,all``."""

    shots: tuple[int | str, ...] = ()  # images per class; "all" = the whole training split
    seeds: int = 3  # draws of the k images per point (seeds 0..N-1)
    trials: int = 10  # Optuna trials of the tuned head per point (the full study's budget would cost 100x)

    constraints = {"seeds": Interval(1), "trials": Interval(1)}
    parsers = {"shots": _shots}


@dataclass(frozen=True)
class BenchConfig(Section):
    """``dogbench bench``: rounds of (matmul peak, model alone, decode alone, end to end, hand-written recipe)."""

    images: int = 256  # images per decode / end-to-end / recipe pass, spread evenly over the dataset
    repeats: int = 5  # rounds; every figure is the median over rounds, every ratio the median of per-round ratios
    model_batches: int = 4  # timed forward passes of synthetic batches per round (after 2 warm-up passes)
    recipe: bool = True  # time torchvision ImageFolder + timm eval transform + default DataLoader on the same images
    compare_compile: bool = False  # also time the model alone under torch.compile (compile time reported)
    matmul_size: int | None = None  # square matmul for the FLOP peak; None = 2048 on CPU, 8192 on a GPU
    train: bool = False  # `dogbench bench --train`: training step alone vs fine-tuning vs a hand-written loop

    constraints = {"images": Interval(1), "repeats": Interval(1), "model_batches": Interval(1)}


def _explain_within_examples(r: ReportConfig) -> None:
    if r.explain > r.examples:
        raise ConfigError(f"Set report.explain at most report.examples (it explains images of the grid), got "
                          f"{r.explain} and {r.examples}")


@dataclass(frozen=True)
class ReportConfig(Section):
    """The HTML/Markdown report that ``dogbench run`` writes at the end (``dogbench report`` makes it alone)."""

    enabled: bool = True  # write report.html and report.md into the run folder after evaluation
    examples: int = 12  # test images in the predictions grid (right and wrong, each model's top-3)
    explain: int = 6  # of those, how many get attention rollout / Grad-CAM overlays (0: none, no model reload)
    confused_pairs: int = 8  # most-confused breed pairs shown with thumbnails
    seed: int = 0  # which test images the grid shows

    constraints = {"examples": Interval(0), "explain": Interval(0), "confused_pairs": Interval(0)}
    checks = (_explain_within_examples,)


@dataclass(frozen=True)
class TrackConfig(Section):
    """Trackers that observe a run (rank 0 only); one that fails is a warning, never a failed run."""

    to: tuple[TrackTo, ...] = (TrackTo.TENSORBOARD,)  # [] = none; ["tensorboard", "mlflow"] for a team's server
    mlflow_uri: str | None = None  # None = sqlite:///<run folder>/../mlflow.db; or a server, http://host:5000

    parsers = {"to": comma_list}


@dataclass(frozen=True)
class RunConfig:
    """Every section, the backbones and the run folder: what ``resolve`` returns and ``config.json`` holds."""

    data: DataConfig = DataConfig()
    backbones: tuple[BackboneConfig, ...] = ()
    features: FeatureConfig = FeatureConfig()
    tune: TuneConfig = TuneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvalConfig = EvalConfig()
    shots: ShotsConfig = ShotsConfig()
    bench: BenchConfig = BenchConfig()
    report: ReportConfig = ReportConfig()
    track: TrackConfig = TrackConfig()
    out: str | None = None  # run folder; default runs/<timestamp>

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "features": FeatureConfig,
    "tune": TuneConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvalConfig,
    "shots": ShotsConfig,
    "bench": BenchConfig,
    "report": ReportConfig,
    "track": TrackConfig,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


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
