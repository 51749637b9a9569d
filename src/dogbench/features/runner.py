"""The one forward path: images -> uint8 batches -> the model on its device -> (N, D) features.

``ImageDataset`` decodes, resizes and crops (libjpeg-turbo tensors or PIL, timm's sizes); ``iter_batches`` feeds
them in order (threads on CPU, DataLoader workers on a GPU); ``ModelRunner`` runs the model as the
command's ``device.Policy`` says (device, memory format, precision) and backs off on out-of-memory. Extraction,
training's validation, test scoring, prediction, explanations and benchmarks all go through here, so a photo
gives the same numbers whichever command reads it.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dogbench.backbones import Backbone, Preprocess
from dogbench.config import Precision
from dogbench.data import ImageError, Sample, load_image, read_image
from dogbench.device import Policy, cpu_cores, empty_cache
from dogbench.errors import DogbenchError

CPU_BATCH_SIZE = 64  # throughput on CPU is flat from about 32 images up; memory is the only cost
AUTO_BATCH_SIZES = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized, centre-cropped images as uint8 (3, H, W); an unreadable file yields zeros and its error.

    Normalisation happens on the batch on the model's device (``Preprocess.normalize``), so workers move bytes.
    With ``decoder = "auto"``, RGB and grey JPEGs are decoded by libjpeg-turbo through torchvision.io into a
    uint8 tensor and timm's transform resizes the tensor; PIL decodes everything else, and the JPEGs large
    enough for reduced-size decoding (``min_side``).
    """

    def __init__(
        self, samples: tuple[Sample, ...], transform: Any, *, crop_to_box: bool, input_size: tuple[int, ...],
        min_side: int | None = None, tensor_transform: Any = None,
    ) -> None:
        self.samples = samples
        self.transform = transform  # PIL image -> uint8 tensor (timm's eval transform, prefetcher form)
        self.crop_to_box = crop_to_box
        self.input_size = input_size
        self.min_side = min_side
        self.tensor_transform = tensor_transform  # uint8 tensor -> uint8 tensor; None = decode with PIL only

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        sample = self.samples[index]
        box = sample.box if self.crop_to_box else None
        try:
            if self.tensor_transform is not None:
                image = read_image(sample.path, box=box, min_side=self.min_side)
            else:
                image = load_image(sample.path, box=box, min_side=self.min_side)
        except ImageError as err:
            return torch.zeros(self.input_size, dtype=torch.uint8), index, str(err)
        if isinstance(image, torch.Tensor):
            return self.tensor_transform(image), index, ""
        return self.transform(image), index, ""

    @classmethod
    def for_preprocess(
        cls, samples: tuple[Sample, ...], preprocess: Preprocess, *, crop_to_box: bool, reduced_decode: bool,
        decoder: str,
    ) -> ImageDataset:
        return cls(
            samples, preprocess.transform(uint8=True), crop_to_box=crop_to_box, input_size=preprocess.input_size,
            min_side=preprocess.min_side if reduced_decode else None,
            tensor_transform=preprocess.tensor_transform() if decoder == "auto" else None,
        )


def effective_decoder(decoder: str, preprocess: Preprocess) -> str:
    """``auto`` needs a resize and crop torchvision can do on uint8 tensors; otherwise PIL does all the work."""
    return "auto" if decoder == "auto" and preprocess.tensor_transform() is not None else "pil"


Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 images, dataset indices, error texts ("" = ok)


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> Batch:
    return (
        torch.stack([item[0] for item in items]),
        torch.tensor([item[1] for item in items], dtype=torch.int64),
        [item[2] for item in items],
    )


def iter_batches(
    images: ImageDataset, batches: list[list[int]], *, workers: int, prefetch: int, pin_memory: bool
) -> Iterator[Batch]:
    """The batches in order. ``workers = 0``: decoded in this process by a pool of one thread per core, only
    when the batch is asked for (PIL releases the GIL while decoding and resizing); else DataLoader processes.
    """
    # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are what we measured.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    if workers > 0:
        # Python >= 3.12 warns on every fork of a multi-threaded process, and a process that has touched CUDA
        # always is one: one warning per worker and loader on a GPU. DataLoader forks its workers on Linux by
        # design; they only decode images (no CUDA, one torch thread).
        warnings.filterwarnings("ignore", message=r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)",
                                category=DeprecationWarning)
        yield from torch.utils.data.DataLoader(
            images, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
            prefetch_factor=prefetch, collate_fn=_collate,
        )
        return
    with ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="decode") as pool:
        for batch in batches:
            x, index, errors = _collate(list(pool.map(images.__getitem__, batch)))
            yield (x.pin_memory() if pin_memory else x), index, errors


