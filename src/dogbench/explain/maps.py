"""Where a backbone looks: attention rollout for ViTs, Grad-CAM for CNNs, on the model's own input.

``attention_rollout`` (Abnar & Zuidema 2020) records each block's attention softmax with a hook on timm's
``attn.attn_drop`` while ``fused_attn`` is off (timm's ``utils/attention_extract.py``), and restores both on exit.
``grad_cam`` uses the maintained ``grad-cam`` package on the final feature map (``forward_features``) of a timm
CNN, explaining the breed the run's tuned head predicts. ``explain_image`` / ``explain_pixels`` explain one photo
with one model of a run, with ``predict``'s calibrated top-3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dogbench.backbones import Preprocess
from dogbench.data import ImageError, display_names, load_image
from dogbench.errors import DogbenchError
from dogbench.heads import Head
from dogbench.inference import top_classes
from dogbench.predictor import Box, Predictor

ROLLOUT, GRAD_CAM = "attention rollout", "grad-cam"
METHODS = (ROLLOUT, GRAD_CAM)
TOP_K = 3
DISPLAY_QUANTILE = 0.98  # rollout weights at or above this quantile of the patches get the top colour


class ExplainError(DogbenchError, ValueError):
    """A model, run folder or argument that an explanation method cannot work with; the message says why."""


class HeadFusion(StrEnum):
    """How attention rollout merges the heads of one layer."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Explanation:
    """One image through one backbone: the model's view of it and where the model looked."""

    image: np.ndarray  # (H, W, 3) uint8: the eval transform's resize and crop, before normalisation
    heatmap: np.ndarray  # (H, W) float32 in [0, 1] at input resolution, scaled for display (see _display_map)
    method: str  # one of METHODS
    top3: tuple[tuple[str, float], ...] = ()  # (class name, calibrated probability): predict's; empty without a head
    box: tuple[float, float, float, float] | None = None  # annotated box in input pixels, when given
    target: str | None = None  # what Grad-CAM explains: the predicted class or "pooled feature norm"; None for rollout


# ---------------------------------------------------------------- attention rollout (ViT)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's attention module (timm ``blocks[i].attn`` with ``fused_attn`` and ``attn_drop``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ExplainError(
            f"Attention rollout needs a timm Vision Transformer (model.blocks + model.patch_embed); "
            f"{type(model).__name__} has neither. Use grad_cam for CNNs."
        )
    modules = [getattr(block, "attn", None) for block in blocks]
    unsupported = [i for i, m in enumerate(modules) if not (hasattr(m, "fused_attn") and hasattr(m, "attn_drop"))]
    if unsupported:
        raise ExplainError(
            f"Attention rollout supports timm attention modules with 'fused_attn' and 'attn_drop' "
            f"(vit_*, deit_*, dinov2 ...); blocks {unsupported[:5]} of {type(model).__name__} have other attention."
        )
    return modules


