"""Fine-tuning one timm backbone with a linear head: the methods, the recipe, the loop, resumable training state.

Methods (``METHODS``): ``lora`` (low-rank adapters from Hugging Face ``peft``; base weights untouched), ``partial``
(the last N blocks / stages + final norm + head), ``full`` (every weight) and ``lp-ft`` (full fine-tuning from the
linear probe's head, Kumar et al. 2022). The recipe: AdamW over parameter groups with layer-wise lr decay (the
layer of every parameter, adapters included, comes from timm's ``group_matcher`` on the *unwrapped* model, so
frozen or wrapped parameters cannot shift the scales, timm #2691), linear warm-up then cosine, label smoothing
(or timm's mixup / cutmix), drop-path, timm's training transform, bf16 autocast where bf16 matmuls are fast,
gradient accumulation, gradient checkpointing, channels_last for CNNs, optional EMA of the weights.

Training state (weights, optimizer, scheduler, EMA, every RNG, epoch, position in the epoch, history, best) is
written atomically into ``<out>/state.pt`` at every epoch's end and every ``checkpoint_every`` optimizer steps;
the same call after a kill continues from it. Sampler order and every augmentation are seeded per (seed, epoch,
image), so a resumed run replays exactly what the uninterrupted one does: on the CPU its final weights are
bitwise equal. The best epoch's weights are ``<out>/best-epoch<N>.safetensors``.

Under ``torchrun`` (``distributed``) the model is wrapped in DistributedDataParallel: ``batch_size`` stays the
global micro-batch (so a recipe means the same on any number of ranks) and rank r takes its rows r, r + N, ...
(the strided split of torch's ``DistributedSampler``) of every seeded global batch, so the sampler position and
the per-image augmentation seeds are those of one process. Gradients are averaged over the ranks (the mean over
the global batch); CUDA batch norms become SyncBatchNorm (torch has no CPU SyncBatchNorm: on gloo each rank
normalises its own rows and DDP broadcasts rank 0's running statistics). Validation is split over the ranks
and summed. Only rank 0 writes; the state holds every rank's RNGs, so a resume (also after torchrun's elastic
restart) replays the same steps, and needs the same number of ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import random
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from dogbench import distributed
from dogbench.atomic import atomic_write_bytes, atomic_write_json
from dogbench.backbones import Backbone, BackboneError, Preprocess, load_backbone, state_diff
from dogbench.config import FINETUNE_METHODS, BackboneConfig, FinetuneConfig, Precision
from dogbench.data import ImageError, Sample, load_image
from dogbench.device import DTYPES, cpu_cores, fast_bf16_matmul
from dogbench.errors import DogbenchError
from dogbench.features import ImageDataset, effective_decoder, iter_batches
from dogbench.features.cache import cache_key

STATE_FILE = "state.pt"
BEST_PREFIX = "best-epoch"  # best-epoch<N>.safetensors: the state names the one that is its best
STATE_FORMAT = 1

# Per-method defaults (lr at 32 images per optimizer step). Sources: BEiT / MAE ViT fine-tuning (AdamW, wd 0.05,
# layer decay 0.65-0.75, base lr 5e-4 per 256 images -> ~6e-5 at 32); timm train.py (AdamW fine-tuning 1e-4 at
# batch 32 scale); LoRA for ViTs (rank 8, alpha 16, lr 1e-3, light weight decay); LP-FT (Kumar et al. 2022:
# fine-tune from the probe at a smaller lr). head_lr_scale: a new, random head learns at 10x the backbone's
# peak lr (the classic "10x on new layers" of transfer learning) where the backbone's lr is small.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "lora": {"lr": 1e-3, "weight_decay": 1e-4, "vit_layer_decay": 1.0, "lora_rank": 8, "head_lr_scale": 1.0},
    "partial": {"lr": 3e-4, "weight_decay": 0.05, "vit_layer_decay": 1.0, "head_lr_scale": 3.0},
    "full": {"lr": 1e-4, "weight_decay": 0.05, "vit_layer_decay": 0.75, "head_lr_scale": 10.0},
    "lp-ft": {"lr": 5e-5, "weight_decay": 0.05, "vit_layer_decay": 0.75, "head_lr_scale": 1.0},
}
DEFAULT_DROP_PATH = 0.1


class TrainingError(DogbenchError, ValueError):
    """A fine-tuning setup that cannot work (a method that does not apply, too few images, a bad state file)."""


@dataclass(frozen=True)
class TrainParams:
    """Everything one training run depends on, resolved (no Nones): its digest names the state it resumes."""

    method: str
    epochs: int
    batch_size: int
    grad_accum: int
    lr: float
    layer_decay: float
    weight_decay: float
    head_lr_scale: float
    warmup_epochs: float
    min_lr_ratio: float
    label_smoothing: float
    drop_path: float
    crop_scale: tuple[float, float]
    color_jitter: float
    randaugment: str | None
    mixup: float
    cutmix: float
    ema_decay: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    partial_blocks: int
    freeze_bn_stats: bool
    patience: int
    precision: str  # "bf16" or "fp32" (what autocast runs)
    grad_checkpointing: bool
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d


def resolve_params(
    cfg: FinetuneConfig, method: str, *, is_vit: bool, device: torch.device, **overrides: Any
) -> TrainParams:
    """The config's settings for ``method`` with its defaults filled in; ``overrides`` (a trial's suggestions:
    lr, layer_decay, weight_decay, lora_rank) win over both."""
    if method not in FINETUNE_METHODS:
        raise TrainingError(f"Unknown fine-tuning method '{method}'. Valid methods: {', '.join(FINETUNE_METHODS)}")
    d = METHOD_DEFAULTS[method]
    rank = int(cfg.lora_rank if cfg.lora_rank is not None else d.get("lora_rank", 8))
    if cfg.precision is Precision.AUTO:
        precision = "bf16" if fast_bf16_matmul(device) else "fp32"
    elif cfg.precision in (Precision.BF16, Precision.FP32):
        precision = cfg.precision.value
    else:
        raise TrainingError(f"finetune.precision {cfg.precision.value} is not supported: use auto, bf16 or fp32")
    params = TrainParams(
        method=method, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr if cfg.lr is not None else d["lr"],
        layer_decay=(cfg.layer_decay if cfg.layer_decay is not None else d["vit_layer_decay"]) if is_vit
        else (cfg.layer_decay if cfg.layer_decay is not None else 1.0),
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else d["weight_decay"],
        head_lr_scale=cfg.head_lr_scale if cfg.head_lr_scale is not None else d["head_lr_scale"],
        warmup_epochs=cfg.warmup_epochs, min_lr_ratio=cfg.min_lr_ratio,
        label_smoothing=cfg.label_smoothing,
        drop_path=cfg.drop_path if cfg.drop_path is not None else DEFAULT_DROP_PATH,
        crop_scale=tuple(cfg.crop_scale), color_jitter=cfg.color_jitter, randaugment=cfg.randaugment,
        mixup=cfg.mixup, cutmix=cfg.cutmix, ema_decay=cfg.ema_decay, lora_rank=rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * rank, lora_dropout=cfg.lora_dropout,
        partial_blocks=cfg.partial_blocks, freeze_bn_stats=cfg.freeze_bn_stats, patience=cfg.patience,
        precision=precision, grad_checkpointing=cfg.grad_checkpointing, seed=cfg.seed,
    )
    return dataclasses.replace(params, **overrides)


# ---------------------------------------------------------------------------------------------- the model


class Classifier(nn.Module):
    """A timm backbone without its classifier (num_classes=0: it returns the pooled features the frozen protocol
    caches) and a linear head: the inference path's Backbone + head, trainable."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def new_head(in_features: int, n_classes: int, *, seed: int, init: tuple[np.ndarray, np.ndarray] | None = None
             ) -> nn.Linear:
    """The linear head: from ``init`` = (weight (C, D), bias (C,)) (the linear probe, LP-FT), else N(0, 0.01^2)
    weights and zero bias drawn from ``seed`` (the caller's RNG state is left alone)."""
    head = nn.Linear(in_features, n_classes)
    with torch.no_grad():
        if init is not None:
            weight, bias = init
            if weight.shape != (n_classes, in_features) or bias.shape != (n_classes,):
                raise TrainingError(f"the probe's head is {weight.shape}, the model needs ({n_classes}, {in_features})")
            head.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
            head.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
        else:
            generator = torch.Generator().manual_seed(seed)
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
    return head