class ModelRunner:
    """The frozen model on its device, fed uint8 batches: normalise there, in the memory format and precision the
    command's ``Policy`` gives (channels_last for CNNs), forward. Extraction, training's validation, test scoring,
    predict, explain and the demo all run their forward passes here.

    A batch that runs out of GPU memory is split in halves, and later batches run at the smaller size.
    """

    def __init__(
        self, model: torch.nn.Module, preprocess: Preprocess, *, feature_dim: int, policy: Policy, is_vit: bool,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.feature_dim = feature_dim
        self.policy = policy
        self.memory_format = policy.memory_format(is_vit=is_vit)
        self.max_rows: int | None = None  # set after an out-of-memory back-off

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def precision(self) -> Precision:
        return self.policy.precision

    @classmethod
    def create(
        cls, backbone: Backbone, *, policy: Policy, compile: bool = False, reuse_host_memory: bool = True,
    ) -> ModelRunner:
        if reuse_host_memory:
            keep_freed_memory()
        model = backbone.model.to(policy.device, memory_format=policy.memory_format(is_vit=backbone.is_vit))
        if compile:
            model = torch.compile(model)
        return cls(model, backbone.preprocess, feature_dim=backbone.feature_dim, policy=policy,
                   is_vit=backbone.is_vit)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> the model's input on its device: normalised float32 in the model's memory format."""
        x = self.preprocess.normalize(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model alone on a prepared batch, in the run's precision; the features stay on the device."""
        with self.policy.inference():
            return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass of a uint8 batch; the features stay on the device."""
        with torch.inference_mode():
            return self.run_model(self.prepare(x))

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(N, D) float32 features of a uint8 batch, in sub-batches after an out-of-memory back-off."""
        parts: list[np.ndarray] = []
        start = 0
        while start < len(x):
            rows = min(self.max_rows or len(x), len(x) - start)
            try:
                parts.append(self.forward(x[start : start + rows]).float().cpu().numpy())
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise DogbenchError(
                        f"Out of memory on {self.device} for a single image; try features.precision=bf16 or "
                        "a smaller model"
                    ) from None
                self.max_rows = rows // 2
                empty_cache(self.device)
                warnings.warn(f"out of memory on {self.device}: batches now run {self.max_rows} images at a time",
                              stacklevel=2)
                continue
            start += rows
        return np.concatenate(parts)

    def resolve_batch_size(self, batch_size: int | None) -> int:
        """``batch_size`` as given; None on CPU = CPU_BATCH_SIZE; on a GPU, the largest of AUTO_BATCH_SIZES
        whose forward pass fits in memory (tried on zeros, largest first)."""
        if batch_size is not None:
            return batch_size
        if self.device.type == "cpu":
            return CPU_BATCH_SIZE
        return self.largest_fitting_batch()

    def largest_fitting_batch(self) -> int:
        """The largest of AUTO_BATCH_SIZES whose forward pass on zeros does not run out of memory."""
        shape = self.preprocess.input_size
        for size in AUTO_BATCH_SIZES:
            try:
                self.forward(torch.zeros((size, *shape), dtype=torch.uint8))
                return size
            except torch.OutOfMemoryError:
                empty_cache(self.device)
        raise DogbenchError(f"Out of memory on {self.device} for a single image")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and keep freed memory there (no per-tensor mmap/munmap).

    A CPU forward pass allocates and frees activations of tens to hundreds of MB; glibc maps each one fresh
    and unmaps it on free, so every pass pays page faults and page zeroing for all of them. With mmap off and
    a 1 GiB trim threshold the memory is reused instead. Process-wide, idempotent; False where not glibc.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
