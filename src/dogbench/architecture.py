"""``dogbench models``: a timm architecture described from the model itself, built on the meta device.

The meta device gives every parameter a shape and no storage, so ViT-H/14 (632M parameters, 2.5 GB in float32) is
described in a fraction of a second, with no memory and no download. For the ViT paper's three variants
(Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Table 1) the table puts the paper's row beside the
model's and checks layers, hidden size D, MLP size and heads against it; parameters are the models' own count.

What ``layers`` means depends on the family: transformer blocks for a ViT (``len(model.blocks)``); residual or
inverted-residual blocks for a CNN, summed over its stages (ResNet50: 3 + 4 + 6 + 3 = 16, the "50" counts weight
layers instead); None where the model has no recognisable blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from dogbench.backbones import BackboneError, resolve_model_name


class Family(enum.StrEnum):
    VIT = "vit"  # a plain stack of transformer blocks over patch tokens
    CNN = "cnn"  # convolutions and no attention anywhere
    OTHER = "other"  # hierarchical transformers, hybrids, MLP-mixers, ...


@dataclass(frozen=True)
class PaperRow:
    """One row of the ViT paper's Table 1; ``params_m`` is the paper's rounded figure in millions."""

    name: str
    layers: int
    hidden_size: int
    mlp_size: int
    heads: int
    params_m: int


PAPER_TABLE1: dict[str, PaperRow] = {
    "vit_base_patch16_224": PaperRow("ViT-Base", layers=12, hidden_size=768, mlp_size=3072, heads=12, params_m=86),
    "vit_large_patch16_224": PaperRow("ViT-Large", layers=24, hidden_size=1024, mlp_size=4096, heads=16, params_m=307),
    "vit_huge_patch14_224": PaperRow("ViT-Huge", layers=32, hidden_size=1280, mlp_size=5120, heads=16, params_m=632),
}
PAPER = 'Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Table 1'
DEFAULT_MODELS = ("vit_s16", "vit_b16", "vit_l16", "vit_h14", "resnet50")


@dataclass(frozen=True)
class Architecture:
    """What a timm model is made of, read off the model itself (see the module docstring for ``layers``)."""

    name: str  # as asked for: a dogbench alias or a timm tag
    tag: str  # the resolved timm tag
    family: Family
    layers: int | None
    stages: tuple[int, ...] | None  # blocks per stage for staged models, e.g. ResNet50 (3, 4, 6, 3)
    hidden_size: int  # ViT: the token width D (embed_dim); others: the pooled feature width (num_features)
    mlp_size: int | None  # ViT: the width inside each block's MLP
    heads: int | None  # ViT: attention heads per block
    patch_size: tuple[int, int] | None
    image_size: tuple[int, int] | None
    num_classes: int
    params: int  # counted from the model's parameters, classifier of ``num_classes`` included

    @property
    def arch(self) -> str:
        """The timm tag without its pretrained tag: ``vit_base_patch16_224.augreg_in1k`` -> ``vit_base_patch16_224``."""
        return self.tag.split(".", 1)[0]

    @property
    def paper(self) -> PaperRow | None:
        return PAPER_TABLE1.get(self.arch)

    @property
    def matches_paper(self) -> bool | None:
        """Layers, D, MLP size and heads equal the paper's row; None when the paper has no row for it."""
        row = self.paper
        if row is None:
            return None
        return (self.layers, self.hidden_size, self.mlp_size, self.heads) == (
            row.layers, row.hidden_size, row.mlp_size, row.heads,
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-ready (lists for tuples), with the paper's figures beside the model's: one CSV row."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        row = self.paper
        d["family"] = str(self.family)
        d["params_m"] = round(self.params / 1e6, 1)
        d["paper_name"] = row.name if row else None
        d["paper_params_m"] = row.params_m if row else None
        d["matches_paper"] = self.matches_paper
        return d


def meta_model(tag: str, *, num_classes: int = 1000) -> nn.Module:
    """The timm model for ``tag`` with random-init shapes on the meta device: no storage, no weights fetched."""
    try:
        with torch.device("meta"):
            return timm.create_model(tag, pretrained=False, num_classes=num_classes)
    except RuntimeError as err:
        arch = tag.split(".", 1)[0]
        if "Invalid pretrained tag" in str(err):
            known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise BackboneError(f"Unknown pretrained tag in '{tag}'. Known tags of '{arch}': {known}") from None
        raise BackboneError(f"Cannot build '{tag}' on the meta device: {err}") from None


def describe(name: str, *, num_classes: int = 1000) -> Architecture:
    """Describe a dogbench alias or timm tag (with or without its pretrained tag) without weights or memory.

    Cached: the table, its JSON and the paper checks ask for the same few models, and the answer never changes.
    """
    return _describe(name, num_classes)


@functools.lru_cache(maxsize=64)
def _describe(name: str, num_classes: int) -> Architecture:
    tag = resolve_model_name(name)
    return describe_model(meta_model(tag, num_classes=num_classes), name=name, tag=tag)


def describe_model(model: nn.Module, *, name: str, tag: str) -> Architecture:
    """Describe a built timm model (on any device, e.g. a loaded backbone with its model kwargs applied)."""
    num_classes = int(getattr(model, "num_classes", 0))
    family = _family(model)
    stages = _stage_depths(model)
    vit = family is Family.VIT
    block = model.blocks[0] if vit else None
    image_size = _pair(getattr(model.patch_embed, "img_size", None)) if hasattr(model, "patch_embed") else None
    return Architecture(
        name=name,
        tag=tag,
        family=family,
        layers=sum(stages) if stages else _flat_depth(model),
        stages=stages,
        hidden_size=int(getattr(model, "embed_dim", model.num_features) if vit else model.num_features),
        mlp_size=_mlp_size(block) if block is not None else None,
        heads=int(block.attn.num_heads) if block is not None else None,
        patch_size=_patch_size(model),
        image_size=image_size or _pair(_cfg_image_size(model)),
        num_classes=num_classes,
        params=sum(p.numel() for p in model.parameters()),
    )


def _family(model: nn.Module) -> Family:
    blocks = getattr(model, "blocks", None)
    if (
        hasattr(model, "patch_embed")
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
        and hasattr(getattr(blocks[0], "attn", None), "num_heads")
    ):
        return Family.VIT
    has_attention = any(hasattr(m, "num_heads") or isinstance(m, nn.MultiheadAttention) for m in model.modules())
    if not has_attention and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return Family.CNN
    return Family.OTHER


def _stage_depths(model: nn.Module) -> tuple[int, ...] | None:
    """Blocks per stage for timm's staged layouts: ResNet's ``layer1..N``, ``stages`` (ConvNeXt, RegNet, ...),
    ``layers`` of stages (Swin), ``blocks`` of stages (EfficientNet, MobileNet); None for flat stacks."""
    resnet = [stage for i in range(1, 10) if isinstance(stage := getattr(model, f"layer{i}", None), nn.Sequential)]
    if resnet:
        return tuple(len(stage) for stage in resnet)
    for attr in ("stages", "layers", "blocks"):
        stages = getattr(model, attr, None)
        if not isinstance(stages, nn.Sequential | nn.ModuleList) or len(stages) == 0:
            continue
        inner = [getattr(stage, "blocks", stage) for stage in stages]
        if all(isinstance(s, nn.Sequential | nn.ModuleList) for s in inner):
            return tuple(len(s) for s in inner)
    return None


def _flat_depth(model: nn.Module) -> int | None:
    blocks = getattr(model, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else None


def _mlp_size(block: nn.Module) -> int | None:
    """The MLP's hidden width: what its output projection reads (right for plain, gated and SwiGLU MLPs alike)."""
    fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
    return int(fc2.in_features) if isinstance(fc2, nn.Linear) else None


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """Image pixels per token: image size / token grid, so a hybrid's CNN stem counts (R50+ViT-B/16 -> 16)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size, grid_size = _pair(getattr(patch_embed, "img_size", None)), _pair(getattr(patch_embed, "grid_size", None))
    if img_size and grid_size:
        return (img_size[0] // grid_size[0], img_size[1] // grid_size[1])
    return _pair(getattr(patch_embed, "patch_size", None))


def _cfg_image_size(model: nn.Module) -> tuple[int, ...] | None:
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(input_size[-2:]) if input_size else None


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


COLUMNS = ("model", "timm tag", "layers", "hidden D", "MLP", "heads", "patch", "params (M)", "paper (M)", "= paper")


def _cells(a: Architecture) -> tuple[str, ...]:
    layers = "" if a.layers is None else str(a.layers)
    if a.stages and len(a.stages) > 1:
        layers += f" ({'-'.join(map(str, a.stages))})"
    patch = "" if a.patch_size is None else "x".join(map(str, sorted(set(a.patch_size))))
    matches = {True: "yes", False: "no", None: ""}[a.matches_paper]
    return (
        a.name, a.tag, layers, str(a.hidden_size), _blank(a.mlp_size), _blank(a.heads), patch,
        f"{a.params / 1e6:.1f}", _blank(a.paper.params_m if a.paper else None), matches,
    )


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)


def variants_table(names: Sequence[str] = DEFAULT_MODELS, *, num_classes: int = 1000) -> str:
    """The ViT paper's Table 1 recomputed from the timm models, with the paper's figures beside them."""
    archs = [describe(name, num_classes=num_classes) for name in names]
    body = [_cells(a) for a in archs]
    widths = [max(len(row[i]) for row in (COLUMNS, *body)) for i in range(len(COLUMNS))]
    text_columns = 2  # model and tag are left-aligned, numbers right-aligned

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    papers = ", ".join(f"{a.name} = {a.paper.name}" for a in archs if a.paper)
    notes = [
        f"params: counted from each model's parameters (built on the meta device) with a {num_classes}-class head.",
        "layers: transformer blocks (ViT) or residual blocks summed over stages (CNN; per-stage depths in brackets).",
        f"paper: {PAPER}.",
    ]
    if papers:
        notes += [f"paper rows: {papers}.", "'= paper': layers, hidden D, MLP and heads equal the paper's."]
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, body), "", *notes])


def rows(names: Sequence[str] = DEFAULT_MODELS, *, num_classes: int = 1000) -> list[dict[str, Any]]:
    """One flat dict per model (``Architecture.to_dict``), for JSON or ``csv.DictWriter``."""
    return [describe(name, num_classes=num_classes).to_dict() for name in names]


def models_command(names: Sequence[str], *, as_json: bool = False) -> str:
    """What ``dogbench models [NAME ...] [--json]`` prints; no names means ViT-S/16, B/16, L/16, H/14 and ResNet50."""
    names = tuple(names) or DEFAULT_MODELS
    return json.dumps(rows(names), indent=2) if as_json else variants_table(names)
