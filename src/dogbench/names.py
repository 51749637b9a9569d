"""What to call a model where a reader meets it: "EfficientNet-Lite0 (ImageNet-1k)", not "cnn".

Pure string work on timm tags and a run's recorded model entry (``results.json``), so the report, the demo and
the CLI name models alike without importing torch. ``description`` (``[backbones.<label>] description = ...``)
is the user's own words for the weights and wins over the name read from the tag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

__all__ = ["IMAGENET_TAGS", "ModelName", "architecture_title", "datasets_of_tag", "model_name"]

# Pretraining-tag tokens (timm's ``model.tag`` suffixes) naming data that contains ImageNet's photos, and what they are.
IMAGENET_TAGS: dict[str, str] = {
    "in1k": "ImageNet-1k", "in12k": "ImageNet-12k (a subset of ImageNet-21k)", "in21k": "ImageNet-21k",
    "in22k": "ImageNet-22k", "inw21k": "ImageNet-21k (winter release)", "imagenet": "ImageNet",
    "lvd142m": "LVD-142M (curated around ImageNet-1k/22k)",
    # self-supervised recipes whose timm weights were trained on ImageNet-1k images (no labels)
    "dino": "ImageNet-1k (DINO, self-supervised)", "mae": "ImageNet-1k (MAE, self-supervised)",
    "fcmae": "ImageNet-1k (FCMAE, self-supervised)", "msn": "ImageNet-1k (MSN, self-supervised)",
}

_VIT_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "G"}
_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "xlarge": "XL", "medium": "M", "huge": "H"}
_PREFIXES = {"dinov2": "DINOv2", "dino": "DINO", "clip": "CLIP", "mae": "MAE", "siglip": "SigLIP", "eva": "EVA"}
_PLAIN = [  # (pattern on the architecture, title template)
    (r"(?:tf_)?efficientnet_lite(\d)", "EfficientNet-Lite{0}"),
    (r"(?:tf_)?efficientnet_b(\d)", "EfficientNet-B{0}"),
    (r"(?:tf_)?efficientnetv2_(\w+)", "EfficientNetV2-{0!u}"),
    (r"mobilenetv2_(\d)(\d+)", "MobileNetV2 ({0}.{1}x)"),
    (r"mobilenetv3_(large|small)_(\d)(\d+)", "MobileNetV3-{0!c} ({1}.{2}x)"),
    (r"resnet(\d+)([a-z]?)", "ResNet-{0}{1}"),
    (r"resnext(\d+)_(\w+)", "ResNeXt-{0} {1}"),
    (r"convnext_(\w+)", "ConvNeXt-{0!s}"),
    (r"swin_(\w+?)_patch4_window(\d+)_\d+", "Swin-{0!s} (window {1})"),
    (r"deit_(\w+?)_patch(\d+)_\d+", "DeiT-{0!v}/{1}"),
]


def _convert(value: str, how: str) -> str:
    return {"u": value.upper(), "c": value.capitalize(), "s": _SIZES.get(value, value),
            "v": _VIT_SIZES.get(value, value)}[how]


def _fill(template: str, groups: tuple[str, ...]) -> str:
    return re.sub(r"\{(\d)(?:!(\w))?\}",
                  lambda m: _convert(groups[int(m[1])], m[2]) if m[2] else groups[int(m[1])], template)


def _vit_title(arch: str) -> str | None:
    m = re.fullmatch(r"vit_(\w+?)_patch(\d+)(?:_(\w+))?", arch)
    if not m or m[1] not in _VIT_SIZES:
        return None
    rest = (m[3] or "").split("_")
    prefix = next((_PREFIXES[t] for t in rest if t in _PREFIXES), "")
    registers = " with registers" if any(t.startswith("reg") for t in rest) else ""
    return f"{prefix} ViT-{_VIT_SIZES[m[1]]}/{m[2]}{registers}".strip()


def architecture_title(tag: str) -> str:
    """A timm tag as people write it: ``vit_small_patch14_dinov2.lvd142m`` -> ``DINOv2 ViT-S/14``;
    ``tf_efficientnet_lite0`` -> ``EfficientNet-Lite0``; the architecture itself when no rule knows it."""
    arch = tag.split(".", 1)[0]
    title = _vit_title(arch)
    if title:
        return title
    for pattern, template in _PLAIN:
        m = re.fullmatch(pattern, arch)
        if m:
            return _fill(template, m.groups())
    return arch


def datasets_of_tag(pretrained_tag: str) -> tuple[str, ...]:
    """The ImageNet-family datasets a pretrained tag (``augreg_in21k_ft_in1k``) names, in order, once each."""
    tokens = pretrained_tag.lower().replace("-", "_").split("_")
    return tuple(dict.fromkeys(IMAGENET_TAGS[t] for t in tokens if t in IMAGENET_TAGS))


_RANDOM = "random initialisation"


@dataclass(frozen=True)
class ModelName:
    """Who a run's model is: its label, a title, the timm tag, where the weights came from and what they saw."""

    label: str
    title: str  # the user's description, else the architecture's title
    tag: str
    weights: str  # "timm's hub weights", "random initialisation" or "a local file (NAME)"
    pretraining: str  # the data's names ("ImageNet-1k", "LVD-142M"), "" when unknown or random
    pretraining_detail: str = ""  # the same with what each set is: "LVD-142M (curated around ImageNet-1k/22k)"

    @property
    def short(self) -> str:
        """``EfficientNet-Lite0 (ImageNet-1k)``: for verdicts and headings."""
        return f"{self.title} ({self.pretraining})" if self.pretraining else self.title

    @property
    def in_sentence(self) -> str:
        """``EfficientNet-Lite0 pretrained on ImageNet-1k (cnn)``: a verdict's subject, label kept for the tables."""
        seen = (f" pretrained on {self.pretraining}" if self.pretraining else
                " with random weights" if self.weights == _RANDOM else "")
        return f"{self.title}{seen} ({self.label})"

    @property
    def full(self) -> str:
        """``cnn is EfficientNet-Lite0 (timm tf_efficientnet_lite0), pretrained on ImageNet-1k, weights from ...``"""
        seen = f", pretrained on {self.pretraining_detail or self.pretraining}" if self.pretraining else ""
        return f"{self.label} is {self.title} (timm {self.tag}){seen}, weights from {self.weights}"


def _weights_words(weights: str) -> str:
    if weights == "hub":
        return "timm's hub"
    if weights == "random":
        return _RANDOM
    return f"a local file ({PurePath(weights).name})"


def model_name(result: Mapping[str, Any]) -> ModelName:
    """The ``ModelName`` of one model entry of ``results.json`` (old runs without ``description`` included)."""
    tag = str(result.get("backbone", result.get("label", "?")))
    recorded = str(result.get("pretraining", ""))  # "in1k: ImageNet-1k ...": the pretrained tag before the colon
    pretrained_tag = recorded.split(":", 1)[0] if ":" in recorded else tag.partition(".")[2]
    weights = str(result.get("weights", "hub"))
    data = () if weights == "random" else datasets_of_tag(pretrained_tag)
    return ModelName(label=str(result.get("label", "?")),
                     title=str(result.get("description") or architecture_title(tag)),
                     tag=tag, weights=_weights_words(weights),
                     pretraining=", ".join(dict.fromkeys(_dataset_name(d) for d in data)),
                     pretraining_detail="; ".join(data))


def _dataset_name(words: str) -> str:
    """``LVD-142M (curated around ImageNet-1k/22k)`` -> ``LVD-142M``: the name without what it is."""
    return words.split(" (", 1)[0]