def layer_map(model: nn.Module, *, coarse: bool) -> tuple[dict[str, int], int]:
    """{parameter name: layer id} from timm's ``group_matcher`` (0 = stem ... last = final norm) and the number
    of layers, over *every* parameter of the unwrapped timm model whatever its ``requires_grad``; a model
    without a group matcher is one layer. Names no group matches (timm #2712: reg_token) go with the stem when
    they are embeddings, else with the last layer, as timm does."""
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters()]
    if not hasattr(model, "group_matcher"):
        return dict.fromkeys(names, 0), 1
    groups = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    n_layers = max(groups.values()) + 1 if groups else 1
    out = {}
    for name in names:
        if name in groups:
            out[name] = groups[name]
        elif re.match(r"(cls_token|reg_token|pos_embed|dist_token)", name):
            out[name] = 0
        else:
            out[name] = n_layers - 1
    return out, n_layers


def base_name(name: str) -> str:
    """A parameter name of a (peft-wrapped) Classifier -> the timm backbone's own name for the weight it belongs
    to ("backbone.base_model.model.blocks.0.attn.qkv.lora_A.default.weight" -> "blocks.0.attn.qkv.weight")."""
    name = name.removeprefix("backbone.").removeprefix("base_model.model.")
    name = re.sub(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.[^.]+(?=\.|$)", "", name)
    return name.replace(".base_layer.", ".")


def lora_targets(model: nn.Module, *, is_vit: bool) -> list[str]:
    """What LoRA adapts: on a ViT the attention qkv / output projections and the MLP layers of every block; on a
    CNN every convolution with groups = 1 and every linear layer except the stem's first convolution (depthwise
    convolutions, norms and the stem stay frozen). Full module names, for peft's ``target_modules``."""
    targets = []
    first_conv = True
    for name, module in model.named_modules():
        if is_vit:
            if isinstance(module, nn.Linear) and re.search(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc\d)$", name):
                targets.append(name)
        elif isinstance(module, nn.Conv2d):
            if first_conv:
                first_conv = False
                continue
            if module.groups == 1:
                targets.append(name)
        elif isinstance(module, nn.Linear):
            targets.append(name)
    if not targets:
        raise TrainingError(f"LoRA found no layer to adapt in {type(model).__name__}: it has no attention or MLP "
                            "projections (ViT) and no dense convolutions (CNN)")
    return targets


@dataclass
class Trainable:
    """The model being fine-tuned and what the recipe needs to know about it."""

    model: Classifier
    layers: dict[str, int]  # backbone parameter name (base_name) -> layer id
    n_layers: int
    no_weight_decay: set[str]
    is_vit: bool
    lora_targets: list[str]

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_for_training(cfg: BackboneConfig, params: TrainParams) -> Backbone:
    """The backbone as ``run`` loads it, with ``params.drop_path`` as its stochastic-depth rate where the model
    has one (timm's ``drop_path_rate``; models without it are loaded as they are)."""
    if params.drop_path > 0:
        try:
            return load_backbone(dataclasses.replace(
                cfg, model_kwargs={**cfg.model_kwargs, "drop_path_rate": params.drop_path}))
        except BackboneError as err:
            if "drop_path_rate" not in str(err):
                raise
    return load_backbone(cfg)


def build_trainable(backbone: Backbone, n_classes: int, params: TrainParams,
                    head_init: tuple[np.ndarray, np.ndarray] | None = None) -> Trainable:
    """Wrap ``backbone`` (loaded with its drop-path rate) and a new head for ``params.method``: every weight
    trainable (full, lp-ft), the last blocks (partial), or peft LoRA adapters (lora); the head always trains."""
    base = backbone.model
    if params.method == "lp-ft" and head_init is None:
        raise TrainingError("lp-ft starts from the linear probe: give its head (the frozen protocol's probe)")
    layers, n_layers = layer_map(base, coarse=False)
    no_wd = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    if params.grad_checkpointing and hasattr(base, "set_grad_checkpointing"):
        base.set_grad_checkpointing(True)
    head = new_head(backbone.feature_dim, n_classes, seed=params.seed, init=head_init)
    targets: list[str] = []
    if params.method in ("full", "lp-ft"):
        base.requires_grad_(True)
    elif params.method == "partial":
        # timm's coarse groups: the stem (0), then one per block (ViT) or stage (CNN), the final norm merged into
        # the last one (ViT, EfficientNet) or absent (ResNet); unmatched names (a ConvNeXt head norm) come last
        coarse, n_coarse = layer_map(base, coarse=True)
        first = max(1, n_coarse - params.partial_blocks)
        base.requires_grad_(False)
        for name, p in base.named_parameters():
            p.requires_grad_(coarse[name] >= first)
    elif params.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(base, is_vit=backbone.is_vit)
        base.requires_grad_(False)
        config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                            target_modules=targets, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(params.seed)  # adapter init (kaiming A, zero B), on the CPU
            base = get_peft_model(base, config)
    head.requires_grad_(True)
    return Trainable(Classifier(base, head), layers, n_layers, no_wd, backbone.is_vit, targets)


def param_groups(t: Trainable, params: TrainParams) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: lr = peak lr x layer scale (x head_lr_scale for the head),
    weight decay off for 1-d parameters and the model's no_weight_decay names. Layer scales are
    ``layer_decay ** (last - layer)`` over timm's fine groups (BEiT / MAE), the head and the final norm at 1; an
    adapter takes the layer of the weight it adapts. Each group records its ``lr_scale`` and ``names``."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    last = t.n_layers - 1
    for name, p in t.model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            scale = params.head_lr_scale
        else:
            key = base_name(name)
            if key not in t.layers:
                raise TrainingError(f"parameter {name} ({key}) is not in the backbone's layer map")
            scale = params.layer_decay ** (last - t.layers[key])
        decay = 0.0 if p.ndim <= 1 or base_name(name) in t.no_weight_decay else params.weight_decay
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr_scale": scale,
                                                   "lr": params.lr * scale, "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_train_mode(model: Classifier, *, freeze_bn_stats: bool) -> None:
    """Train mode, except batch norms that keep their running statistics: all of them with ``freeze_bn_stats``,
    else those whose weights are all frozen (LoRA, partial: otherwise "frozen" layers would still change)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable = [p.requires_grad for p in module.parameters(recurse=False)]
            if freeze_bn_stats or not any(trainable):
                module.eval()


# ---------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class TrainData:
    """Training and validation images with their labels (0..n_classes-1), as the frozen protocol split them."""

    train: tuple[Sample, ...]
    train_labels: np.ndarray
    val: tuple[Sample, ...]
    val_labels: np.ndarray
    n_classes: int
    crop_to_box: bool = False
    reduced_decode: bool = True
    decoder: str = "auto"

    def digest(self) -> str:
        return cache_key({
            "train": [s.sample_id for s in self.train], "train_labels": self.train_labels.tolist(),
            "val": [s.sample_id for s in self.val], "val_labels": self.val_labels.tolist(),
            "n_classes": self.n_classes, "crop": self.crop_to_box, "reduced": self.reduced_decode,
            "decoder": self.decoder,
        })


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU global RNGs seeded with ``seed`` inside, restored after: timm's and
    torchvision's transforms draw from them. Accelerator generators are not touched."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of training image ``index`` in ``epoch``: the same whenever the epoch is replayed."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] % 2**63)


class TrainImages:
    """Training images: decoded (reduced-size for large JPEGs) in a thread pool ahead of the step that needs
    them, then augmented by timm's training transform (random resized crop, flip, colour jitter or RandAugment)
    in the training thread, seeded per (seed, epoch, image) so a resumed epoch sees the same pixels."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, params: TrainParams, *,
                 crop_to_box: bool, reduced_decode: bool) -> None:
        from timm.data import create_transform

        self.samples = tuple(samples)
        self.crop_to_box = crop_to_box
        self.min_side = preprocess.min_side if reduced_decode else None
        self.transform = create_transform(
            input_size=preprocess.input_size, is_training=True, use_prefetcher=True, scale=params.crop_scale,
            hflip=0.5, color_jitter=params.color_jitter if params.color_jitter > 0 else None,
            auto_augment=params.randaugment, interpolation=preprocess.interpolation, mean=preprocess.mean,
            std=preprocess.std,
        )

    def decode(self, index: int) -> Any:
        sample = self.samples[index]
        return load_image(sample.path, box=sample.box if self.crop_to_box else None, min_side=self.min_side)

    def augment(self, image: Any, seed: int) -> torch.Tensor:
        with seeded(seed):
            return self.transform(image)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled micro-batches (seeded by (seed, epoch)); the last incomplete one is dropped (batch
    norm and a stable step size want full batches) unless there is only one."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    full = n // batch_size
    if full == 0:
        return [order]
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