@contextmanager
def _recorded_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record every block's attention softmax (B, heads, N, N) during forward passes inside the block.

    ``fused_attn`` is switched off (scaled_dot_product_attention never materialises the map) and a forward hook
    on ``attn_drop`` (identity in eval mode) sees the softmax; flags and hooks are restored even on errors.
    """
    modules = _attention_modules(model)
    recorded: list[torch.Tensor] = []
    saved = [m.fused_attn for m in modules]
    handles = []
    try:
        for m in modules:
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(lambda _mod, _inp, out: recorded.append(out.detach())))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(modules, saved, strict=True):
            m.fused_attn = flag


def _patch_grid(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    patch_embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
    return tuple(patch_embed.grid_size)


def attention_rollout(
    model: nn.Module,
    x: torch.Tensor,
    *,
    head_fusion: HeadFusion | str = HeadFusion.MEAN,
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention rollout of a timm ViT for a normalised batch ``x`` (B, 3, H, W) -> (B, gh, gw) on the CPU.

    Per layer: fuse the heads (mean, max or min), optionally zero the weakest ``discard_ratio`` of the weights
    (never the class token's attention to itself), add the identity for the residual path and renormalise rows;
    multiply through the layers. The class token's row over the patch tokens, every prefix token (class,
    registers) dropped, reshaped to the patch grid. Models without a class token use the mean patch row.
    Values are the raw rollout weights (non-negative; they do not sum to 1 once prefix tokens are dropped).
    The model should be in eval mode (attention dropout off), as ``load_backbone`` leaves it.
    """
    try:
        fusion = HeadFusion(head_fusion)
    except ValueError:
        raise ExplainError(
            f"Unknown head_fusion {head_fusion!r}. Valid: {', '.join(f.value for f in HeadFusion)}"
        ) from None
    if not 0.0 <= discard_ratio < 1.0:
        raise ExplainError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    with _recorded_attention(model) as recorded, torch.no_grad():
        model(x)
    n_blocks = len(model.blocks)
    if len(recorded) != n_blocks:
        raise ExplainError(
            f"Recorded {len(recorded)} attention maps for {n_blocks} blocks of {type(model).__name__}: its "
            "attention does not go through attn_drop once per block, so rollout cannot follow it"
        )
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    batch, n_tokens = recorded[0].shape[0], recorded[0].shape[-1]
    eye = torch.eye(n_tokens, dtype=torch.float64)
    rollout = eye.expand(batch, n_tokens, n_tokens).clone()
    for attn in recorded:  # (B, heads, N, N), first block first
        fused = {HeadFusion.MEAN: attn.mean(1), HeadFusion.MAX: attn.amax(1), HeadFusion.MIN: attn.amin(1)}[fusion]
        fused = fused.to(dtype=torch.float64, device="cpu")
        if discard_ratio > 0:
            flat = fused.reshape(batch, -1)
            weakest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            flat.scatter_(1, weakest, torch.where(weakest == 0, flat.gather(1, weakest), 0.0))
        layer = fused + eye
        layer = layer / layer.sum(dim=-1, keepdim=True)
        rollout = layer @ rollout
    has_cls = getattr(model, "cls_token", None) is not None
    rows = rollout[:, 0, n_prefix:] if has_cls else rollout[:, n_prefix:, n_prefix:].mean(dim=1)
    grid = _patch_grid(model, x)
    if rows.shape[1] != grid[0] * grid[1]:
        raise ExplainError(
            f"{rows.shape[1]} patch tokens after {n_prefix} prefix tokens do not fill the {grid} patch grid"
        )
    return rows.reshape(batch, *grid).to(torch.float32)


# ---------------------------------------------------------------- Grad-CAM (CNN)


