"""Backbones by name: short aliases -> timm tags; weights from the hub, a local file, or random init.

Preprocessing comes from the model's own pretrained config (mean, std, crop, interpolation, input size),
with per-key overrides. Weights from files are loaded with safetensors or ``torch.load(weights_only=True)``,
never plain pickle, then handed to timm's own loader so its checkpoint filters (position-embedding
resampling, classifier removal) apply exactly as for hub weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision.transforms.v2.functional as F2
from timm.data import create_transform, resolve_model_data_config
from torchvision.transforms import InterpolationMode

from dogbench.config import BackboneConfig
from dogbench.data.download import sha256_file
from dogbench.errors import DogbenchError
from dogbench.names import datasets_of_tag

ALIASES: dict[str, str] = {
    "vit_s16": "vit_small_patch16_224.augreg_in21k_ft_in1k",  # = the reference's TF Hub vit_s16_fe
    "vit_b16": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_h14": "vit_huge_patch14_224.orig_in21k",
    "resnet50": "resnet50.tv_in1k",  # closest to Keras' ImageNet ResNet50
    "resnet50_a1": "resnet50.a1_in1k",
    "dinov2_s14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_b14": "vit_base_patch14_dinov2.lvd142m",
    "efficientnet_lite0": "tf_efficientnet_lite0.in1k",
}
WEIGHT_SOURCES = ("hub", "random", "<path to .safetensors / .pt / .pth / .bin>")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class BackboneError(DogbenchError, ValueError):
    """Unknown model name, unreadable or mismatched weights file, or hub weights that cannot be fetched."""


@dataclass(frozen=True)
class Preprocess:
    """The eval transform's parameters: part of the feature-cache key."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str

    def transform(self, *, uint8: bool = False) -> Any:
        """timm's eval transform (resize, centre crop, to tensor, normalise) for PIL images.

        With ``uint8``, it stops before normalising and returns the (3, H, W) uint8 tensor (timm's prefetcher
        form): batches then travel as bytes and ``normalize`` finishes the job on the model's device.
        """
        return create_transform(**dataclasses.asdict(self), is_training=False, use_prefetcher=uint8)

    def tensor_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The eval transform's resize and centre crop for a (3, H, W) uint8 tensor, with torchvision's native
        uint8 kernels (pixels within rounding of PIL's); None where only PIL's path reproduces timm's
        (crop_mode border, non-square centre crops, interpolations tensors lack)."""
        height, width = self.input_size[1:]
        scale = (math.floor(height / self.crop_pct), math.floor(width / self.crop_pct))
        if self.interpolation not in TENSOR_INTERPOLATIONS:
            return None
        if self.crop_mode == "squash":
            size = list(scale)
        elif self.crop_mode == "center" and scale[0] == scale[1]:
            size = [scale[0]]  # the short side, as timm's Resize(int)
        else:
            return None
        return functools.partial(
            _resize_crop, size=size, crop=[height, width], mode=InterpolationMode(self.interpolation)
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 (N, 3, H, W) batch -> float32, exactly as torchvision's ToTensor then Normalize compute it."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)

    @property
    def min_side(self) -> int:
        """Short side the resize step scales an image to (timm: floor(size / crop_pct)). Reduced-size decoding
        (``data.images.load_image(min_side=...)``) keeps ``REDUCING_GAP`` (2) times this, so the resize still
        shrinks by 2x or more."""
        return max(math.floor(size / self.crop_pct) for size in self.input_size[1:])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


TENSOR_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _resize_crop(x: torch.Tensor, *, size: list[int], crop: list[int], mode: InterpolationMode) -> torch.Tensor:
    return F2.center_crop(F2.resize(x, size, interpolation=mode, antialias=True), crop)


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone and what it costs, without the model itself (kept after extraction)."""

    label: str
    tag: str
    weights: str
    weights_sha256: str
    feature_dim: int
    params: int
    preprocess: Preprocess
    is_vit: bool
    description: str | None = None  # the config's words for the weights (names.ModelName.title)


@dataclass
class Backbone:
    """A loaded, frozen feature extractor and everything that identifies its numbers."""

    label: str
    tag: str  # resolved timm tag, e.g. "vit_small_patch16_224.augreg_in21k_ft_in1k"
    weights: str  # "hub", "random" or the file path
    weights_sha256: str  # sha256 of the weights file; for hub/random weights, of the loaded state dict
    model: torch.nn.Module
    preprocess: Preprocess
    model_kwargs: dict[str, Any]
    description: str | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model, "blocks") and hasattr(self.model, "patch_embed")

    def info(self) -> BackboneInfo:
        return BackboneInfo(
            label=self.label, tag=self.tag, weights=self.weights, weights_sha256=self.weights_sha256,
            feature_dim=self.feature_dim, params=self.params, preprocess=self.preprocess, is_vit=self.is_vit,
            description=self.description,
        )


