"""Extract (N, D) features once per (dataset, backbone, weights, preprocessing, precision) into the cache.

The hot loop reads decoded, resized batches (``features.runner.iter_batches``: threads between forward passes
on CPU, DataLoader workers on a GPU), runs the frozen model through ``ModelRunner`` in inference mode (bf16
autocast where the device supports it), and writes one chunk file per ``chunk_size`` images. A killed run
resumes at the first missing chunk; batches never straddle chunks, so a resumed run computes exactly the
batches an uninterrupted one would, and the features are identical.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dogbench import distributed
from dogbench.backbones import Backbone, Preprocess
from dogbench.config import FeatureConfig, Precision
from dogbench.data import Dataset, ImageError
from dogbench.data.download import default_cache_dir
from dogbench.data.images import REDUCING_GAP
from dogbench.device import Policy, device_name, resolve_workers
from dogbench.features.cache import (
    CachedFeatures,
    CacheEntry,
    CacheError,
    Chunk,
    FeatureCache,
    cache_key,
    ids_digest,
)
from dogbench.features.runner import ImageDataset, ModelRunner, effective_decoder, iter_batches
from dogbench.features.views import PLAIN, View


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


def feature_key(
    backbone: Backbone, dataset: Dataset, *, crop_to_box: bool, precision: Precision, reduced_decode: bool = True,
    decoder: str = "auto", compiled: bool = False, memo_dir: Path | None = None, view: View = PLAIN,
) -> str:
    """The cache key: every image's content (sha256; box when cropping), model, weights, preprocessing (reduced
    JPEG decoding included), precision, torch.compile.

    Labels, the train/test split, sample ids and the dataset's layout are not in it: every image of the dataset
    is extracted, and labels and splits are applied on load. ``memo_dir``: where file digests are remembered.
    A test-time view other than the plain one (``features.views``) is in the key, so views never share an entry.
    """
    return cache_key({
        "images": dataset.fingerprint(with_boxes=crop_to_box, memo_dir=memo_dir),
        **_model_components(backbone, crop_to_box=crop_to_box, precision=precision, reduced_decode=reduced_decode,
                            decoder=decoder, compiled=compiled, view=view),
    })


def _model_components(backbone: Backbone, *, crop_to_box: bool, precision: Precision, reduced_decode: bool,
                      decoder: str, compiled: bool, view: View) -> dict:
    """What turns one image into its features: the key's components besides the image set."""
    return {
        "timm_tag": backbone.tag,
        "model_kwargs": backbone.model_kwargs,
        "weights_sha256": backbone.weights_sha256,
        "preprocess": backbone.preprocess.to_dict(),
        **_settings(crop_to_box=crop_to_box, precision=precision, reduced_decode=reduced_decode, decoder=decoder,
                    compiled=compiled),
        **({"view": view.name} if view != PLAIN else {}),  # the plain view keeps the keys it always had
    }


def feature_family(backbone: Backbone, *, cfg: FeatureConfig, crop_to_box: bool, precision: Precision,
                   device_type: str, view: View = PLAIN) -> str:
    """The entries whose rows are interchangeable image by image (``FeatureCache.donor_rows``): the key's
    components besides the images, and the device type (another device gives other low bits)."""
    parts = _model_components(backbone, crop_to_box=crop_to_box, precision=precision,
                              reduced_decode=cfg.reduced_decode, compiled=cfg.compile, view=view,
                              decoder=effective_decoder(cfg.decoder, backbone.preprocess))
    return cache_key({"family": parts, "device_type": device_type})


def _settings(*, crop_to_box: bool, precision: Precision, reduced_decode: bool, decoder: str, compiled: bool) -> dict:
    return {
        "crop_to_box": crop_to_box,
        "precision": precision.value,
        # the decode rule, not only the switch: features cached under an earlier rule are not reused
        "reduced_decode": {"gap": REDUCING_GAP} if reduced_decode else False,
        "decoder": decoder,
        "compile": compiled,
    }


def feature_settings(cfg: FeatureConfig, *, crop_to_box: bool, precision: Precision, preprocess: Preprocess) -> dict:
    """How images become features besides the model (part of the cache key, and of a head's identity): box crop,
    precision, reduced decoding and its rule, the decoder that applies to ``preprocess``, torch.compile."""
    return _settings(crop_to_box=crop_to_box, precision=precision, reduced_decode=cfg.reduced_decode,
                     decoder=effective_decoder(cfg.decoder, preprocess), compiled=cfg.compile)


