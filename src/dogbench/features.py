"""Extract (N, D) features once per (dataset, backbone, weights, preprocessing, precision) into the cache.

The hot loop reads batches from DataLoader workers (decode + the model's eval transform), runs the frozen
model in inference mode (bf16 autocast where the device supports it), and writes one chunk file per
``chunk_size`` images. A killed run resumes at the first missing chunk; batches never straddle chunks, so
a resumed run computes exactly the batches an uninterrupted one would, and the features are identical.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from tqdm.auto import tqdm

from dogbench.backbones import Backbone, Preprocess
from dogbench.cache import CachedFeatures, CacheEntry, Chunk, FeatureCache, cache_key, ids_digest
from dogbench.config import FeatureConfig, Precision
from dogbench.data import Dataset, ImageError, Sample, clamp_box, load_image
from dogbench.download import default_cache_dir
from dogbench.errors import DogbenchError

DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


@dataclass(frozen=True)
class FeatureSet:
    """Features of the readable images of a dataset, with their ids, labels and splits (row-aligned)."""

    key: str
    features: np.ndarray  # (N_ok, D) float32, rows in sample-id order
    sample_ids: tuple[str, ...]
    labels: np.ndarray  # (N_ok,) int64
    splits: np.ndarray  # (N_ok,) str: "train" / "test"
    skipped: tuple[tuple[str, str], ...]  # (sample_id, reason) of unreadable images
    cache_hit: bool  # True when nothing had to be computed
    extract_s: float  # wall seconds spent computing features in this call (0 on a cache hit)
    n_computed: int  # images pushed through the model in this call
    device: str
    precision: str
    batch_size: int | None = None  # images per forward pass when anything was computed

    @property
    def throughput_img_s(self) -> float | None:
        return self.n_computed / self.extract_s if self.n_computed and self.extract_s > 0 else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DogbenchError(f"Unknown device '{name}'. Valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DogbenchError(f"Device '{name}' requested but CUDA is not available here. Valid here: auto, cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DogbenchError(f"Device '{name}' requested but MPS is not available here. Valid here: auto, cpu")
    return device


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """AUTO -> bf16 on a GPU with bf16 support, else fp32 (CPU bf16 without AMX is slower than fp32)."""
    if precision is not Precision.AUTO:
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision.BF16
    return Precision.FP32


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(num_workers: int | None, device: torch.device) -> int:
    """Worker processes: 0 on CPU (decode runs between forward passes on every core), cores - 1 on a GPU."""
    if num_workers is not None:
        return num_workers
    return 0 if device.type == "cpu" else max(1, min(8, cpu_cores() - 1))


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


def read_image(
    path: Path, *, box: tuple[int, int, int, int] | None = None, min_side: int | None = None
) -> Image.Image | torch.Tensor:
    """An image as ``load_image`` gives it (box crop in stored pixels, then EXIF orientation), decoded by
    torchvision.io into a (3, H, W) uint8 tensor when it is an RGB or grey JPEG that reduced-size decoding
    would not shrink; else the PIL image from ``load_image``. Raises ImageError.
    """
    try:
        with Image.open(path) as img:  # the header only: format, mode, size, EXIF
            fmt, mode, size = img.format, img.mode, img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
        return load_image(path, box=box, min_side=min_side)  # raises the ImageError with PIL's reason
    region = clamp_box(box, size, path) if box is not None else (0, 0, *size)
    small = min_side is None or min(region[2] - region[0], region[3] - region[1]) < 2 * min_side
    if fmt != "JPEG" or mode not in ("RGB", "L") or not small:
        return load_image(path, box=box, min_side=min_side)
    try:
        x = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        reason = str(err).rsplit(", ", 1)[-1]  # drop torchvision's "decode_jpeg, <file.cpp>:<line>, " prefix
        raise ImageError(f"cannot read image {path}: {reason}") from None
    if box is not None:
        x = x[:, region[1] : region[3], region[0] : region[2]]
    return _orient(x, orientation).contiguous()


def _orient(x: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """The EXIF orientation's transpose (as ``data.UPRIGHT`` gives PIL) on a (C, H, W) tensor."""
    ops: dict[int, Any] = {
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(-1, -2),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-1, -2),
        6: lambda t: torch.rot90(t, -1, (-2, -1)),
        7: lambda t: t.transpose(-1, -2).flip(-1, -2),
        8: lambda t: torch.rot90(t, 1, (-2, -1)),
    }
    op = ops.get(orientation) if orientation is not None else None
    return op(x) if op is not None else x


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


