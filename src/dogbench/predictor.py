"""One backbone + its preprocessing + its head + the head's temperature -> calibrated probabilities.

The ``Predictor`` is the one inference path: photos go through the very ``ImageDataset`` and ``ModelRunner``
that extraction used, at the run's recorded precision, so ``predict``, ``explain``, the demo, the report and
fine-tuning's test scores all see the same numbers for the same photo. With test-time augmentation
(``evaluate.tta``) an image's probabilities are the mean over its views of their calibrated probabilities
(``evaluate.average_views``), wherever it is scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dogbench.backbones import Backbone
from dogbench.config import FeatureConfig, Tta
from dogbench.data import ImageError, Sample
from dogbench.device import Policy, resolve_workers
from dogbench.errors import DogbenchError
from dogbench.evaluate import average_views, full_proba
from dogbench.features import PLAIN, ImageDataset, ModelRunner, effective_decoder, iter_batches, views_for
from dogbench.heads import Head

ImageInput = str | Path | Image.Image | np.ndarray  # a file, a PIL image, or an (H, W[, 3]) uint8 array
Box = tuple[int, int, int, int]  # (xmin, ymin, xmax, ymax) in original pixels, as Pascal-VOC annotations give it
PROGRESS_FROM = 64  # images: shorter lists get no progress bar


class Predictor:
    """One backbone + its preprocessing + its tuned head, run as the command's ``policy`` says (the run's recorded
    precision for a finished run), decoding as the run extracted features; ``tta``: the run's test-time views."""

    def __init__(
        self, label: str, backbone: Backbone, head: Head | None, *, classes: Sequence[str],
        features: FeatureConfig | None = None, crop_to_box: bool = False, policy: Policy | None = None,
        tta: Tta = Tta.NONE,
    ) -> None:
        features = features or FeatureConfig()
        self.label = label
        self.backbone = backbone
        self.head = head
        self.classes = tuple(classes)  # the dataset's class names; head labels index them
        self.crop_to_box = crop_to_box
        self.tta = Tta(tta)
        self.views = views_for(self.tta)
        self.features_cfg = features
        self.decoder = effective_decoder(features.decoder, backbone.preprocess)
        self.runner = ModelRunner.create(
            backbone, policy=policy or Policy.resolve("cpu", features.precision), compile=features.compile,
            reuse_host_memory=features.reuse_host_memory,
        )
        self.batch_size = self.runner.resolve_batch_size(features.batch_size)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def _image_set(self, samples: tuple[Sample, ...]) -> ImageDataset:
        return ImageDataset.for_preprocess(
            samples, self.backbone.preprocess, crop_to_box=self.crop_to_box,
            reduced_decode=self.features_cfg.reduced_decode, decoder=self.decoder,
        )

    def pixels(
        self, images: Sequence[ImageInput], boxes: Sequence[Box | None] | None = None, *, workers: int | None = None
    ) -> Iterable[tuple[torch.Tensor, list[int], list[str]]]:
        """Batches of (uint8 (B, 3, H, W) model inputs, their indices into ``images``, error texts ("" = ok)).

        Files are decoded exactly as extraction decodes them (the run's decoder, reduced-size decoding, box crop
        when the run cropped to boxes); in-memory images get the same resize and crop (torchvision's uint8 kernels
        with the "auto" decoder, timm's PIL transform with "pil"), but no EXIF rotation or reduced decoding (they
        are pixels already). ``workers`` overrides the run's decode workers (0: this process, e.g. one photo).
        """
        files = [i for i, im in enumerate(images) if isinstance(im, str | Path)]
        if files:
            samples = tuple(Sample(Path(images[i]), str(images[i]), -1, "test", boxes[i] if boxes else None)
                            for i in files)
            batches = [list(range(s, min(s + self.batch_size, len(files)))) for s in range(0, len(files),
                                                                                          self.batch_size)]
            loader = iter_batches(
                self._image_set(samples), batches,
                workers=resolve_workers(self.features_cfg.num_workers if workers is None else workers, self.device),
                prefetch=self.features_cfg.prefetch, pin_memory=self.device.type == "cuda",
            )
            for x, index, errors in loader:
                yield x, [files[int(i)] for i in index], list(errors)
        memory = [i for i, im in enumerate(images) if not isinstance(im, str | Path)]
        tensor_transform = self.backbone.preprocess.tensor_transform() if self.decoder == "auto" else None
        pil_transform = self.backbone.preprocess.transform(uint8=True)

        def prepare(image: ImageInput) -> torch.Tensor:  # the resize and crop a decoded file of this run gets
            picture = as_pil(image)
            if tensor_transform is None:
                return pil_transform(picture)
            return tensor_transform(torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous())

        for start in range(0, len(memory), self.batch_size):
            rows = memory[start : start + self.batch_size]
            yield torch.stack([prepare(images[i]) for i in rows]), rows, [""] * len(rows)

    def features(self, x: torch.Tensor) -> np.ndarray:
        """(B, D) float32 features of a uint8 batch from ``pixels``."""
        return self.runner(x)

    @property
    def temperature(self) -> float | None:
        """The head's calibration (fitted on the validation split), None when it has none."""
        return getattr(self.head, "temperature_", None)

    def raw_proba_of_features(self, feats: np.ndarray) -> np.ndarray:
        """(B, n_classes) float64 probabilities over every class of the run's dataset, before calibration."""
        if self.head is None:
            raise DogbenchError(f"'{self.label}' has no tuned head in this run: run `dogbench evaluate` on it first")
        return full_proba(self.head.predict_proba(feats), self.head.classes_, len(self.classes))

    def view_proba(self, x: torch.Tensor, *, plain: bool = False, features: np.ndarray | None = None) -> np.ndarray:
        """(V, B, n_classes) uncalibrated probabilities of a uint8 batch from ``pixels``, one slice per view
        (``plain``: the plain view's alone); ``features``: the plain view's, when already computed."""
        feats = [features if view == PLAIN and features is not None else self.features(view.apply(x))
                 for view in (self.views[:1] if plain else self.views)]
        return np.stack([self.raw_proba_of_features(f) for f in feats])

    def proba_of_batch(self, x: torch.Tensor, *, features: np.ndarray | None = None) -> np.ndarray:
        """(B, n_classes) calibrated probabilities of a uint8 batch, averaged over the views (the probabilities
        of the run's ``predictions.npz``); ``features``: the plain view's, when already computed."""
        return average_views(self.view_proba(x, features=features), self.temperature)

    def predict_proba(
        self, images: Sequence[ImageInput], *, strict: bool = True, progress: bool = False,
        boxes: Sequence[Box | None] | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """(N, n_classes) probabilities (NaN rows for unreadable images) and the error text per image ("" = ok).
        ``strict``: an unreadable image raises ImageError instead. ``boxes``: each file's annotated box, used
        when the run crops to boxes."""
        per_view, errors = self.predict_views(images, strict=strict, progress=progress, boxes=boxes)
        out = np.full((len(images), len(self.classes)), np.nan)
        ok = np.asarray([not e for e in errors], dtype=bool)
        if ok.any():
            out[ok] = average_views(per_view[:, ok], self.temperature)
        return out, errors

    def predict_views(
        self, images: Sequence[ImageInput], *, strict: bool = True, progress: bool = False,
        boxes: Sequence[Box | None] | None = None, plain: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """(V, N, n_classes) uncalibrated probabilities per view (NaN for unreadable images) and the error
        texts, as ``predict_proba`` takes them (fine-tuning's test scoring calibrates them itself); ``plain``:
        the plain view's alone (V = 1: validation)."""
        out = np.full((1 if plain else len(self.views), len(images), len(self.classes)), np.nan)
        errors = [""] * len(images)
        with tqdm(total=len(images), unit="img", desc=f"predict {self.label}",
                  disable=not progress or len(images) < PROGRESS_FROM) as bar:
            for x, rows, errs in self.pixels(images, boxes):
                bad = [(r, e) for r, e in zip(rows, errs, strict=True) if e]
                if bad and strict:
                    raise ImageError(f"{bad[0][1]} (--strict stops here)")
                good = [k for k, e in enumerate(errs) if not e]
                for r, e in bad:
                    errors[r] = e
                if good:
                    out[:, [rows[k] for k in good]] = self.view_proba(x[good], plain=plain)
                bar.update(len(rows))
        return out, errors


def as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4) uint8, got {array.shape} "
                         f"{array.dtype}")
    return Image.fromarray(array).convert("RGB")
