"""Photos -> breed probabilities with a finished run's models: ``load_run(path)`` and its ``predict``.

Each model of a run is a ``Predictor`` (dogbench.predictor): its backbone, preprocessing, tuned head and the
run's feature settings and its test-time views (``evaluate.tta``), so ``predict`` on a run's test images gives
the probabilities of its ``predictions.npz``, and ``explain`` shows what ``predict`` says.

    >>> run = load_run("runs/shared-dev")                      # doctest: +SKIP
    >>> run.predict(["dog.jpg"], top_k=3)[0].top["cnn"]        # doctest: +SKIP
    (('golden retriever', 0.91), ('Labrador retriever', 0.04), ('kuvasz', 0.01))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dogbench.backbones import Backbone, load_backbone
from dogbench.config import FROZEN, BackboneConfig, FeatureConfig, Precision, RunConfig, crops_to_box
from dogbench.data import IMAGE_EXTENSIONS, display_names
from dogbench.data.images import image_files
from dogbench.device import Policy
from dogbench.errors import DogbenchError
from dogbench.features import feature_settings
from dogbench.heads import META_FILE, Head, check_identity, head_identity, load_head
from dogbench.predictor import ImageInput, Predictor
from dogbench.results import ModelResult
from dogbench.rundir import FINETUNED_WEIGHTS, RunDir, RunFolderError

__all__ = ["ImageInput", "ImagePrediction", "LoadedRun", "Predictor", "collect_images", "load_run"]


@dataclass(frozen=True)
class ImagePrediction:
    """One photo through every model of a run: top-k (breed, probability) per model label, or why it failed."""

    image: str  # the path as given, or "<image N>" for an in-memory image
    top: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    error: str | None = None  # the image could not be read; ``top`` is empty

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.error,
                "models": {label: [{"breed": b, "p": p} for b, p in top] for label, top in self.top.items()}}


def _describe(image: ImageInput, index: int) -> str:
    return str(image) if isinstance(image, str | Path) else f"<image {index}>"


@dataclass
class LoadedRun:
    """A finished run's models, ready to classify photos: ``predict``, ``predict_proba``, ``models``, ``classes``."""

    path: Path
    config: RunConfig
    classes: tuple[str, ...]  # display names, in label order: column j of every probability row
    models: dict[str, Predictor]

    def predict_proba(self, images: Sequence[ImageInput] | ImageInput) -> dict[str, np.ndarray]:
        """Per model label, (N, n_classes) float64 probabilities; an unreadable image raises ImageError."""
        images = _as_list(images)
        return {label: m.predict_proba(images, strict=True)[0] for label, m in self.models.items()}

    def predict(
        self, images: Sequence[ImageInput] | ImageInput, *, top_k: int = 5, strict: bool = False,
        progress: bool = False,
    ) -> list[ImagePrediction]:
        """Top-k breeds of every model for each image; unreadable images get ``error`` (``strict``: raise)."""
        images = _as_list(images)
        if top_k < 1:
            raise DogbenchError(f"top_k must be at least 1, got {top_k}")
        per_model = {label: m.predict_proba(images, strict=strict, progress=progress)
                     for label, m in self.models.items()}
        out = []
        for i, image in enumerate(images):
            error = next((errs[i] for _, errs in per_model.values() if errs[i]), None)
            top = {} if error else {label: top_classes(proba[i], self.classes, top_k) for label, (proba, _) in
                                    per_model.items()}
            out.append(ImagePrediction(_describe(image, i), top, error))
        return out


def _as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One image (a path, a PIL image, an (H, W) or (H, W, 3|4) array) or a sequence of them (a list, or an
    (N, H, W, 3) array) -> a list of images."""
    if isinstance(images, str | Path | Image.Image):
        return [images]
    if isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4))):
        return [images]
    return list(images)


def top_classes(proba: np.ndarray, classes: Sequence[str], k: int) -> tuple[tuple[str, float], ...]:
    """The k most probable (class name, probability) of one row, most probable first (ties: lower index)."""
    order = np.argsort(-proba, kind="stable")[:k]
    return tuple((classes[j], float(proba[j])) for j in order)


def run_classes(run: RunDir, cfg: RunConfig) -> tuple[str, ...] | None:
    """The run's class names: as its heads or predictions recorded them; None when neither exists."""
    from dogbench.heads import read_head_meta

    for b in cfg.backbones:
        if (run.head_dir(b.label) / META_FILE).is_file():
            with run.reading(run.head_dir(b.label) / META_FILE, "head"):
                names = read_head_meta(run.head_dir(b.label)).get("class_names")
            if names:
                return tuple(names)
        if run.predictions_path(b.label).is_file():
            return run.read_predictions(b.label).classes
    return None


