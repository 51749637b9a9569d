"""Extract (N, D) features once per (dataset, backbone, weights, preprocessing, precision) into the cache.

The hot loop reads batches from DataLoader workers (decode + the model's eval transform), runs the frozen
model in inference mode (bf16 autocast where the device supports it), and writes one chunk file per
``chunk_size`` images. A killed run resumes at the first missing chunk; batches never straddle chunks, so
a resumed run computes exactly the batches an uninterrupted one would, and the features are identical.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dogbench.backbones import Backbone
from dogbench.cache import CachedFeatures, CacheEntry, Chunk, FeatureCache, cache_key, ids_digest
from dogbench.config import FeatureConfig, Precision
from dogbench.data import Dataset, ImageError, Sample, load_image
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


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, transformed images; an unreadable file yields a zero tensor and its error text."""

    def __init__(
        self, samples: tuple[Sample, ...], transform: Any, *, crop_to_box: bool, input_size: tuple[int, ...]
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.crop_to_box = crop_to_box
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        sample = self.samples[index]
        try:
            image = load_image(sample.path, box=sample.box if self.crop_to_box else None)
        except ImageError as err:
            return torch.zeros(self.input_size), index, str(err)
        return self.transform(image), index, ""


def feature_key(backbone: Backbone, dataset: Dataset, *, crop_to_box: bool, precision: Precision) -> str:
    """The cache key: every image (id, size, mtime; box when cropping), model, weights, preprocessing, precision.

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
) -> FeatureSet:
    """Features for every sample of ``dataset``, from the cache when present, else computed and cached.

    Rows are in sample-id order, whatever order the dataset lists its samples in (train first, test next):
    a new train/test split of the same images is then the same cache entry.
    """
    dataset = dataclasses.replace(dataset, samples=tuple(sorted(dataset.samples, key=lambda s: s.sample_id)))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    key = feature_key(backbone, dataset, crop_to_box=crop_to_box, precision=precision)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "features"
    entry = FeatureCache(cache_root).entry(key)
    sample_ids = [s.sample_id for s in dataset.samples]
    n_computed, extract_s = 0, 0.0
    if not entry.is_complete():
        n_chunks = -(-len(sample_ids) // cfg.chunk_size)
        entry.begin(
            {
                "n": len(sample_ids),
                "dim": backbone.feature_dim,
                "chunk_size": cfg.chunk_size,
                "batch_size": cfg.batch_size,
                "device_type": device.type,
                "ids_sha256": ids_digest(sample_ids),
                "timm_tag": backbone.tag,
                "weights": backbone.weights,
                "weights_sha256": backbone.weights_sha256,
                "preprocess": backbone.preprocess.to_dict(),
                "precision": precision.value,
                "dataset_root": str(dataset.root),
            }
        )
        start = time.perf_counter()
        n_computed = _extract_missing(
            backbone, dataset, entry, cfg=cfg, device=device, precision=precision,
            crop_to_box=crop_to_box, strict=strict, progress=progress,
        )
        extract_s = time.perf_counter() - start
        cached = entry.finalize(n_chunks=n_chunks, sample_ids=sample_ids)
    else:
        cached = entry.load(sample_ids=sample_ids)
    if strict and not cached.ok.all():
        first = cached.sample_ids[int(np.argmin(cached.ok))]
        raise ImageError(f"{first}: {cached.errors[first]} (--strict stops here)")
    return _to_feature_set(
        cached, dataset, n_computed=n_computed, extract_s=extract_s, device=device, precision=precision
    )


def _to_feature_set(
    cached: CachedFeatures, dataset: Dataset, *, n_computed: int, extract_s: float, device: torch.device,
    precision: Precision,
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
        device=_device_name(device),
        precision=precision.value,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def _extract_missing(
    backbone: Backbone,
    dataset: Dataset,
    entry: CacheEntry,
    *,
    cfg: FeatureConfig,
    device: torch.device,
    precision: Precision,
    crop_to_box: bool,
    strict: bool,
    progress: bool,
) -> int:
    """Compute and write every chunk that is not on disk yet; returns the number of images computed."""
    n = len(dataset.samples)
    starts = [s for s in range(0, n, cfg.chunk_size) if not entry.has_chunk(s // cfg.chunk_size)]
    if not starts:
        return 0
    batches = [
        list(range(b, min(b + cfg.batch_size, s + cfg.chunk_size, n)))
        for s in starts
        for b in range(s, min(s + cfg.chunk_size, n), cfg.batch_size)
    ]
    images = ImageDataset(
        dataset.samples, backbone.preprocess.transform(), crop_to_box=crop_to_box,
        input_size=backbone.preprocess.input_size,
    )
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    # channels_last lets oneDNN / cuDNN pick their fast NHWC convolution kernels; ViTs gain nothing from it.
    memory_format = torch.preserve_format if backbone.is_vit else torch.channels_last
    model = backbone.model.to(device, memory_format=memory_format)
    autocast = _Autocast(device.type, DTYPES.get(precision))
    total = sum(len(b) for b in batches)
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, list[str]]]] = {}
    with (
        _exact_fp32(device, precision),
        tqdm(total=total, unit="img", desc=f"extract {backbone.label}", disable=not progress) as bar,
    ):
        for x, index, errors in loader:
            bad = [(int(i), e) for i, e in zip(index, errors, strict=True) if e]
            if bad and strict:
                raise ImageError(f"{dataset.samples[bad[0][0]].sample_id}: {bad[0][1]} (--strict stops here)")
            feats = _forward(model, x, device=device, autocast=autocast, memory_format=memory_format)
            assert feats.shape == (len(index), backbone.feature_dim), f"features {feats.shape}"
            chunk_index = int(index[0]) // cfg.chunk_size
            pending.setdefault(chunk_index, []).append((index.numpy(), feats, list(errors)))
            _flush_complete_chunk(entry, pending, chunk_index, n=n, chunk_size=cfg.chunk_size)
            bar.update(len(index))
    return total


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


@dataclass(frozen=True)
class _Autocast:
    device_type: str
    dtype: torch.dtype | None  # None = no autocast (fp32)

    def context(self) -> Any:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def _forward(
    model: torch.nn.Module, x: torch.Tensor, *, device: torch.device, autocast: _Autocast,
    memory_format: torch.memory_format,
) -> np.ndarray:
    with torch.inference_mode(), autocast.context():
        out = model(x.to(device, non_blocking=True, memory_format=memory_format))
    return out.float().cpu().numpy()


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