def resolve_model_name(name: str) -> str:
    """An alias or a timm tag -> a timm tag; unknown names get the closest matches and the aliases."""
    if name in ALIASES:
        return ALIASES[name]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name
    candidates = list(dict.fromkeys([*ALIASES, *timm.list_models()]))
    close = [c for c in candidates if c.startswith(arch)][:3] or difflib.get_close_matches(name, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BackboneError(
        f"Unknown backbone '{name}'.{hint} Known aliases: {', '.join(ALIASES)}; or any timm model tag "
        "(python -c 'import timm; print(timm.list_models())')."
    )


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor: identifies hub and random weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint (``weights_only=True``); unwraps common wrappers."""
    if not path.is_file():
        raise BackboneError(f"Weights file {path} does not exist. Valid weights: {', '.join(WEIGHT_SOURCES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad weights file
        raise BackboneError(
            f"Cannot read weights file {path}: {type(err).__name__}: {err}. Expected a .safetensors file or a "
            "torch checkpoint of tensors (loaded with weights_only=True; pickled objects are refused)."
        ) from None
    for wrapper in ("state_dict", "model", "module", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"Weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _without_classifier(state: dict[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
    """Drop the checkpoint's classifier (named by the model's pretrained config): features need none."""
    pretrained_cfg = timm.models.get_pretrained_cfg(tag)
    names = getattr(pretrained_cfg, "classifier", None) or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k: v for k, v in state.items() if not any(k == n or k.startswith(n + ".") for n in names)}


def _preprocess(model: torch.nn.Module, cfg: BackboneConfig) -> Preprocess:
    data_cfg = resolve_model_data_config(model)
    size = cfg.input_size or cfg.model_kwargs.get("img_size")
    if isinstance(size, int):
        data_cfg["input_size"] = (3, size, size)
    elif isinstance(size, list | tuple) and len(size) in (2, 3):
        data_cfg["input_size"] = (3, int(size[-2]), int(size[-1]))
    for key in ("crop_pct", "crop_mode", "interpolation", "mean", "std"):
        value = getattr(cfg, key)
        if value is not None:
            data_cfg[key] = tuple(value) if isinstance(value, list | tuple) else value
    return Preprocess(
        input_size=tuple(int(v) for v in data_cfg["input_size"]),
        interpolation=str(data_cfg["interpolation"]),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        crop_pct=float(data_cfg["crop_pct"]),
        crop_mode=str(data_cfg.get("crop_mode", "center")),
    )


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Create the timm model (classifier removed, eval mode, no grad) with the configured weights.

    ``weights = "random"`` initialises from ``cfg.seed`` without touching the global random state.
    """
    tag = resolve_model_name(cfg.model)
    kwargs = dict(cfg.model_kwargs)
    weights = cfg.weights
    state: dict[str, torch.Tensor] | None = None
    try:
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = timm.create_model(tag, pretrained=False, num_classes=0, **kwargs)
        elif weights == "hub":
            model = _from_hub(tag, kwargs)
        else:
            path = Path(weights).expanduser()
            if path.suffix not in CHECKPOINT_SUFFIXES and not path.is_file():
                raise BackboneError(f"Unknown weights '{weights}'. Valid weights: {', '.join(WEIGHT_SOURCES)}")
            state = _without_classifier(read_state_dict(path), tag)
            # num_classes=0 in the overlay too: timm then loads strictly, so a file for another architecture
            # (no matching keys at all) is an error instead of a silently random model.
            model = timm.create_model(
                tag, pretrained=True, num_classes=0, pretrained_cfg_overlay={"state_dict": state, "num_classes": 0},
                **kwargs,
            )
    except BackboneError:
        raise
    except TypeError as err:
        raise BackboneError(f"Bad model keyword arguments {kwargs} for '{tag}': {err}") from None
    except RuntimeError as err:
        if weights in ("hub", "random"):
            raise
        raise BackboneError(
            f"Weights file {weights} does not fit model '{tag}' (kwargs {kwargs}): "
            f"{(_key_diff(tag, kwargs, state) if state is not None else '') or _first_lines(err)}"
        ) from None
    model.eval().requires_grad_(False)
    digest = sha256_file(Path(weights).expanduser()) if weights not in ("hub", "random") else state_dict_digest(model)
    return Backbone(
        label=cfg.label,
        tag=tag,
        weights=weights,
        weights_sha256=digest,
        model=model,
        preprocess=_preprocess(model, cfg),
        model_kwargs=kwargs,
        description=cfg.description,
    )


