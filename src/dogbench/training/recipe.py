"""The fine-tuning recipe: resolved parameters, AdamW parameter groups with layer-wise lr decay, and the
warm-up + cosine schedule (defaults and their sources: docs/guide/finetuning.md)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dogbench.config import FINETUNE_METHODS, Balance, FinetuneConfig, Precision, TuneMetric
from dogbench.device import Policy
from dogbench.errors import DogbenchError
from dogbench.heads.fit import weighted_cross_entropy

if TYPE_CHECKING:
    from dogbench.training.model import Trainable

# Per-method defaults, lr at 32 images per optimizer step (BEiT / MAE, timm, LoRA for ViTs, LP-FT: see the notes)
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
    balance: str = Balance.NONE.value  # data.balance: none | weights (class-weighted loss) | sampler (balanced draws)
    metric: str = TuneMetric.TOP1.value  # tune.metric: the validation score that picks the epoch and the trial
    re_prob: float = 0.0  # random erasing: each training image's chance of an erased (noise-filled) box

    def to_dict(self) -> dict[str, Any]:
        """The fields, less ``balance``, ``metric`` and ``re_prob`` at their defaults: a state saved before they
        existed is still this training's (its digest is unchanged)."""
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        for key, default in (("balance", Balance.NONE.value), ("metric", TuneMetric.TOP1.value), ("re_prob", 0.0)):
            if d[key] == default:
                del d[key]
        return d


def training_precision(cfg: FinetuneConfig, policy: Policy) -> str:
    """``finetune.precision`` resolved: auto is the policy's training precision (bf16 where bf16 matrix products
    are fast, else fp32)."""
    if cfg.precision is Precision.AUTO:
        return policy.train_precision.value
    if cfg.precision in (Precision.BF16, Precision.FP32):
        return cfg.precision.value
    raise TrainingError(f"finetune.precision {cfg.precision.value} is not supported: use auto, bf16 or fp32")


def resolve_params(
    cfg: FinetuneConfig, method: str, *, is_vit: bool, policy: Policy, balance: str = Balance.NONE,
    metric: str = TuneMetric.TOP1, **overrides: Any
) -> TrainParams:
    """The config's settings for ``method`` with its defaults filled in; ``overrides`` (a trial's suggestions:
    lr, layer_decay, weight_decay, lora_rank) win over both. ``balance`` and ``metric``: ``data.balance`` and
    ``tune.metric``."""
    if method not in FINETUNE_METHODS:
        raise TrainingError(f"Unknown fine-tuning method '{method}'. Valid methods: {', '.join(FINETUNE_METHODS)}")
    d = METHOD_DEFAULTS[method]
    rank = int(cfg.lora_rank if cfg.lora_rank is not None else d.get("lora_rank", 8))
    precision = training_precision(cfg, policy)
    layer_decay = cfg.layer_decay if cfg.layer_decay is not None else (d["vit_layer_decay"] if is_vit else 1.0)
    params = TrainParams(
        method=method, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr if cfg.lr is not None else d["lr"], layer_decay=layer_decay,
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
        balance=Balance(balance).value, metric=TuneMetric(metric).value, re_prob=cfg.re_prob,
    )
    return dataclasses.replace(params, **overrides)


def base_name(name: str) -> str:
    """A parameter name of a (peft-wrapped) Classifier -> the timm backbone's own name for the weight it belongs
    to ("backbone.base_model.model.blocks.0.attn.qkv.lora_A.default.weight" -> "blocks.0.attn.qkv.weight")."""
    name = name.removeprefix("backbone.").removeprefix("base_model.model.")
    name = re.sub(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.[^.]+(?=\.|$)", "", name)
    return name.replace(".base_layer.", ".")


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


def loss_function(params: TrainParams, *, mixed: bool, class_weights: torch.Tensor | None,
                  device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: cross-entropy with label smoothing, on mixup / cutmix's soft targets when they mix
    (timm's ``SoftTargetCrossEntropy``), each row weighted by its class's ``class_weights`` (``data.balance =
    weights``: n / (K n_k), as the frozen heads weight theirs)."""
    if class_weights is not None:
        return partial(weighted_cross_entropy, weight=class_weights.to(device), label_smoothing=params.label_smoothing)
    if mixed:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