def feature_key(
    backbone: Backbone, dataset: Dataset, *, crop_to_box: bool, precision: Precision, reduced_decode: bool = True,
    decoder: str = "auto", compiled: bool = False,
) -> str:
    """The cache key: every image (id, size, mtime; box when cropping), model, weights, preprocessing (reduced
    JPEG decoding included), precision, torch.compile.

    Labels and the train/test split are not in it: every image of the dataset is extracted, and they are
    applied on load.
    """
    return cache_key(
        {
            "images": dataset.fingerprint(with_boxes=crop_to_box),
            "crop_to_box": crop_to_box,
            "timm_tag": backbone.tag,
            "model_kwargs": backbone.model_kwargs,
            "weights_sha256": backbone.weights_sha256,
            "preprocess": backbone.preprocess.to_dict(),
            "precision": precision.value,
            "reduced_decode": reduced_decode,
            "decoder": decoder,
            "compile": compiled,
        }
    )


def extract_features(
    backbone: Backbone,
    dataset: Dataset,
    *,
    cfg: FeatureConfig,
    crop_to_box: bool = False,
    strict: bool = False,
    progress: bool = True,
    runner: ModelRunner | None = None,
) -> FeatureSet:
    """Features for every sample of ``dataset``, from the cache when present, else computed and cached.

    Rows are in sample-id order, whatever order the dataset lists its samples in (train first, test next):
    a new train/test split of the same images is then the same cache entry. ``runner`` (a model already on
    its device, e.g. compiled once for several calls) must come from ``ModelRunner.create`` with ``cfg``.
    """
    dataset = dataclasses.replace(dataset, samples=tuple(sorted(dataset.samples, key=lambda s: s.sample_id)))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    key = feature_key(
        backbone, dataset, crop_to_box=crop_to_box, precision=precision, reduced_decode=cfg.reduced_decode,
        decoder=effective_decoder(cfg.decoder, backbone.preprocess), compiled=cfg.compile,
    )
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "features"
    entry = FeatureCache(cache_root).entry(key)
    sample_ids = [s.sample_id for s in dataset.samples]
    n_computed, extract_s, batch_size = 0, 0.0, None
    if not entry.is_complete():
        start = time.perf_counter()
        runner = runner or ModelRunner.create(
            backbone, device=device, precision=precision, compile=cfg.compile, reuse_host_memory=cfg.reuse_host_memory,
        )
        batch_size = runner.resolve_batch_size(cfg.batch_size)
        n_chunks = -(-len(sample_ids) // cfg.chunk_size)
        entry.begin(
            {
                "n": len(sample_ids),
                "dim": backbone.feature_dim,
                "chunk_size": cfg.chunk_size,
                "batch_size": batch_size,
                "device_type": device.type,
                "ids_sha256": ids_digest(sample_ids),
                "timm_tag": backbone.tag,
                "weights": backbone.weights,
                "weights_sha256": backbone.weights_sha256,
                "preprocess": backbone.preprocess.to_dict(),
                "precision": precision.value,
                "reduced_decode": cfg.reduced_decode,
                "decoder": effective_decoder(cfg.decoder, backbone.preprocess),
                "compile": cfg.compile,
                "dataset_root": str(dataset.root),
            }
        )
        n_computed = _extract_missing(
            runner, dataset, entry, cfg=cfg, batch_size=batch_size, crop_to_box=crop_to_box, strict=strict,
            progress=progress, desc=f"extract {backbone.label}",
        )
        extract_s = time.perf_counter() - start
        cached = entry.finalize(n_chunks=n_chunks, sample_ids=sample_ids)
    else:
        cached = entry.load(sample_ids=sample_ids)
    if strict and not cached.ok.all():
        first = cached.sample_ids[int(np.argmin(cached.ok))]
        raise ImageError(f"{first}: {cached.errors[first]} (--strict stops here)")
    return _to_feature_set(
        cached, dataset, n_computed=n_computed, extract_s=extract_s, device=device, precision=precision,
        batch_size=batch_size,
    )


def _to_feature_set(
    cached: CachedFeatures, dataset: Dataset, *, n_computed: int, extract_s: float, device: torch.device,
    precision: Precision, batch_size: int | None,
) -> FeatureSet:
    """The readable rows, with labels and splits from the dataset (its ids equal the cache's, in order)."""
    ok = cached.ok
    skipped = tuple((sid, cached.errors[sid]) for sid, good in zip(cached.sample_ids, ok, strict=True) if not good)
    for sid, reason in skipped:
        warnings.warn(f"skipped unreadable image {sid}: {reason}", stacklevel=2)
    return FeatureSet(
        key=cached.key,
        features=np.ascontiguousarray(cached.features[ok]),
        sample_ids=tuple(sid for sid, good in zip(cached.sample_ids, ok, strict=True) if good),
        labels=np.asarray([s.label for s in dataset.samples], dtype=np.int64)[ok],
        splits=np.asarray([s.split for s in dataset.samples])[ok],
        skipped=skipped,
        cache_hit=n_computed == 0,
        extract_s=extract_s,
        n_computed=n_computed,
        device=device_name(device),
        precision=precision.value,
        batch_size=batch_size,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def _extract_missing(
    runner: ModelRunner,
    dataset: Dataset,
    entry: CacheEntry,
    *,
    cfg: FeatureConfig,
    batch_size: int,
    crop_to_box: bool,
    strict: bool,
    progress: bool,
    desc: str,
) -> int:
    """Compute and write every chunk that is not on disk yet; returns the number of images computed."""
    n = len(dataset.samples)
    starts = [s for s in range(0, n, cfg.chunk_size) if not entry.has_chunk(s // cfg.chunk_size)]
    if not starts:
        return 0
    batches = [
        list(range(b, min(b + batch_size, s + cfg.chunk_size, n)))
        for s in starts
        for b in range(s, min(s + cfg.chunk_size, n), batch_size)
    ]
    preprocess = runner.preprocess
    images = ImageDataset.for_preprocess(
        dataset.samples, preprocess, crop_to_box=crop_to_box, reduced_decode=cfg.reduced_decode,
        decoder=effective_decoder(cfg.decoder, preprocess),
    )
    loader = iter_batches(
        images, batches, workers=resolve_workers(cfg.num_workers, runner.device), prefetch=cfg.prefetch,
        pin_memory=runner.device.type == "cuda",
    )
    total = sum(len(b) for b in batches)
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, list[str]]]] = {}
    with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
        for x, index, errors in loader:
            bad = [(int(i), e) for i, e in zip(index, errors, strict=True) if e]
            if bad and strict:
                raise ImageError(f"{dataset.samples[bad[0][0]].sample_id}: {bad[0][1]} (--strict stops here)")
            feats = runner(x)
            assert feats.shape == (len(index), runner.feature_dim), f"features {feats.shape}"
            chunk_index = int(index[0]) // cfg.chunk_size
            pending.setdefault(chunk_index, []).append((index.numpy(), feats, list(errors)))
            _flush_complete_chunk(entry, pending, chunk_index, n=n, chunk_size=cfg.chunk_size)
            bar.update(len(index))
    return total


class ModelRunner:
    """The frozen model on its device, fed uint8 batches: normalise there, channels_last for CNNs (oneDNN and
    cuDNN pick their fast NHWC kernels; ViTs gain nothing), autocast in the run's precision, forward.

    A batch that runs out of GPU memory is split in halves, and later batches run at the smaller size.
    """

    def __init__(
        self, model: torch.nn.Module, preprocess: Preprocess, *, feature_dim: int, device: torch.device,
        precision: Precision, memory_format: torch.memory_format,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.feature_dim = feature_dim
        self.device = device
        self.precision = precision
        self.memory_format = memory_format
        self.max_rows: int | None = None  # set after an out-of-memory back-off

    @classmethod
    def create(
        cls, backbone: Backbone, *, device: torch.device, precision: Precision, compile: bool = False,
        reuse_host_memory: bool = True,
    ) -> ModelRunner:
        if reuse_host_memory:
            keep_freed_memory()
        memory_format = torch.preserve_format if backbone.is_vit else torch.channels_last
        model = backbone.model.to(device, memory_format=memory_format)
        if compile:
            model = torch.compile(model)
        return cls(
            model, backbone.preprocess, feature_dim=backbone.feature_dim, device=device, precision=precision,
            memory_format=memory_format,
        )

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> the model's input on its device: normalised float32 in the model's memory format."""
        x = self.preprocess.normalize(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model alone on a prepared batch, in the run's precision; the features stay on the device."""
        dtype = DTYPES.get(self.precision)
        with (
            _exact_fp32(self.device, self.precision),
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
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
                _empty_cache(self.device)
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
                _empty_cache(self.device)
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


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def _exact_fp32(device: torch.device, precision: Precision) -> Iterator[None]:
    """fp32 means fp32: no TF32 matmuls or convolutions on CUDA (torch allows TF32 convolutions by default)."""
    if device.type != "cuda" or precision is not Precision.FP32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _flush_complete_chunk(
    entry: CacheEntry,
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, list[str]]]],
    chunk_index: int,
    *,
    n: int,
    chunk_size: int,
) -> None:
    parts = pending[chunk_index]
    start = chunk_index * chunk_size
    size = min(chunk_size, n - start)
    if sum(len(p[0]) for p in parts) < size:
        return
    index = np.concatenate([p[0] for p in parts])
    assert np.array_equal(index, np.arange(start, start + size)), "batches of a chunk arrived out of order"
    errors = np.asarray([e for p in parts for e in p[2]], dtype=str)
    entry.write_chunk(
        chunk_index,
        Chunk(start=start, features=np.concatenate([p[1] for p in parts]), ok=errors == "", errors=errors),
    )
    del pending[chunk_index]