# ---------------------------------------------------------------------------------------------- state


def _rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version":
            random.getstate()[0], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate((state["python_version"], tuple(state["python"]), None))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by ``train`` (tensors and plain values only: ``weights_only``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
        raise TrainingError(f"{path} is not a readable training state ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); delete it to train from the start"
                            ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a dogbench training state (format {STATE_FORMAT}); delete it to train "
                            "from the start")
    return state


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training: the best epoch's weights are ``best_path`` (the Classifier's state dict)."""

    best_path: Path
    best_epoch: int  # 1-based
    best_val_top1: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    trainable_params: int
    total_params: int
    train_wall_s: float  # training and per-epoch validation, summed over resumed sessions
    train_cpu_s: float
    train_images: int  # training images the steps consumed
    images_per_s: float  # train_images / the wall seconds spent in training steps (data loading included)
    peak_memory_mb: float  # CUDA: max allocated; CPU: the largest resident set after a step (sampled every step)
    precision: str
    resumed: bool
    start_val_top1: float | None = None  # lp-ft: validation top-1 before the first step (the probe's head)
    ranks: int = 1  # torchrun's world size (1: one process); the batch is global, split over the ranks


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = DTYPES.get(Precision(precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def evaluate_logits(model: nn.Module, images: ImageDataset, preprocess: Preprocess, *, device: torch.device,
                    precision: str, batch_size: int, memory_format: torch.memory_format) -> np.ndarray:
    """(N, C) float32 logits of ``images`` (the eval transform, decoded as extraction and predict decode them)."""
    model.eval()
    batches = [list(range(s, min(s + batch_size, len(images)))) for s in range(0, len(images), batch_size)]
    out = []
    with torch.inference_mode(), _autocast(device, precision):
        for x, _, errors in iter_batches(images, batches, workers=0, prefetch=1, pin_memory=False):
            bad = [e for e in errors if e]
            if bad:
                raise ImageError(bad[0])
            x = preprocess.normalize(x.to(device)).contiguous(memory_format=memory_format)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Stepper:
    """One training step of the recipe, shared by the loop, ``dogbench bench --train`` and the tests: a uint8
    batch is normalised on the device (channels_last for CNNs), mixed (mixup / cutmix when on), run under
    autocast, and its loss back-propagated (divided by ``grad_accum``); ``optimizer_step`` then steps AdamW
    (parameter groups with their layer scales), the warm-up + cosine schedule and the EMA.

    Under torchrun the model runs inside DistributedDataParallel (``forward_model``; ``model`` stays the plain
    module, whose weights every rank holds alike) and the loss is averaged over the ranks."""

    def __init__(self, trainable: Trainable, preprocess: Preprocess, params: TrainParams, *, device: torch.device,
                 n_classes: int, total_steps: int, steps_per_epoch: int) -> None:
        from timm.loss import SoftTargetCrossEntropy

        self.model, self.preprocess, self.params, self.device = trainable.model, preprocess, params, device
        self.memory_format = torch.preserve_format if trainable.is_vit else torch.channels_last
        self.model.to(device, memory_format=self.memory_format)
        self.ranks = distributed.current()
        if self.ranks.world > 1 and device.type == "cuda" and not params.freeze_bn_stats:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # replaces the Classifier's children in place
        self.forward_model: nn.Module = self.model
        if self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            index = device.index if device.index is not None else torch.cuda.current_device() \
                if device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=None if index is None else [index])
        warmup = min(total_steps, round(params.warmup_epochs * steps_per_epoch))
        self.optimizer = torch.optim.AdamW(param_groups(trainable, params), lr=params.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warmup, min_ratio=params.min_lr_ratio))
        self.ema = None
        if params.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=params.ema_decay)
        self.mixer = None
        if params.mixup > 0 or params.cutmix > 0:
            from timm.data import Mixup

            self.mixer = Mixup(mixup_alpha=params.mixup, cutmix_alpha=params.cutmix,
                               label_smoothing=params.label_smoothing, num_classes=n_classes)
        self.loss_fn = SoftTargetCrossEntropy() if self.mixer is not None else nn.CrossEntropyLoss(
            label_smoothing=params.label_smoothing)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, sync: bool = True) -> float:
        """Forward and backward of one uint8 (B, 3, H, W) batch with labels ``y``; the (unscaled) loss, averaged
        over the ranks under torchrun. ``sync=False``: a micro-batch before the last of an accumulation, whose
        gradients DDP keeps local (``no_sync``) until the last one's backward averages them all."""
        x = self.preprocess.normalize(x.to(self.device, non_blocking=True)).contiguous(
            memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        if self.mixer is not None:
            x, y = self.mixer(x, y)
        local = self.forward_model.no_sync() if not sync and self.forward_model is not self.model else nullcontext()
        with local:
            with _autocast(self.device, self.params.precision):
                loss = self.loss_fn(self.forward_model(x), y)
            value = loss.detach()
            if self.ranks.world > 1:  # every rank sees the same value, so all of them stop together
                value = distributed.all_sum(value.float().clone()) / self.ranks.world
            if not torch.isfinite(value):
                raise TrainingError(f"the training loss became {value.item()}: lower finetune.lr (now "
                                    f"{self.params.lr:g})")
            (loss / self.params.grad_accum).backward()
        return float(value)

    def optimizer_step(self, step: int) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)