def load_run(
    path: str | Path, *, device: str = "cpu", batch_size: int | None = None, require_heads: bool = True,
) -> LoadedRun:
    """Every backbone of the run folder ``path`` with its tuned head, on ``device`` (the CPU unless asked).

    Each head is checked against its backbone (timm tag, weights sha256, preprocessing, the feature settings
    predictions will use: precision, decoder, reduced decoding, box crop, compile; and the feature key
    ``results.json`` records): a head for anything else is refused with both identities named. Without
    ``require_heads`` a backbone with no head yet is loaded alone (explanations of the feature norm).
    """
    run = RunDir(path)
    cfg = run.read_config()
    if not cfg.backbones:
        raise RunFolderError(f"{run.config_path} lists no backbones")
    features = cfg.features if batch_size is None else _with_batch(cfg.features, batch_size)
    policy = Policy.resolve(device, features.precision)  # once, before anything else is read or loaded
    results = run.read_results() if require_heads or run.results_path.is_file() else None
    classes = run_classes(run, cfg)
    if classes is None:
        if require_heads:
            raise RunFolderError(f"{run.path} has no tuned heads yet: run `{run.rebuild('head')}` first")
        classes = ()
    models: dict[str, Predictor] = {}
    for bcfg in cfg.backbones:
        backbone = load_backbone(bcfg)
        recorded = results.models.get(bcfg.label) if results else None
        # the precision the run's features were computed in (bf16 on a GPU stays bf16 on the CPU)
        own = _recorded(policy, recorded)
        head = None
        if (run.head_dir(bcfg.label) / META_FILE).is_file() or require_heads:
            head = _checked_head(run, cfg, bcfg, bcfg.label, backbone, features=features, policy=own,
                                 feature_key=recorded.feature_key if recorded else None, what="head")
        models[bcfg.label] = Predictor(bcfg.label, backbone, head, classes=classes, features=features,
                                       crop_to_box=crops_to_box(cfg, bcfg), policy=own, tta=cfg.evaluate.tta)
    for method in (m for m in cfg.finetune.methods if m != FROZEN):
        for bcfg in cfg.backbones:
            record = run.read_finetuned(bcfg.label, method)
            if record is not None:
                label = f"{bcfg.label}/{method}"
                own = _recorded(policy, results.models.get(label) if results else None)
                models[label] = finetuned_model(run, cfg, bcfg, method, classes=classes, features=features,
                                                policy=own)
    return LoadedRun(run.path, cfg, display_names(classes), models)


def finetuned_model(
    run: RunDir, cfg: RunConfig, bcfg: BackboneConfig, method: str, *, classes: Sequence[str],
    features: FeatureConfig, policy: Policy,
) -> Predictor:
    """The model ``<label>/<method>`` that ``dogbench finetune`` wrote: its backbone weights (LoRA merged) and
    its head, checked against each other, through the same Predictor as a frozen backbone's."""
    folder = run.finetuned_dir(bcfg.label, method)
    label = f"{bcfg.label}/{method}"
    weights = folder / FINETUNED_WEIGHTS
    if not weights.is_file():
        raise RunFolderError(f"{weights} is missing; rebuild it with `{run.rebuild('finetune')}`")
    with run.reading(weights, "finetune"):
        backbone = load_backbone(dataclasses.replace(bcfg, label=label, weights=str(weights)))
    head = _checked_head(run, cfg, bcfg, label, backbone, features=features, policy=policy, feature_key=None,
                         what="finetune")
    return Predictor(label, backbone, head, classes=classes, features=features, crop_to_box=crops_to_box(cfg, bcfg),
                     policy=policy, tta=cfg.evaluate.tta)


def _checked_head(
    run: RunDir, cfg: RunConfig, bcfg: BackboneConfig, label: str, backbone: Backbone, *, features: FeatureConfig,
    policy: Policy, feature_key: str | None, what: str,
) -> Head:
    """``label``'s head, refused unless its recorded identity is this backbone's (tag, weights sha256,
    preprocessing, feature settings and, for a frozen head, the feature key); ``what`` names its rebuild command."""
    head_dir = run.head_dir(label)
    with run.reading(head_dir / META_FILE, what):
        head = load_head(head_dir, device=str(policy.device))
    settings = feature_settings(features, crop_to_box=crops_to_box(cfg, bcfg), precision=policy.precision,
                                preprocess=backbone.preprocess)
    check_identity(head.identity_ or {}, head_identity(
        timm_tag=backbone.tag, weights_sha256=backbone.weights_sha256, preprocess=backbone.preprocess.to_dict(),
        features=settings, feature_key=feature_key,
    ), head_dir)
    return head


def _recorded(policy: Policy, recorded: ModelResult | None) -> Policy:
    """The command's policy at the precision ``recorded`` was scored in (the config's when not recorded yet)."""
    return dataclasses.replace(policy, precision=Precision(recorded.precision)) if recorded else policy


def _with_batch(features: FeatureConfig, batch_size: int) -> FeatureConfig:
    if batch_size < 1:
        raise DogbenchError(f"--batch-size must be at least 1, got {batch_size}")
    return dataclasses.replace(features, batch_size=batch_size)


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their extension: an unreadable one is reported, not hidden) and the image files
    under folders (walked, sorted, hidden entries skipped); a path that does not exist is an error."""
    paths = [Path(p) for p in paths]
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += image_files(p)
        elif p.is_file():
            out.append(p)
        else:
            raise DogbenchError(f"No such image file or folder: {p}")
    if not out:
        raise DogbenchError(f"No image files found in {', '.join(map(str, paths))} (extensions: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return out
