"""The model being fine-tuned: a timm backbone and a linear head, its trainable part per method (LoRA through
peft, the last blocks, every weight), WiSE-FT's weight mix, and the export the inference path loads."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors.torch
import torch
from torch import nn

from dogbench.backbones import Backbone, BackboneError, load_backbone, state_diff
from dogbench.config import BackboneConfig
from dogbench.training.recipe import TrainingError, TrainParams
from dogbench.training.state import load_state, tensors

if TYPE_CHECKING:
    from dogbench.training.loop import TrainOutcome


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


def _freeze_for(base: nn.Module, params: TrainParams, *, is_vit: bool) -> tuple[nn.Module, list[str]]:
    """``base`` with what ``params.method`` trains left trainable (peft-wrapped for LoRA), and LoRA's targets."""
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

        targets = lora_targets(base, is_vit=is_vit)
        base.requires_grad_(False)
        config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                            target_modules=targets, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(params.seed)  # adapter init (kaiming A, zero B), on the CPU
            return get_peft_model(base, config), targets
    return base, []


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
    base, targets = _freeze_for(base, params, is_vit=backbone.is_vit)
    head.requires_grad_(True)
    return Trainable(Classifier(base, head), layers, n_layers, no_wd, backbone.is_vit, targets)


def set_train_mode(model: Classifier, *, freeze_bn_stats: bool) -> None:
    """Train mode, except batch norms that keep their running statistics: all of them with ``freeze_bn_stats``,
    else those whose weights are all frozen (LoRA, partial: otherwise "frozen" layers would still change)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable = [p.requires_grad for p in module.parameters(recurse=False)]
            if freeze_bn_stats or not any(trainable):
                module.eval()


def load_best(trainable: Trainable, path: Path) -> None:
    """The best epoch's weights (a ``TrainFiles.best`` file) into ``trainable.model``."""
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a torn or foreign file
        raise TrainingError(f"{path} is not readable safetensors ({err}); delete its folder to train again") from None
    try:
        trainable.model.load_state_dict(state)
    except RuntimeError:  # another model's checkpoint
        raise TrainingError(f"{path} does not fit this model: {state_diff(trainable.model.state_dict(), state)}; "
                            "delete its folder to train again") from None


def load_last(trainable: Trainable, outcome: TrainOutcome) -> None:
    """The last epoch's weights (the EMA's when there is one) from the finished training state, into
    ``trainable.model``: what a refit without held-out data keeps."""
    state = load_state(outcome.state_path)
    weights = state["model"]
    if state.get("ema") is not None:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    trainable.model.load_state_dict(weights)


def wise_mix(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (Wortsman et al. 2022): ``(1 - alpha) * start + alpha * tuned`` for every
    floating tensor of a state dict; the others (batch norms' step counters) are the tuned model's."""
    return {k: torch.lerp(start[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in tuned.items()}


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
    return tensors(backbone), model.head, adapter