class _FeatureMap(nn.Module):
    """The backbone up to its final feature map (``forward_features``): the layer Grad-CAM explains."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _Explained(nn.Module):
    """Backbone -> pooled features -> the head's standardisation and module -> logits (B, n_classes).

    Without a head the output is the pooled feature norm (B, 1), so Grad-CAM shows what makes the features large.
    """

    def __init__(self, model: nn.Module, classifier: Head | None) -> None:
        super().__init__()
        self.trunk = _FeatureMap(model)
        self.model = model
        self.is_timm = hasattr(model, "forward_features") and hasattr(model, "forward_head")
        self.head = None if classifier is None else classifier.module_
        if classifier is not None:
            self.register_buffer("mean", torch.as_tensor(classifier.mean_, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(classifier.scale_, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # num_classes=0: the pooled (B, D) features; timm models go through the trunk so it can be the target
        pooled = self.model.forward_head(self.trunk(x)) if self.is_timm else self.model(x)
        if self.head is None:
            return pooled.norm(dim=1, keepdim=True)
        return self.head((pooled - self.mean.to(pooled.device)) / self.scale.to(pooled.device))


def _target_layer(wrapper: _Explained, name: str | None) -> nn.Module:
    """An explicit module name, else the final feature map (timm forward_features), else the last Conv2d."""
    model = wrapper.model
    if name is not None:
        try:
            return model.get_submodule(name)
        except AttributeError:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-3:]
            raise ExplainError(
                f"No module '{name}' in {type(model).__name__} for Grad-CAM; e.g. one of {convs}"
            ) from None
    if wrapper.is_timm:
        return wrapper.trunk
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ExplainError(
            f"Grad-CAM needs a CNN: {type(model).__name__} has neither timm's forward_features/forward_head nor "
            "a Conv2d layer. Use attention_rollout for Vision Transformers."
        )
    return convs[-1]


def grad_cam(
    model: nn.Module,
    classifier: Head | None,
    x: torch.Tensor,
    *,
    target: int | None = None,
    target_layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM of a CNN backbone for a normalised batch ``x`` (B, 3, H, W) -> (B, H, W) float32 in [0, 1].

    With a tuned ``classifier`` (a fitted dogbench head) the CAM explains its logit for column ``target`` of
    ``classes_`` (default: each image's predicted class); with ``classifier=None`` it explains the L2 norm of
    the pooled features. The layer is ``target_layer`` (a module name) or, for timm models, the final feature map
    that the global pool reads. The backbone stays frozen (the input carries the gradient) and the grad-cam
    hooks are released on exit.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if x.ndim != 4:
        raise ExplainError(f"grad_cam needs a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    wrapper = _Explained(model, classifier)
    layer = _target_layer(wrapper, target_layer)
    shapes: list[tuple[int, ...]] = []
    probe = layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    cam = GradCAM(model=wrapper, target_layers=[layer])
    try:
        with torch.enable_grad():
            # Frozen parameters: only an input that requires grad makes the feature map's gradient exist.
            inputs = x.detach().clone().requires_grad_(True)
            column = 0 if classifier is None else target  # no head: the wrapper's one output, the feature norm
            targets = None if column is None else [ClassifierOutputTarget(int(column))] * x.shape[0]
            try:
                heatmaps = cam(input_tensor=inputs, targets=targets)
            except ValueError as err:
                if shapes and len(shapes[0]) != 4:
                    raise ExplainError(
                        f"Grad-CAM needs a (B, C, h, w) feature map; {type(model).__name__} gives {shapes[0]}. "
                        "Use attention_rollout for Vision Transformers."
                    ) from None
                raise ExplainError(f"Grad-CAM failed on {type(model).__name__}: {err}") from None
    finally:
        probe.remove()
        cam.activations_and_grads.release()
    return np.clip(np.asarray(heatmaps, dtype=np.float32), 0.0, 1.0)


# ---------------------------------------------------------------- images and boxes


def _resized_size(size: tuple[int, int], preprocess: Preprocess) -> tuple[int, int]:
    """(width, height) after the eval transform's resize step (timm ``transforms_imagenet_eval``)."""
    width, height = size
    crop_h, crop_w = preprocess.input_size[1:]
    scale_h, scale_w = math.floor(crop_h / preprocess.crop_pct), math.floor(crop_w / preprocess.crop_pct)
    if preprocess.crop_mode == "squash":
        return scale_w, scale_h
    if preprocess.crop_mode == "border" or scale_h != scale_w:  # timm ResizeKeepRatio (longest edge for border)
        ratio_h, ratio_w = height / scale_h, width / scale_w
        ratio = max(ratio_h, ratio_w) if preprocess.crop_mode == "border" else min(ratio_h, ratio_w)
        return round(width / ratio), round(height / ratio)
    if width <= height:  # torchvision Resize(int): the short side to scale, the long side truncated
        return scale_w, int(scale_w * height / width)
    return int(scale_h * width / height), scale_h