def extract_features(
    backbone: Backbone,
    dataset: Dataset,
    *,
    cfg: FeatureConfig,
    crop_to_box: bool = False,
    strict: bool = False,
    progress: bool = True,
    runner: ModelRunner | None = None,
    policy: Policy | None = None,
    view: View = PLAIN,
) -> FeatureSet:
    """Features for every sample of ``dataset``, from the cache when present, else computed and cached.

    Rows are in sample-id order, whatever order the dataset lists its samples in (train first, test next). The
    cache entry's rows are in content order (``Dataset.content_ids``): a new split, or the same files listed by
    another layout, is then the same cache entry. ``runner`` (a model already on
    its device, e.g. compiled once for several calls) must come from ``ModelRunner.create`` with ``cfg``.
    ``policy``: the command's device policy (resolved from ``cfg`` when not given). ``view``: the test-time view
    of every model input (``features.views``), cached under its own key.
    """
    memo_dir = default_cache_dir() / "content"
    dataset, sample_ids = _content_order(dataset, crop_to_box=crop_to_box, memo_dir=memo_dir)
    policy = policy or Policy.resolve(cfg.device, cfg.precision)
    device, precision = policy.device, policy.precision
    key = feature_key(
        backbone, dataset, crop_to_box=crop_to_box, precision=precision, reduced_decode=cfg.reduced_decode,
        decoder=effective_decoder(cfg.decoder, backbone.preprocess), compiled=cfg.compile, memo_dir=memo_dir,
        view=view,
    )
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "features"
    entry = FeatureCache(cache_root).entry(key)
    n_computed, extract_s, batch_size = 0, 0.0, None
    ranks = distributed.current()
    if ranks.world > 1:  # rank 0 decides for all whether anything is computed (a barrier waits on every rank)
        cached, n_computed, extract_s, batch_size = _extract_sharded(
            ranks, backbone, dataset, entry, cfg=cfg, policy=policy, runner=runner,
            crop_to_box=crop_to_box, strict=strict, progress=progress, sample_ids=sample_ids, view=view)
    elif entry.is_complete():
        cached = entry.load(sample_ids=sample_ids)
    else:
        cached, n_computed, extract_s, batch_size = _extract_locally(
            backbone, dataset, entry, cfg=cfg, policy=policy, runner=runner,
            crop_to_box=crop_to_box, strict=strict, progress=progress, sample_ids=sample_ids, view=view)
    if strict and not cached.ok.all():
        first = min(np.flatnonzero(~cached.ok), key=lambda i: dataset.samples[i].sample_id)
        reason = cached.errors[sample_ids[first]]
        raise ImageError(f"{dataset.samples[first].sample_id}: {reason} (--strict stops here)")
    return _to_feature_set(
        cached, dataset, n_computed=n_computed, extract_s=extract_s, device=device, precision=precision,
        batch_size=batch_size,
    )


def _content_order(dataset: Dataset, *, crop_to_box: bool, memo_dir: Path) -> tuple[Dataset, list[str]]:
    """``dataset`` with its samples in the cache entry's row order (content id, then sample id) and the entry's
    row ids (the content ids): the same images make the same entry whichever layout listed them."""
    content = dataset.content_ids(with_boxes=crop_to_box, memo_dir=memo_dir)
    order = sorted(range(len(content)), key=lambda i: (content[i], dataset.samples[i].sample_id))
    samples = tuple(dataset.samples[i] for i in order)
    return dataclasses.replace(dataset, samples=samples), [content[i] for i in order]