@dataclass(frozen=True)
class Pretraining:
    """What a backbone's weights were trained on, as far as its timm tag says."""

    tag: str  # the pretrained tag, e.g. "augreg_in21k_ft_in1k"; "" for random weights
    datasets: tuple[str, ...]  # the ImageNet-family datasets it names
    assumed: bool  # weights from a local file: the tag's data is assumed, not known

    @property
    def imagenet(self) -> bool:
        return bool(self.datasets)

    def describe(self) -> str:
        if not self.tag:
            return "random initialisation (no pretraining)"
        data = ", ".join(self.datasets) or "the tag names no ImageNet-family data (not checked further)"
        note = " (assumed from the timm tag: weights from a local file)" if self.assumed else ""
        return f"{self.tag}: {data}{note}"


def pretraining_of(tag: str, weights: str) -> Pretraining:
    """Which ImageNet-family data the weights of ``tag`` saw, read from its pretrained tag (timm's default if none)."""
    if weights == "random":
        return Pretraining("", (), False)
    cfg = timm.models.get_pretrained_cfg(tag)
    pretrained_tag = tag.split(".", 1)[1] if "." in tag else (getattr(cfg, "tag", None) or "")
    return Pretraining(pretrained_tag, datasets_of_tag(pretrained_tag), weights != "hub")


HUB_HELP = (
    "Offline? Download the weights on a connected machine and pass a local file (weights = "
    "\"path/to/model.safetensors\" or --backbone LABEL=MODEL@path), or use weights = \"random\" for a smoke test."
)


def hub_unreachable(tag: str) -> str | None:
    """Why the hub weights of ``tag`` cannot be had right now, or None when they are cached or the hub resolves.

    Checked before timm asks the hub, whose client retries for most of a minute when the network is down.
    """
    hub_id = getattr(timm.models.get_pretrained_cfg(tag), "hf_hub_id", None)
    if not hub_id:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in HUB_FILENAMES):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"'{hub_id}' is not in the local Hugging Face cache and {host} cannot be resolved ({err})"
    return None


def _from_hub(tag: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    reason = hub_unreachable(tag)
    if reason:
        raise BackboneError(f"Cannot fetch pretrained weights for '{tag}': {reason}. {HUB_HELP}")
    try:
        return timm.create_model(tag, pretrained=True, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise BackboneError(
            f"Cannot fetch pretrained weights for '{tag}' from the Hugging Face hub ({type(err).__name__}: "
            f"{_first_lines(err)}). {HUB_HELP}"
        ) from None


def _key_diff(tag: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """``state_diff`` against ``tag``'s own state dict (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        return state_diff(timm.create_model(tag, pretrained=False, num_classes=0, **kwargs).state_dict(), state)


def state_diff(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], shown: int = 4) -> str:
    """What ``state`` (a file's) lacks, has extra and has in the wrong shape against a model's ``own`` state
    dict, counted with the first few names of each: a readable form of torch's wall of key names."""
    own = {k: tuple(v.shape) for k, v in own.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {list(state[k].shape)}, model {list(own[k])}" for k in own
              if k in state and tuple(state[k].shape) != own[k]]

    def part(what: str, names: list[str]) -> str:
        more = f", ... {len(names) - shown} more" if len(names) > shown else ""
        return f"{len(names)} {what} ({', '.join(names[:shown])}{more})"

    found = [part(w, n) for w, n in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", shapes)) if n]
    return "; ".join(found) + (" (another architecture?)" if unexpected and len(missing) == len(own) else "")


def _first_lines(err: BaseException, n: int = 3) -> str:
    return " ".join(str(err).strip().splitlines()[:n])


def measure_gflops(backbone: Backbone) -> float:
    """Forward-pass GFLOPs for one image at the model's input size (torch's flop counter; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *backbone.preprocess.input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        backbone.model(x)
    return counter.get_total_flops() / 1e9
