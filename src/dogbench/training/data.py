"""Training data: the split's images, their seeded augmentation (timm's training transform and random erasing,
seeded per (seed, epoch, image) so a replayed epoch sees the same pixels) and the seeded order of an epoch's
batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dogbench.backbones import Preprocess
from dogbench.data import Sample, load_image
from dogbench.features.cache import cache_key
from dogbench.training.recipe import TrainParams


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
    and random erasing in the training thread, seeded per (seed, epoch, image) so a resumed epoch sees the same
    pixels."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, params: TrainParams, *,
                 crop_to_box: bool, reduced_decode: bool) -> None:
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing

        self.samples = tuple(samples)
        self.crop_to_box = crop_to_box
        self.min_side = preprocess.min_side if reduced_decode else None
        self.transform = create_transform(
            input_size=preprocess.input_size, is_training=True, use_prefetcher=True, scale=params.crop_scale,
            hflip=0.5, color_jitter=params.color_jitter if params.color_jitter > 0 else None,
            auto_augment=params.randaugment, interpolation=preprocess.interpolation, mean=preprocess.mean,
            std=preprocess.std,
        )
        # timm's uint8 (prefetcher) transform leaves erasing to its loader, after normalisation: done here instead,
        # per image, in timm's train.py mode (per-pixel normal noise in normalised units)
        self.eraser = RandomErasing(params.re_prob, mode="pixel", device="cpu") if params.re_prob > 0 else None
        self.mean = torch.tensor(preprocess.mean).view(-1, 1, 1)
        self.std = torch.tensor(preprocess.std).view(-1, 1, 1)

    def decode(self, index: int) -> Any:
        sample = self.samples[index]
        return load_image(sample.path, box=sample.box if self.crop_to_box else None, min_side=self.min_side)

    def augment(self, image: Any, seed: int) -> torch.Tensor:
        """One image's (3, H, W) uint8 training view, the same for the same ``seed``."""
        with seeded(seed):
            x = self.transform(image)
            return x if self.eraser is None else self.erase(x)

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with timm's random erasing (at its chance ``re_prob``): the box's noise, drawn in normalised
        units, back in uint8 pixels (clipped to 0..255) so that normalising on the device gives timm's values."""
        noise = torch.full(x.shape, float("nan"))
        self.eraser(noise)  # writes noise into the erased box, leaves NaN elsewhere
        box = ~noise.isnan()
        if not box.any():
            return x
        pixels = ((self.mean + self.std * noise) * 255).round().clamp(0, 255).to(torch.uint8)
        return torch.where(box, pixels, x)


def draw_probabilities(labels: np.ndarray) -> np.ndarray:
    """Each training image's chance of a draw under ``data.balance = sampler``: every class (with images) equally
    likely, the images of a class equally likely within it."""
    counts = np.bincount(labels)
    return 1.0 / (counts[labels] * np.count_nonzero(counts))


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int,
                  draw: np.ndarray | None = None) -> list[np.ndarray]:
    """The epoch's shuffled micro-batches (seeded by (seed, epoch)); the last incomplete one is dropped (batch
    norm and a stable step size want full batches) unless there is only one. ``draw``: the images' draw
    probabilities (``draw_probabilities``): the epoch is then n draws with replacement, seeded the same way, so a
    replayed or resumed epoch draws the same images."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if draw is None else rng.choice(n, size=n, replace=True, p=draw)
    full = n // batch_size
    if full == 0:
        return [order]
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


def usable_batches(n: int, params: TrainParams, *, epoch: int, draw: np.ndarray | None = None) -> list[np.ndarray]:
    """The epoch's batches that make whole optimizer steps (``grad_accum`` micro-batches each; all of them when
    there are fewer than one step's worth)."""
    batches = epoch_batches(n, params.batch_size, seed=params.seed, epoch=epoch, draw=draw)
    if len(batches) >= params.grad_accum:
        return batches[: len(batches) - len(batches) % params.grad_accum]
    return batches