def _extract_locally(
    backbone: Backbone, dataset: Dataset, entry: CacheEntry, *, cfg: FeatureConfig, policy: Policy,
    runner: ModelRunner | None, crop_to_box: bool, strict: bool, progress: bool, sample_ids: list[str], view: View,
) -> tuple[CachedFeatures, int, float, int | None]:
    """One process: (the cached entry, images computed, seconds, batch size), under the entry's lock."""
    with entry.lock():  # a second process on this key waits here, then reads the entry
        if entry.is_complete():
            return entry.load(sample_ids=sample_ids), 0, 0.0, None
        start = time.perf_counter()
        runner = runner or ModelRunner.create(backbone, policy=policy, compile=cfg.compile,
                                              reuse_host_memory=cfg.reuse_host_memory)
        meta = _entry_meta(backbone, dataset, cfg, sample_ids, device=policy.device, precision=policy.precision,
                           crop_to_box=crop_to_box, view=view)
        batch_size = _resume_batch_size(entry, runner, cfg, meta)
        donors, given = _donors(entry, meta, sample_ids, backbone.feature_dim, pinned=entry.resumable(meta))
        entry.begin({**meta, "batch_size": batch_size, "max_rows": runner.max_rows, "donors": given,
                     "taken_rows": len(donors)})
        n_computed = _extract_missing(
            runner, dataset, entry, cfg=cfg, batch_size=batch_size, crop_to_box=crop_to_box,
            strict=strict, progress=progress, desc=f"extract {backbone.label}", view=view, donors=donors,
        )
        extract_s = time.perf_counter() - start
        cached = entry.finalize(n_chunks=-(-len(sample_ids) // cfg.chunk_size), sample_ids=sample_ids)
    return cached, n_computed, extract_s, batch_size


def _entry_meta(backbone: Backbone, dataset: Dataset, cfg: FeatureConfig, sample_ids: list[str], *,
                device: torch.device, precision: Precision, crop_to_box: bool, view: View) -> dict:
    return {
        "family": feature_family(backbone, cfg=cfg, crop_to_box=crop_to_box, precision=precision,
                                 device_type=device.type, view=view),
        "n": len(sample_ids),
        "dim": backbone.feature_dim,
        "chunk_size": cfg.chunk_size,
        "device_type": device.type,
        "ids_sha256": ids_digest(sample_ids),
        "timm_tag": backbone.tag,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "preprocess": backbone.preprocess.to_dict(),
        **feature_settings(cfg, crop_to_box=crop_to_box, precision=precision, preprocess=backbone.preprocess),
        "dataset_root": str(dataset.root),
    }


def _extract_sharded(
    ranks: distributed.Ranks, backbone: Backbone, dataset: Dataset, entry: CacheEntry, *, cfg: FeatureConfig,
    policy: Policy, runner: ModelRunner | None, crop_to_box: bool, strict: bool, progress: bool,
    sample_ids: list[str], view: View,
) -> tuple[CachedFeatures, int, float, int | None]:
    """Extraction under torchrun: rank 0 starts (or resumes) the entry under its lock and settles the batch
    size; rank r computes the missing chunks whose index is r modulo the world size (the batches one process
    would compute, so the features are the same bits); rank 0 joins them; every rank loads the entry."""
    start = time.perf_counter()
    runner = runner or ModelRunner.create(backbone, policy=policy, compile=cfg.compile,
                                          reuse_host_memory=cfg.reuse_host_memory)
    meta = _entry_meta(backbone, dataset, cfg, sample_ids, device=policy.device, precision=policy.precision,
                       crop_to_box=crop_to_box, view=view)
    complete, taken = [entry.is_complete()], None
    if ranks.main and not complete[0]:
        with entry.lock():
            complete[0] = entry.is_complete()
            if not complete[0]:
                size = _resume_batch_size(entry, runner, cfg, meta)
                taken, given = _donors(entry, meta, sample_ids, backbone.feature_dim, pinned=entry.resumable(meta))
                entry.begin({**meta, "batch_size": size, "max_rows": runner.max_rows, "donors": given,
                             "taken_rows": len(taken)})
    complete = distributed.broadcast(complete)
    if complete[0]:
        return entry.load(sample_ids=sample_ids), 0, 0.0, None
    settled = entry.resumable(meta)  # what rank 0 started the entry with: every rank runs the same batches
    if settled is None:
        raise CacheError(f"cache entry {entry.key[:16]} changed while {ranks} waited for rank 0 to start it")
    batch_size = int(settled["batch_size"])
    runner.max_rows = settled.get("max_rows")
    n_computed = _extract_missing(
        runner, dataset, entry, cfg=cfg, batch_size=batch_size, crop_to_box=crop_to_box, strict=strict,
        progress=progress and ranks.main, desc=f"extract {backbone.label} ({ranks})",
        shard=(ranks.rank, ranks.world), view=view,
        donors=taken if taken is not None else _donors(entry, meta, sample_ids, backbone.feature_dim,
                                                       pinned=settled)[0])  # rank 0 read them when it began
    distributed.barrier()
    if ranks.main:
        with entry.lock():
            entry.finalize(n_chunks=-(-len(sample_ids) // cfg.chunk_size), sample_ids=sample_ids)
    distributed.barrier()
    return entry.load(sample_ids=sample_ids), n_computed, time.perf_counter() - start, batch_size


def _donors(entry: CacheEntry, meta: dict, sample_ids: list[str], dim: int, *,
            pinned: dict | None) -> tuple[dict[int, np.ndarray], list[str]]:
    """The rows this entry takes from complete entries of its family (``FeatureCache.donor_rows``), and their
    keys; an entry already started (``pinned``: its meta) takes only from the entries it took from then, so a
    resumed extraction, and every torchrun rank, takes the same rows."""
    only = None if pinned is None else pinned.get("donors", [])
    return FeatureCache(entry.path.parent).donor_rows(meta["family"], sample_ids, exclude=entry.key, dim=dim,
                                                      only=only)


def _resume_batch_size(entry: CacheEntry, runner: ModelRunner, cfg: FeatureConfig, meta: dict) -> int:
    """The batch size (and out-of-memory back-off) of an unfinished entry whose chunks can be kept, so that the
    resumed run computes the batches an uninterrupted one would; else ``cfg``'s (auto: resolved)."""
    partial = entry.resumable(meta)
    if partial is None:
        return runner.resolve_batch_size(cfg.batch_size)
    if cfg.batch_size is not None and cfg.batch_size != partial["batch_size"]:
        warnings.warn(f"features.batch_size={cfg.batch_size} is ignored: cache entry {entry.key[:16]} was started "
                      f"with batch size {partial['batch_size']} and is resumed with it", stacklevel=3)
    runner.max_rows = partial.get("max_rows")
    return int(partial["batch_size"])


def _to_feature_set(
    cached: CachedFeatures, dataset: Dataset, *, n_computed: int, extract_s: float, device: torch.device,
    precision: Precision, batch_size: int | None,
) -> FeatureSet:
    """The readable rows in sample-id order, with labels and splits from the dataset (its samples are the
    cache's rows, in order)."""
    ids = [s.sample_id for s in dataset.samples]
    skipped = tuple(sorted((sid, cached.errors[cid]) for sid, cid, good
                           in zip(ids, cached.sample_ids, cached.ok, strict=True) if not good))
    for sid, reason in skipped:
        warnings.warn(f"skipped unreadable image {sid}: {reason}", stacklevel=2)
    rows = np.array(sorted(np.flatnonzero(cached.ok), key=lambda i: ids[i]), dtype=np.int64)
    return FeatureSet(
        key=cached.key,
        features=np.ascontiguousarray(cached.features[rows]),
        sample_ids=tuple(ids[i] for i in rows),
        labels=np.asarray([s.label for s in dataset.samples], dtype=np.int64)[rows],
        splits=np.asarray([s.split for s in dataset.samples])[rows],
        skipped=skipped,
        cache_hit=n_computed == 0,
        extract_s=extract_s,
        n_computed=n_computed,
        device=device_name(device),
        precision=precision.value,
        batch_size=batch_size,
    )


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
    shard: tuple[int, int] = (0, 1),
    view: View = PLAIN,
    donors: Mapping[int, np.ndarray] | None = None,
) -> int:
    """Compute and write every chunk that is not on disk yet (of this rank's ``shard``: chunk index modulo the
    world size), taking the rows ``donors`` holds (``FeatureCache.donor_rows``) instead of computing them;
    returns the number of images computed."""
    n, donors = len(dataset.samples), donors or {}
    rank, world = shard
    starts = [s for s in range(0, n, cfg.chunk_size)
              if (s // cfg.chunk_size) % world == rank and not entry.has_chunk(s // cfg.chunk_size)]
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, list[str]]]] = {}
    batches: list[list[int]] = []
    for s in starts:
        rows = range(s, min(s + cfg.chunk_size, n))
        given = [r for r in rows if r in donors]
        if given:
            pending[s // cfg.chunk_size] = [(np.array(given), np.stack([donors[r] for r in given]), [""] * len(given))]
            _flush_complete_chunk(entry, pending, s // cfg.chunk_size, n=n, chunk_size=cfg.chunk_size)
        need = [r for r in rows if r not in donors]
        batches += [need[b:b + batch_size] for b in range(0, len(need), batch_size)]
    if not batches:
        return 0
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
    with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
        for x, index, errors in loader:
            bad = [(int(i), e) for i, e in zip(index, errors, strict=True) if e]
            if bad and strict:
                raise ImageError(f"{dataset.samples[bad[0][0]].sample_id}: {bad[0][1]} (--strict stops here)")
            backoff = runner.max_rows
            feats = runner(view.apply(x))
            assert feats.shape == (len(index), runner.feature_dim), f"features {feats.shape}"
            if runner.max_rows != backoff:  # an out-of-memory back-off: a resume must run the same rows per pass
                entry.update_meta(max_rows=runner.max_rows)
            chunk_index = int(index[0]) // cfg.chunk_size
            pending.setdefault(chunk_index, []).append((index.numpy(), feats, list(errors)))
            _flush_complete_chunk(entry, pending, chunk_index, n=n, chunk_size=cfg.chunk_size)
            bar.update(len(index))
    return total


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
    order = np.argsort(index, kind="stable")  # rows taken from other entries come first, computed ones after
    assert np.array_equal(index[order], np.arange(start, start + size)), "a chunk's rows are not its own"
    errors = np.asarray([e for p in parts for e in p[2]], dtype=str)[order]
    features = np.concatenate([p[1] for p in parts])[order]
    entry.write_chunk(chunk_index, Chunk(start=start, features=features, ok=errors == "", errors=errors))
    del pending[chunk_index]
