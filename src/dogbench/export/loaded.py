"""An export folder back as a classifier: plain timm (``local-dir:``) and timm's own PIL transform, no run folder.

``load_export(folder).top(photo, k)`` gives the top-k breeds with the calibrated probabilities the run's
``predict`` gives (within float32 rounding; the same pixels when the run decoded with PIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from dogbench.data import load_image
from dogbench.export.spec import ExportError
from dogbench.export.timm_model import DOGBENCH_KEY, read_record
from dogbench.predictor import ImageInput, as_pil


@dataclass(frozen=True)
class ExportedModel:
    """A timm export loaded for classification: ``classes`` in output order, ``record`` (where it came from)."""

    path: Path
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]  # PIL image -> normalised (3, H, W) float tensor
    classes: tuple[str, ...]
    record: dict[str, Any]  # label, name, run, dogbench version, ... (config.json's "dogbench")

    @property
    def label(self) -> str:
        return str(self.record.get("label", self.path.name))

    def predict_proba(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, n_classes) float64 calibrated probabilities; a file is decoded as dogbench decodes it (EXIF
        orientation, pixel limits: ImageError when unreadable)."""
        pictures = [load_image(im) if isinstance(im, str | Path) else as_pil(im) for im in images]
        if not pictures:
            return np.zeros((0, len(self.classes)))
        x = torch.stack([self.transform(p) for p in pictures])
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1).double().numpy()

    def top(self, image: ImageInput, k: int = 5) -> tuple[tuple[str, float], ...]:
        """The ``k`` most probable (breed, probability) of one photo, most probable first."""
        if k < 1:
            raise ExportError(f"k must be at least 1, got {k}")
        proba = self.predict_proba([image])[0]
        order = np.argsort(-proba, kind="stable")[:k]
        return tuple((self.classes[j], float(proba[j])) for j in order)


def load_export(folder: str | Path) -> ExportedModel:
    """The timm model of an export folder (``dogbench export --format timm`` or ``space``), on the CPU."""
    folder = Path(folder)
    config = read_record(folder)
    model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval().requires_grad_(False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    classes = tuple(config.get("label_names") or ())
    if len(classes) != model.num_classes:
        raise ExportError(f"{folder}/config.json names {len(classes)} classes for a model of {model.num_classes}")
    return ExportedModel(folder, model, transform, classes, dict(config[DOGBENCH_KEY]))