def _crop_offset(resized: int, crop: int) -> int:
    """Left/top offset of torchvision's centre crop; negative when the image is padded up to the crop."""
    return int(round((resized - crop) / 2.0)) if resized >= crop else -((crop - resized) // 2)


def box_in_input(
    box: Sequence[float], image_size: tuple[int, int], preprocess: Preprocess
) -> tuple[float, float, float, float]:
    """Map a box (xmin, ymin, xmax, ymax) in original pixels of an image of ``image_size`` (width, height)
    through the eval transform (resize, centre crop) to input pixels, clipped to the input."""
    (width, height), (crop_h, crop_w) = image_size, preprocess.input_size[1:]
    resized_w, resized_h = _resized_size(image_size, preprocess)
    fx, fy = resized_w / width, resized_h / height
    dx, dy = _crop_offset(resized_w, crop_w), _crop_offset(resized_h, crop_h)
    x0, y0, x1, y1 = (float(v) for v in box)

    def clip(v: float, hi: int) -> float:
        return min(max(v, 0.0), float(hi))

    xs = (clip(x0 * fx - dx, crop_w), clip(x1 * fx - dx, crop_w))
    ys = (clip(y0 * fy - dy, crop_h), clip(y1 * fy - dy, crop_h))
    return xs[0], ys[0], xs[1], ys[1]


def input_image(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The model's view of ``image``: (H, W, 3) uint8 after the eval resize and crop, before normalisation."""
    chw = np.asarray(preprocess.transform(uint8=True)(image))
    if chw.shape != preprocess.input_size:
        raise ExplainError(f"Eval transform gave shape {chw.shape}, expected {preprocess.input_size}")
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def _display_map(grid: torch.Tensor, size: tuple[int, int], *, clip_quantile: float = DISPLAY_QUANTILE) -> np.ndarray:
    """(gh, gw) weights -> (H, W) in [0, 1] for display: min -> 0, the ``clip_quantile`` patch weight -> 1 (above
    it clipped), bilinear. A few outlier tokens (high-norm "artifact" patches of ViTs without registers) would
    otherwise take the whole colour scale."""
    grid = grid.to(torch.float32)
    low, high = float(grid.min()), float(torch.quantile(grid.flatten(), clip_quantile))
    scaled = ((grid - low) / (high - low) if high > low else torch.zeros_like(grid)).clamp(0.0, 1.0)
    up = F.interpolate(scaled[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return up.clamp(0.0, 1.0).numpy()


def explain_image(model: Predictor, image_path: str | Path, *, box: Box | None = None) -> Explanation:
    """Explain one photo with one model of a run: attention rollout for a ViT, Grad-CAM for a CNN, plus its
    calibrated top-3 when the model has a head.

    The photo is decoded, resized and cropped by the model's own inference path (``Predictor.pixels``: the decoder,
    reduced-size decoding and box crop that extraction and ``predict`` use) and scored by ``predict``'s
    ``Predictor.proba_of_batch`` (over the run's test-time views), so the top-3 is ``predict``'s, probabilities
    included.
    ``box`` (xmin, ymin, xmax, ymax, original pixels) is the crop the model sees when the run cropped to boxes,
    else it is mapped into input pixels for drawing (``Explanation.box``).
    """
    x_u8, _, errors = next(iter(model.pixels([Path(image_path)], boxes=[box], workers=0)))
    if errors[0]:
        raise ImageError(errors[0])
    drawn = None
    if box is not None and not model.crop_to_box:
        drawn = box_in_input(box, load_image(image_path).size, model.backbone.preprocess)
    return dataclasses.replace(explain_pixels(model, x_u8), box=drawn)


def explain_pixels(model: Predictor, x_u8: torch.Tensor, *, features: np.ndarray | None = None) -> Explanation:
    """Explain one uint8 (1, 3, H, W) model input from ``Predictor.pixels``: rollout (ViT) or Grad-CAM of the breed
    the head predicts (CNN), and the top-3 of ``Predictor.proba_of_batch`` (calibrated, over the run's test-time
    views: ``predict``'s numbers).
    ``features``: ``model.features(x_u8)`` when the caller has them already (one forward pass fewer)."""
    pixels = np.ascontiguousarray(x_u8[0].permute(1, 2, 0).numpy())
    backbone, head = model.backbone, model.head
    x = model.runner.prepare(x_u8)
    size = pixels.shape[:2]
    top3: tuple[tuple[str, float], ...] = ()
    column = None
    if head is not None:
        proba = model.proba_of_batch(x_u8, features=features)[0]
        top3 = top_classes(proba, display_names(model.classes), TOP_K)
        # Grad-CAM's target is the head's own column of the predicted class (temperature keeps the argmax)
        column = int(np.flatnonzero(np.asarray(head.classes_).astype(int) == int(np.argmax(proba)))[0])
    target = None
    if backbone.is_vit:
        method, heatmap = ROLLOUT, _display_map(attention_rollout(backbone.model, x)[0], size)
    else:
        method, heatmap = GRAD_CAM, grad_cam(backbone.model, head, x, target=column)[0]
        target = top3[0][0] if top3 else "pooled feature norm"
    return Explanation(image=pixels, heatmap=heatmap, method=method, top3=top3, target=target)