def train(
    trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, out_dir: Path, *,
    device: torch.device, checkpoint_every: int = 0, progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None, on_step: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """Train ``trainable`` on ``data.train``, validate on ``data.val`` after every epoch, keep the best epoch's
    weights, stop after ``params.patience`` epochs without improvement; resume from ``out_dir/state.pt`` when it
    was written for these params and data (another state there is replaced, with a warning).

    ``on_epoch(epoch, val_top1)`` runs after each epoch's validation (an Optuna pruner raises from it; under
    torchrun on rank 0 only, and the other ranks stop with it); ``on_step(step)`` after each optimizer step and
    its checkpoint, on every rank.
    """
    accelerators = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    # dropout, drop-path and mixup draw from the global RNGs (the device's too): the caller's states are kept;
    # under torchrun each rank draws its own (seed + rank, as timm's train.py seeds them)
    seed = params.seed + distributed.current().rank
    with seeded(seed), torch.random.fork_rng(devices=accelerators):
        if accelerators:
            torch.cuda.manual_seed(seed)
        return _train(trainable, backbone, data, params, Path(out_dir), device=device,
                      checkpoint_every=checkpoint_every, progress=progress, on_epoch=on_epoch, on_step=on_step)


def _train(
    trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, out_dir: Path, *,
    device: torch.device, checkpoint_every: int, progress: bool,
    on_epoch: Callable[[int, float], None] | None, on_step: Callable[[int], None] | None,
) -> TrainOutcome:
    ranks = distributed.current()
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model = trainable.model
    preprocess = backbone.preprocess
    n = len(data.train)
    if n < 1 or len(data.val) < 1:
        raise TrainingError(f"fine-tuning needs training and validation images, got {n} and {len(data.val)}")
    if ranks.world > 1 and (min(params.batch_size, n) % ranks.world or len(data.val) < ranks.world):
        raise TrainingError(
            f"finetune.batch_size={params.batch_size} is the global batch, split over the {ranks.world} ranks: "
            f"it (or the {n} training images when fewer) must be a multiple of {ranks.world} (e.g. "
            f"{ranks.world * max(1, params.batch_size // ranks.world)}), with at least {ranks.world} validation "
            f"images (there are {len(data.val)})")
    rank_batch = min(params.batch_size, n) // ranks.world
    if (params.mixup > 0 or params.cutmix > 0) and rank_batch % 2:
        raise TrainingError(f"mixup / cutmix need an even batch size per rank, got {rank_batch}")
    steps_per_epoch = max(1, max(1, n // params.batch_size) // params.grad_accum)  # epoch_batches' count
    stepper = Stepper(trainable, preprocess, params, device=device, n_classes=data.n_classes,
                      total_steps=steps_per_epoch * params.epochs, steps_per_epoch=steps_per_epoch)
    optimizer, scheduler, ema = stepper.optimizer, stepper.scheduler, stepper.ema
    images = TrainImages(data.train, preprocess, params, crop_to_box=data.crop_to_box,
                         reduced_decode=data.reduced_decode)
    # validation is split over the ranks (rank r: images r, r + N, ...) and its correct answers summed
    val_labels = data.val_labels[ranks.rank :: ranks.world]
    val_images = ImageDataset.for_preprocess(data.val[ranks.rank :: ranks.world], preprocess,
                                             crop_to_box=data.crop_to_box, reduced_decode=data.reduced_decode,
                                             decoder=effective_decoder(data.decoder, preprocess))
    digest = cache_key({"params": params.to_dict(), "data": data.digest(), "format": STATE_FORMAT,
                        "model": sorted((k, list(v.shape)) for k, v in model.state_dict().items())})
    state_path = out_dir / STATE_FILE
    if ranks.main:
        atomic_write_json(out_dir / "params.json", {"params": params.to_dict(), "digest": digest})

    # ------------------------------------------------------------------ resume or start
    epoch, position, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_top1": -1.0}
    bad_epochs, done, resumed = 0, False, False
    spent = {"wall": 0.0, "cpu": 0.0, "step_wall": 0.0, "images": 0}
    epoch_loss = [0.0, 0]
    start_val: float | None = None
    if state_path.is_file():
        saved = load_state(state_path)  # every rank reads it (a shared filesystem under multi-node torchrun)
        if saved.get("digest") == digest:
            if saved.get("ranks", 1) != ranks.world and not saved["done"]:
                raise TrainingError(
                    f"{state_path} was written by {saved.get('ranks', 1)} rank(s), and the batches and RNGs of the "
                    f"replay depend on it: resume with {saved.get('ranks', 1)} (torchrun --nproc-per-node, times "
                    f"--nnodes), not {ranks.world}, or delete {out_dir} to train from the start")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if ema is not None and saved.get("ema") is not None:
                ema.load_state_dict(saved["ema"])
            _set_rng_state(saved["rng_ranks"][ranks.rank] if ranks.world > 1 else saved["rng"], device)
            epoch, position, step = saved["epoch"], saved["position"], saved["step"]
            history, best, bad_epochs, done = saved["history"], saved["best"], saved["bad_epochs"], saved["done"]
            spent, epoch_loss, start_val = saved["spent"], saved["epoch_loss"], saved.get("start_val")
            resumed = True
        else:
            warnings.warn(f"{state_path} was written for other settings or data; training from the start",
                          stacklevel=2)

    def checkpoint() -> None:
        rngs = distributed.gather(_rng_state(device))  # on every rank (a collective); rank 0 writes them all
        if not ranks.main:
            return
        _save_state(state_path, {
            "format": STATE_FORMAT, "digest": digest, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": rngs[0], "epoch": epoch,
            "position": position, "step": step, "history": history, "best": best, "bad_epochs": bad_epochs,
            "done": done, "spent": spent, "epoch_loss": epoch_loss, "start_val": start_val,
            **({"ranks": ranks.world, "rng_ranks": rngs} if ranks.world > 1 else {}),
        })

    def val_top1(evaluated: nn.Module) -> float:
        logits = evaluate_logits(evaluated, val_images, preprocess, device=device, precision=params.precision,
                                 batch_size=max(params.batch_size, 64), memory_format=stepper.memory_format)
        right = int((logits.argmax(1) == val_labels).sum()) if len(val_labels) else 0
        counts = distributed.all_sum(torch.tensor([right, len(val_labels)], dtype=torch.float64, device=device))
        return float(counts[0] / counts[1]) if ranks.world > 1 else float(right / len(val_labels))

    wall0, cpu0 = time.perf_counter(), _cpu()
    base_wall, base_cpu = spent["wall"], spent["cpu"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=steps_per_epoch * params.epochs, initial=step, unit="step",
               desc=f"{params.method} {backbone.label}" + (f" ({ranks.world} ranks)" if ranks.world > 1 else ""),
               disable=not (progress and ranks.main), leave=False)
    if params.method == "lp-ft" and not resumed:  # where LP-FT starts: the probe's head on the pretrained model
        start_val = val_top1(model)

    def mine(rows: np.ndarray) -> np.ndarray:  # this rank's rows of a global batch (DistributedSampler's split)
        return rows[ranks.rank :: ranks.world]
    pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="train-decode")
    try:
        while not done and epoch < params.epochs:
            batches = epoch_batches(n, params.batch_size, seed=params.seed, epoch=epoch)
            usable = len(batches) - len(batches) % params.grad_accum if len(batches) >= params.grad_accum \
                else len(batches)
            batches = batches[:usable]
            set_train_mode(model, freeze_bn_stats=params.freeze_bn_stats)
            pending = pool.map(images.decode, mine(batches[position])) if position < len(batches) else None
            while position < len(batches):
                t0 = time.perf_counter()
                rows = batches[position]
                local = mine(rows)
                decoded = list(pending)
                if position + 1 < len(batches):  # the next batch decodes while this one trains
                    pending = pool.map(images.decode, mine(batches[position + 1]))
                x = torch.stack([images.augment(img, sample_seed(params.seed, epoch, int(i)))
                                 for img, i in zip(decoded, local, strict=True)])
                last = (position + 1) % params.grad_accum == 0 or position + 1 == len(batches)
                loss = stepper.forward_backward(x, torch.from_numpy(data.train_labels[local].astype(np.int64)),
                                                sync=last)
                epoch_loss = [epoch_loss[0] + loss * len(rows), epoch_loss[1] + len(rows)]
                position += 1
                spent["images"] += len(rows)
                if position % params.grad_accum == 0 or position == len(batches):
                    stepper.optimizer_step(step)
                    step += 1
                    bar.update(1)
                    spent["step_wall"] += time.perf_counter() - t0
                    if device.type == "cpu":  # sampled after each step: the training's own peak, not the process's
                        spent["peak_mb"] = max(spent.get("peak_mb", 0.0), _resident_mb())
                    if checkpoint_every and step % checkpoint_every == 0 and position < len(batches):
                        spent["wall"], spent["cpu"] = base_wall + time.perf_counter() - wall0, base_cpu + _cpu() - cpu0
                        checkpoint()
                    if on_step is not None:
                        on_step(step)
                else:
                    spent["step_wall"] += time.perf_counter() - t0
            # ------------------------------------------------------------ validation, best, early stop
            evaluated = ema.module if ema is not None else model
            top1 = val_top1(evaluated)
            history.append({"epoch": epoch + 1, "train_loss": epoch_loss[0] / max(1, epoch_loss[1]),
                            "val_top1": top1, "lr": float(optimizer.param_groups[0]["lr"]), "step": step})
            if top1 > best["val_top1"]:
                # a file per best epoch, written before the state that names it: a kill between the two leaves
                # the state's own best file in place (the newer one is replaced when the epoch is replayed)
                best = {"epoch": epoch + 1, "val_top1": top1}
                if ranks.main:
                    atomic_write_bytes(best_file(out_dir, epoch + 1), safetensors.torch.save(_tensors(evaluated)))
                bad_epochs = 0
            else:
                bad_epochs += 1
            epoch, position, epoch_loss = epoch + 1, 0, [0.0, 0]
            done = epoch >= params.epochs or bad_epochs >= params.patience
            spent["wall"], spent["cpu"] = base_wall + time.perf_counter() - wall0, base_cpu + _cpu() - cpu0
            checkpoint()
            for old in out_dir.glob(f"{BEST_PREFIX}*.safetensors") if ranks.main else ():  # only the state's best
                if old != best_file(out_dir, best["epoch"]):
                    old.unlink(missing_ok=True)
            if progress:
                bar.set_postfix(val_top1=f"{top1:.4f}", best=f"{best['val_top1']:.4f}")
            stop, raised = [False], None
            if on_epoch is not None and ranks.main:
                try:
                    on_epoch(epoch, top1)
                except BaseException as err:  # noqa: BLE001 - re-raised below, once the other ranks know
                    stop, raised = [True], err
            if ranks.world > 1:
                stop = distributed.broadcast(stop)
            if raised is not None:
                raise raised
            if stop[0]:  # rank 0's on_epoch stopped this training (an Optuna pruner): the other ranks end too
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    best_path = best_file(out_dir, best["epoch"])
    if ranks.main and not best_path.is_file():
        raise TrainingError(f"{best_path} is missing although {state_path} says training finished; delete "
                            f"{out_dir} to train again")
    if device.type == "cuda":
        spent["peak_mb"] = max(spent.get("peak_mb", 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    peak = spent.get("peak_mb", 0.0)
    return TrainOutcome(
        best_path=best_path, best_epoch=int(best["epoch"]), best_val_top1=float(best["val_top1"]),
        epochs_run=len(history), stopped_early=len(history) < params.epochs, history=history,
        trainable_params=trainable.trainable_params, total_params=trainable.total_params,
        train_wall_s=float(spent["wall"]), train_cpu_s=float(spent["cpu"]), train_images=int(spent["images"]),
        images_per_s=spent["images"] / spent["step_wall"] if spent["step_wall"] > 0 else 0.0,
        peak_memory_mb=float(peak), precision=params.precision, resumed=resumed, start_val_top1=start_val,
        ranks=ranks.world,
    )


def best_file(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"{BEST_PREFIX}{epoch}.safetensors"


def _resident_mb() -> float:
    """This process's resident set now (Linux /proc; elsewhere its peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def load_best(trainable: Trainable, path: Path) -> None:
    """The best epoch's weights (``best-epoch<N>.safetensors``) into ``trainable.model``."""
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a torn or foreign file
        raise TrainingError(f"{path} is not readable safetensors ({err}); delete its folder to train again") from None
    try:
        trainable.model.load_state_dict(state)
    except RuntimeError:  # another model's checkpoint
        raise TrainingError(f"{path} does not fit this model: {state_diff(trainable.model.state_dict(), state)}; "
                            "delete its folder to train again") from None


def wise_mix(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (Wortsman et al. 2022): ``(1 - alpha) * start + alpha * tuned`` for every
    floating tensor of a state dict; the others (batch norms' step counters) are the tuned model's."""
    return {k: torch.lerp(start[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in tuned.items()}


def validation_logits(trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, *,
                      device: torch.device) -> np.ndarray:
    """(N, C) logits of ``trainable.model`` on ``data.val`` in one process, as training's per-epoch validation
    computes them (the eval transform, the training precision and memory format)."""
    images = ImageDataset.for_preprocess(data.val, backbone.preprocess, crop_to_box=data.crop_to_box,
                                         reduced_decode=data.reduced_decode,
                                         decoder=effective_decoder(data.decoder, backbone.preprocess))
    return evaluate_logits(trainable.model, images, backbone.preprocess, device=device, precision=params.precision,
                           batch_size=max(params.batch_size, 64),
                           memory_format=torch.preserve_format if trainable.is_vit else torch.channels_last)


def validation_top1(trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, *,
                    device: torch.device) -> float:
    """Top-1 on ``data.val`` as training's per-epoch validation scores it (``validation_logits``)."""
    logits = validation_logits(trainable, backbone, data, params, device=device)
    return float((logits.argmax(1) == data.val_labels).mean())


def load_last(trainable: Trainable, outcome: TrainOutcome) -> None:
    """The last epoch's weights (the EMA's when there is one) from the finished training state, into
    ``trainable.model``: what a refit without held-out data keeps."""
    state = load_state(outcome.best_path.parent / STATE_FILE)
    weights = state["model"]
    if state.get("ema") is not None:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    trainable.model.load_state_dict(weights)


def export(trainable: Trainable) -> tuple[dict[str, torch.Tensor], nn.Linear, dict[str, torch.Tensor] | None]:
    """The fine-tuned model as the inference path loads it: the backbone's state dict (LoRA merged into its
    weights, timm's own names), the head, and for LoRA the adapter's own weights (peft's names)."""
    model = copy.deepcopy(trainable.model).cpu().float()
    adapter = None
    backbone = model.backbone
    if trainable.lora_targets:
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(backbone).items()}
        backbone = backbone.merge_and_unload()
    return _tensors(backbone), model.head, adapter
