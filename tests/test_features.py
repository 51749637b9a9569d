from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_folder_layout
from dogbench.backbones import Backbone, load_backbone
from dogbench.config import BackboneConfig, FeatureConfig, Precision
from dogbench.data import Dataset, ImageError, load_image, open_dataset, read_image
from dogbench.device import Policy, resolve_device, resolve_precision, resolve_workers
from dogbench.errors import DogbenchError
from dogbench.features import FeatureCache, ModelRunner, extract_features, feature_key
from dogbench.features.runner import CPU_BATCH_SIZE, keep_freed_memory

CHUNK, BATCH = 5, 3  # batches of 3 inside chunks of 5: [0, 1, 2] [3, 4] | [5, 6, 7] [8, 9] | ...


def _backbone(*, seed: int = 0, **fields: object) -> Backbone:
    cfg = BackboneConfig(label="cnn", model="test_resnet", weights="random", input_size=32, seed=seed, **fields)
    return load_backbone(cfg)


def _cfg(cache_dir: Path, **changes: object) -> FeatureConfig:
    base = FeatureConfig(
        device="cpu",
        precision=Precision.FP32,
        batch_size=BATCH,
        num_workers=0,
        chunk_size=CHUNK,
        cache_dir=str(cache_dir),
    )
    return dataclasses.replace(base, **changes)


def _direct(backbone: Backbone, dataset: Dataset, ids: tuple[str, ...], *, decoder: str = "pil") -> np.ndarray:
    """The features computed without dogbench's loader, batching or cache: one image at a time, timm's float
    transform (on PIL's image, or on torchvision's uint8 tensor for ``decoder="auto"``)."""
    pre = backbone.preprocess
    transform, tensor_transform = pre.transform(), pre.tensor_transform()
    by_id = {s.sample_id: s for s in dataset.samples}
    rows = []
    with torch.inference_mode():
        for sid in ids:
            image = read_image(by_id[sid].path) if decoder == "auto" else load_image(by_id[sid].path)
            x = transform(image) if isinstance(image, Image.Image) else pre.normalize(tensor_transform(image)[None])[0]
            rows.append(backbone.model(x.unsqueeze(0))[0].numpy())
    return np.stack(rows)


def _key(backbone: Backbone, dataset: Dataset, precision: Precision = Precision.FP32) -> str:
    return feature_key(backbone, dataset, crop_to_box=False, precision=precision)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def dataset(class_folder_root: Path) -> Dataset:
    return open_dataset(class_folder_root)


@pytest.mark.parametrize("workers", [0, 1])
def test_extract_then_cache_hit(dataset: Dataset, tmp_path: Path, workers: int) -> None:
    backbone = _backbone()
    cfg = _cfg(tmp_path / "cache", num_workers=workers)
    n = len(dataset.samples)
    assert n % CHUNK != 0, "the last chunk should be a partial one"

    first = extract_features(backbone, dataset, cfg=cfg, progress=False)

    assert first.features.shape == (n, backbone.feature_dim) and first.features.dtype == np.float32
    assert first.sample_ids == tuple(sorted(s.sample_id for s in dataset.samples))
    assert first.skipped == ()
    assert not first.cache_hit and first.n_computed == n and first.extract_s > 0
    assert first.precision == "fp32" and first.device.startswith("cpu")
    entry = FeatureCache(cfg.cache_dir).entry(first.key)
    assert entry.is_complete() and not entry.chunk_dir.exists()

    second = extract_features(backbone, dataset, cfg=cfg, progress=False)

    assert second.cache_hit and second.n_computed == 0 and second.extract_s == 0.0
    assert second.throughput_img_s is None
    assert second.key == first.key
    np.testing.assert_array_equal(second.features, first.features)
    assert second.sample_ids == first.sample_ids

    by_id = {s.sample_id: s for s in dataset.samples}
    assert list(first.sample_ids) == sorted(by_id)  # rows in sample-id order
    assert first.labels.tolist() == [by_id[i].label for i in first.sample_ids]
    assert first.splits.tolist() == [by_id[i].split for i in first.sample_ids]


def test_a_new_split_of_the_same_images_reuses_the_cache(flat_class_folder_root: Path, tmp_path: Path) -> None:
    """Labels and splits are applied on load: re-splitting a flat class-per-folder set extracts nothing."""
    one, other = open_dataset(flat_class_folder_root, seed=0), open_dataset(flat_class_folder_root, seed=1)
    assert [s.split for s in sorted(one.samples, key=lambda s: s.sample_id)] != [
        s.split for s in sorted(other.samples, key=lambda s: s.sample_id)
    ]
    cfg = _cfg(tmp_path)
    first = extract_features(_backbone(), one, cfg=cfg, progress=False)
    second = extract_features(_backbone(), other, cfg=cfg, progress=False)
    assert second.cache_hit and second.key == first.key
    np.testing.assert_array_equal(second.features, first.features)
    by_id = {s.sample_id: s for s in other.samples}
    assert second.splits.tolist() == [by_id[i].split for i in second.sample_ids]


def test_a_larger_image_set_takes_the_rows_a_smaller_one_computed(dataset: Dataset, tmp_path: Path) -> None:
    """A screen's rungs, or a --classes run, hold subsets of a later run's images: those rows are taken from
    their entries (the same family: model, weights, preprocessing, settings, view, device type), the rest
    computed, and the result equals a fresh extraction; another family gives nothing."""
    backbone, cfg = _backbone(), _cfg(tmp_path / "cache")
    subset = dataclasses.replace(dataset, samples=dataset.samples[1::2])
    small = extract_features(backbone, subset, cfg=cfg, progress=False)
    full = extract_features(backbone, dataset, cfg=cfg, progress=False)
    assert full.key != small.key and full.n_computed == len(dataset.samples) - len(subset.samples)
    meta = json.loads((FeatureCache(cfg.cache_dir).entry(full.key).path / "meta.json").read_text())
    assert meta["taken_rows"] == len(subset.samples) and meta["donors"] == [small.key]
    rows = dict(zip(full.sample_ids, full.features, strict=True))
    np.testing.assert_array_equal(np.stack([rows[i] for i in small.sample_ids]), small.features)
    fresh = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "fresh"), progress=False)
    assert fresh.key == full.key and fresh.n_computed == len(dataset.samples)
    np.testing.assert_allclose(full.features, fresh.features, atol=1e-5, rtol=0)
    bf16 = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "cache", precision=Precision.BF16),
                            progress=False)
    assert bf16.n_computed == len(dataset.samples)  # another precision: another family, nothing taken


def test_a_resumed_entry_takes_rows_only_from_the_entries_it_began_with(
        dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry killed mid-way and resumed after the cache gained another donor takes nothing from the newcomer
    (its bits do not depend on what the cache gained meanwhile); a donor whose files are damaged gives nothing."""
    backbone, cfg = _backbone(), _cfg(tmp_path / "cache")
    first = extract_features(backbone, dataclasses.replace(dataset, samples=dataset.samples[:4]), cfg=cfg,
                             progress=False)
    with monkeypatch.context() as m:
        _killed_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            extract_features(backbone, dataset, cfg=cfg, progress=False)
    later = extract_features(backbone, dataclasses.replace(dataset, samples=dataset.samples[4:9]), cfg=cfg,
                             progress=False)
    assert later.n_computed == 5  # the unfinished entry is no donor
    resumed = extract_features(backbone, dataset, cfg=cfg, progress=False)
    meta = json.loads((FeatureCache(cfg.cache_dir).entry(resumed.key).path / "meta.json").read_text())
    assert meta["donors"] == [first.key] and meta["taken_rows"] == 4
    fresh = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "fresh"), progress=False)
    np.testing.assert_allclose(resumed.features, fresh.features, atol=1e-5, rtol=0)
    cache = FeatureCache(cfg.cache_dir)
    rows = json.loads((cache.entry(resumed.key).path / "index.json").read_text())["sample_ids"]  # content ids
    index = cache.entry(first.key).path / "index.json"
    index.write_text(json.dumps({"sample_ids": json.loads(index.read_text())["sample_ids"]}))  # its "ok" lost
    taken, given = cache.donor_rows(meta["family"], rows, exclude=resumed.key, dim=backbone.feature_dim)
    assert given == [later.key] and len(taken) == 5  # the damaged one gives nothing, and no error
    taken, given = cache.donor_rows(meta["family"], rows, exclude=resumed.key, dim=backbone.feature_dim + 1)
    assert (taken, given) == ({}, [])  # other columns: no donor


def test_features_equal_a_direct_forward_pass(dataset: Dataset, tmp_path: Path) -> None:
    backbone = _backbone()
    features = extract_features(backbone, dataset, cfg=_cfg(tmp_path, decoder="pil"), progress=False)
    expected = _direct(backbone, dataset, features.sample_ids)
    np.testing.assert_allclose(features.features, expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-3, "all-zero features would compare equal to anything zero"
    # torchvision's decoder and tensor resize: pixels within rounding of PIL's, features close but not equal.
    fast = extract_features(backbone, dataset, cfg=_cfg(tmp_path, decoder="auto"), progress=False)
    assert fast.key != features.key
    assert np.abs(fast.features - expected).max() < 0.05 * np.abs(expected).max()
    direct_fast = _direct(backbone, dataset, features.sample_ids, decoder="auto")
    np.testing.assert_allclose(fast.features, direct_fast, atol=1e-5, rtol=0)


@pytest.mark.parametrize("orientation", [None, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("box", [None, (3, 5, 30, 27)])
def test_torchvision_decode_matches_pil(tmp_path: Path, orientation: int | None, box: tuple | None) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    path = tmp_path / "x.jpg"
    img.save(path, exif=exif, quality=90)
    tensor = read_image(path, box=box, min_side=30)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    pil = np.asarray(load_image(path, box=box, min_side=30))
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), pil)  # same libjpeg-turbo, same pixels


def test_read_image_hands_other_images_to_pil(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(400, 480, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    Image.fromarray(pixels).save(tmp_path / "big.jpg")
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert isinstance(read_image(tmp_path / "x.png"), Image.Image)
    assert isinstance(read_image(tmp_path / "cmyk.jpg"), Image.Image)
    assert isinstance(read_image(tmp_path / "big.jpg", min_side=100), Image.Image)  # reduced decode: PIL's draft
    assert isinstance(read_image(tmp_path / "big.jpg", min_side=300), torch.Tensor)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "big.jpg").read_bytes()[:2000])
    with pytest.raises(ImageError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_same_weights_in_another_load_hit_the_cache(dataset: Dataset, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = extract_features(_backbone(seed=0), dataset, cfg=cfg, progress=False)
    again = extract_features(_backbone(seed=0), dataset, cfg=cfg, progress=False)
    assert again.cache_hit
    np.testing.assert_array_equal(again.features, first.features)


def test_key_is_stable_and_changes_with_what_changes_the_numbers(dataset: Dataset) -> None:
    base = _backbone()
    key = _key(base, dataset)
    assert _key(_backbone(), dataset) == key

    assert _key(_backbone(crop_pct=0.5), dataset) != key
    assert _key(_backbone(interpolation="nearest"), dataset) != key
    assert _key(_backbone(seed=1), dataset) != key
    assert _key(base, dataset, Precision.BF16) != key
    assert feature_key(base, dataset, crop_to_box=True, precision=Precision.FP32) != key

    path = dataset.samples[3].path
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert _key(base, dataset) == key  # content-keyed: a touched file is the same image
    path.write_bytes(path.read_bytes() + b"\0")
    assert _key(base, dataset) != key


def test_changed_preprocessing_is_a_new_entry(dataset: Dataset, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "cache")
    a = extract_features(_backbone(), dataset, cfg=cfg, progress=False)
    b = extract_features(_backbone(crop_pct=0.5), dataset, cfg=cfg, progress=False)
    assert a.key != b.key and not b.cache_hit and b.n_computed == len(dataset.samples)
    assert not np.allclose(a.features, b.features)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock") == sorted([a.key, b.key])


def test_bf16_on_cpu_is_close_to_fp32(dataset: Dataset, tmp_path: Path) -> None:
    backbone = _backbone()
    fp32 = extract_features(backbone, dataset, cfg=_cfg(tmp_path), progress=False)
    bf16 = extract_features(backbone, dataset, cfg=_cfg(tmp_path, precision=Precision.BF16), progress=False)
    assert bf16.precision == "bf16" and bf16.key != fp32.key and bf16.features.dtype == np.float32
    scale = np.abs(fp32.features).max()
    assert np.abs(bf16.features - fp32.features).max() < 0.1 * scale
    assert not np.array_equal(bf16.features, fp32.features)


def test_device_and_precision_resolution() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_precision(Precision.AUTO, cpu) is Precision.FP32
    assert resolve_precision(Precision.FP16, cpu) is Precision.FP16
    with pytest.raises(DogbenchError, match="Valid"):
        resolve_device("tpu:banana")


def test_unreadable_images_are_skipped_with_reasons(bad_images_root: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, bad_ids = bad_images_root
    dataset = open_dataset(root)
    backbone = _backbone()
    cfg = _cfg(tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        features = extract_features(backbone, dataset, cfg=cfg, progress=False)

    assert sorted(sid for sid, _ in features.skipped) == sorted(bad_ids)
    for sid, reason in features.skipped:
        assert Path(sid).name in reason
    good_ids = tuple(sorted(s.sample_id for s in dataset.samples if s.sample_id not in bad_ids))
    assert features.sample_ids == good_ids
    assert "train/green/cmyk.jpg" in features.sample_ids and "train/blue/grey16.png" in features.sample_ids
    assert features.features.shape == (len(good_ids), backbone.feature_dim)
    assert features.n_computed == len(dataset.samples)
    np.testing.assert_allclose(features.features, _direct(backbone, dataset, good_ids, decoder="auto"), atol=1e-5)

    with pytest.warns(UserWarning, match="skipped unreadable image"):
        again = extract_features(backbone, dataset, cfg=cfg, progress=False)
    assert again.cache_hit and again.skipped == features.skipped


def test_strict_stops_at_the_first_bad_file_and_keeps_earlier_chunks(
    bad_images_root: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, bad_ids = bad_images_root
    dataset = open_dataset(root)
    backbone = _backbone()
    chunk = 2
    cfg = _cfg(tmp_path, chunk_size=chunk, batch_size=1)
    content = dataset.content_ids(with_boxes=False)  # extraction runs in content order (then sample id)
    ordered = [sid for _, sid in sorted(zip(content, (s.sample_id for s in dataset.samples), strict=True))]
    first_bad = min(i for i, sid in enumerate(ordered) if sid in bad_ids)
    assert first_bad >= chunk, "the fixture should have a complete chunk before the first bad image"

    with pytest.raises(ImageError) as err:
        extract_features(backbone, dataset, cfg=cfg, strict=True, progress=False)

    assert ordered[first_bad] in str(err.value)
    entry = FeatureCache(tmp_path).entry(_key(backbone, dataset))
    assert not entry.is_complete()
    done = first_bad // chunk
    assert all(entry.has_chunk(i) for i in range(done))
    assert not entry.has_chunk(done)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = extract_features(backbone, dataset, cfg=cfg, progress=False)
    assert resumed.n_computed == len(dataset.samples) - done * chunk
    assert len(resumed.skipped) == len(bad_ids)


DRIVER = textwrap.dedent(
    """
    import sys, time

    from dogbench.backbones import load_backbone
    from dogbench.config import BackboneConfig, FeatureConfig, Precision
    from dogbench.data import open_dataset
    from dogbench.features import extract_features

    import torch

    root, cache_dir, delay, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)  # as in the parent, so both compute the same bits
    backbone = load_backbone(BackboneConfig(label="cnn", model="resnet18", weights="random", input_size=64))
    # Slow each batch down so the parent can kill the run between chunks; the numbers are untouched.
    backbone.model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    cfg = FeatureConfig(device="cpu", precision=Precision.FP32, batch_size=2, num_workers=0, chunk_size=2,
                        cache_dir=cache_dir)
    features = extract_features(backbone, open_dataset(root), cfg=cfg, progress=False)
    print("done", features.n_computed, flush=True)
    """
)


def test_sigkill_mid_extraction_resumes_to_identical_features(tmp_path: Path) -> None:
    root = make_class_folder_layout(tmp_path / "data", classes=("a", "b", "c", "d", "e"), n_train=6, n_test=2)
    dataset = open_dataset(root)
    n = len(dataset.samples)
    backbone = load_backbone(BackboneConfig(label="cnn", model="resnet18", weights="random", input_size=64))
    cfg = FeatureConfig(
        device="cpu",
        precision=Precision.FP32,
        batch_size=2,
        num_workers=0,
        chunk_size=2,
        cache_dir=str(tmp_path / "killed"),
    )
    entry = FeatureCache(cfg.cache_dir).entry(_key(backbone, dataset))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    proc = subprocess.Popen(
        [sys.executable, str(driver), str(root), cfg.cache_dir, "0.3", str(torch.get_num_threads())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(entry.chunk_dir.glob("*.npz"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"driver exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "no chunk appeared in 120 s (is the key the same in both processes?)"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    assert not entry.is_complete()
    chunks_left = sorted(p.name for p in entry.chunk_dir.glob("*.npz"))
    n_chunks = n // cfg.chunk_size
    assert 2 <= len(chunks_left) < n_chunks
    assert chunks_left == [entry.chunk_path(i).name for i in range(len(chunks_left))]

    resumed = extract_features(backbone, dataset, cfg=cfg, progress=False)
    assert resumed.n_computed == n - len(chunks_left) * cfg.chunk_size < n
    assert entry.is_complete()

    reference = extract_features(
        backbone, dataset, cfg=dataclasses.replace(cfg, cache_dir=str(tmp_path / "clean")), progress=False
    )
    assert reference.n_computed == n and reference.key == resumed.key
    assert resumed.sample_ids == reference.sample_ids
    assert np.array_equal(resumed.features, reference.features)


def test_strict_on_a_cached_entry_with_bad_images_still_stops(
    bad_images_root: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, bad_ids = bad_images_root
    dataset = open_dataset(root)
    backbone = _backbone()
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        extract_features(backbone, dataset, cfg=_cfg(tmp_path), progress=False)
    first_bad = next(s.sample_id for s in dataset.samples if s.sample_id in bad_ids)
    with pytest.raises(ImageError, match=first_bad):
        extract_features(backbone, dataset, cfg=_cfg(tmp_path), strict=True, progress=False)


class _OutOfMemoryAbove(torch.nn.Module):
    """Wraps a model; a batch of more than ``limit`` images raises CUDA's out-of-memory error."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.calls = model, limit, []
        self.num_features = model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_features(dataset: Dataset, tmp_path: Path) -> None:
    backbone = _backbone()
    expected = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "a", batch_size=4), progress=False)
    wrapped = _OutOfMemoryAbove(backbone.model, limit=1)
    oom = dataclasses.replace(backbone, model=wrapped)
    with pytest.warns(UserWarning, match="out of memory on cpu: batches now run [12] images"):
        got = extract_features(oom, dataset, cfg=_cfg(tmp_path / "b", batch_size=4), progress=False)
    np.testing.assert_allclose(got.features, expected.features, rtol=1e-5, atol=1e-6)
    assert wrapped.calls[:3] == [4, 2, 1] and set(wrapped.calls[3:]) == {1}  # 4 fails, 2 fails, then 1 at a time


def test_out_of_memory_for_one_image_is_a_clear_error(dataset: Dataset, tmp_path: Path) -> None:
    backbone = _backbone()
    oom = dataclasses.replace(backbone, model=_OutOfMemoryAbove(backbone.model, limit=0))
    with pytest.raises(DogbenchError, match="Out of memory on cpu for a single image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_features(oom, dataset, cfg=_cfg(tmp_path / "c", batch_size=2), progress=False)


def test_batch_size_auto(dataset: Dataset) -> None:
    backbone = _backbone()
    runner = ModelRunner.create(backbone, policy=Policy.resolve("cpu", Precision.FP32))
    assert runner.resolve_batch_size(None) == CPU_BATCH_SIZE and runner.resolve_batch_size(7) == 7
    # On a GPU the probe takes the largest size that fits, trying from the top.
    probe = _OutOfMemoryAbove(backbone.model, limit=100)
    runner = ModelRunner.create(
        dataclasses.replace(backbone, model=probe), policy=Policy.resolve("cpu", Precision.FP32))
    assert runner.largest_fitting_batch() == 64 and probe.calls == [512, 256, 128, 64]


def test_decode_options_are_part_of_the_key(dataset: Dataset) -> None:
    backbone = _backbone()
    keys = {
        feature_key(backbone, dataset, crop_to_box=False, precision=Precision.FP32, reduced_decode=r, compiled=c)
        for r in (True, False) for c in (True, False)
    }
    assert len(keys) == 4


def test_workers_default_to_the_main_process_on_cpu() -> None:
    assert resolve_workers(None, torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert 1 <= resolve_workers(None, torch.device("cuda")) <= 8


def test_worker_processes_fork_without_a_warning_per_worker(dataset: Dataset) -> None:
    """Python >= 3.12 warns on each fork of a multi-threaded process (any process that has used CUDA is one):
    on a GPU that was one DeprecationWarning per worker per loader (seen on an H100). Worker loaders silence it."""
    import threading

    from dogbench.features import ImageDataset, iter_batches

    backbone = _backbone()
    images = ImageDataset.for_preprocess(
        dataset.samples[:4], backbone.preprocess, crop_to_box=False, reduced_decode=True, decoder="auto")
    stop = threading.Event()
    alive = threading.Thread(target=stop.wait)  # this process is now multi-threaded when the workers fork
    alive.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = list(iter_batches(images, [[0, 1], [2, 3]], workers=2, prefetch=1, pin_memory=False))
            # Python < 3.12 does not warn: check that the filter matches the text it would have warned with.
            warnings.warn(f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead to "
                          "deadlocks in the child.", DeprecationWarning, stacklevel=1)
    finally:
        stop.set()
        alive.join()
    assert [b[1].tolist() for b in got] == [[0, 1], [2, 3]]
    assert not [w for w in caught if "multi-threaded" in str(w.message)]


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory() is True


def _killed_after(monkeypatch: pytest.MonkeyPatch, n_chunks: int) -> None:
    """Make extraction die (as a kill would) once ``n_chunks`` chunks are on disk."""
    from dogbench.features.cache import CacheEntry

    original = CacheEntry.write_chunk
    written: list[int] = []

    def write_then_die(self: CacheEntry, index: int, chunk: object) -> None:
        original(self, index, chunk)
        written.append(index)
        if len(written) == n_chunks:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(CacheEntry, "write_chunk", write_then_die)


def test_a_resume_keeps_the_batch_size_the_entry_was_started_with(
    dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = _backbone()
    started = _cfg(tmp_path / "a", batch_size=2)
    with monkeypatch.context() as m:
        _killed_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            extract_features(backbone, dataset, cfg=started, progress=False)
    auto = dataclasses.replace(started, batch_size=None)  # auto would be 64 on CPU: the chunks would not match
    resumed = extract_features(backbone, dataset, cfg=auto, progress=False)
    assert resumed.batch_size == 2 and resumed.n_computed == len(dataset.samples) - 2 * CHUNK
    clean = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "b", batch_size=2), progress=False)
    assert np.array_equal(resumed.features, clean.features)

    with monkeypatch.context() as m:
        _killed_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            extract_features(backbone, dataset, cfg=_cfg(tmp_path / "c", batch_size=2), progress=False)
    with pytest.warns(UserWarning, match="features.batch_size=3 is ignored"):
        again = extract_features(backbone, dataset, cfg=_cfg(tmp_path / "c", batch_size=3), progress=False)
    assert again.batch_size == 2 and np.array_equal(again.features, clean.features)


def test_the_out_of_memory_back_off_is_recorded_in_the_entry(dataset: Dataset, tmp_path: Path) -> None:
    backbone = _backbone()
    oom = dataclasses.replace(backbone, model=_OutOfMemoryAbove(backbone.model, limit=1))
    with pytest.warns(UserWarning, match="out of memory"):
        got = extract_features(oom, dataset, cfg=_cfg(tmp_path, batch_size=4), progress=False)
    meta = json.loads((FeatureCache(tmp_path).entry(got.key).path / "meta.json").read_text())
    assert meta["batch_size"] == 4 and meta["max_rows"] == 1


EXTRACT_TWICE = ["--backbone", "cnn=resnet18@random,input_size=96", "--device", "cpu", "--precision", "fp32",
                 "--quiet"]


def test_two_extract_processes_at_once_compute_every_image_once(tmp_path: Path) -> None:
    """Two `dogbench extract` on one dataset, backbone and cache. The test holds the entry's lock until both
    processes wait for it (so they really run at the same time), then lets go."""
    import threading

    from dogbench.features.runner import effective_decoder
    from dogbench.locks import locked

    root = make_class_folder_layout(tmp_path / "data", classes=("a", "b", "c", "d"), n_train=12, n_test=4)
    cache = tmp_path / "cache"
    backbone = load_backbone(BackboneConfig(label="cnn", model="resnet18", weights="random", input_size=96))
    key = feature_key(backbone, open_dataset(root), crop_to_box=False, precision=Precision.FP32,
                      decoder=effective_decoder("auto", backbone.preprocess))
    argv = [sys.executable, "-m", "dogbench.cli", "extract", "--data", str(root), "--cache-dir", str(cache),
            *EXTRACT_TWICE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    errs: list[list[str]] = [[], []]
    with locked(cache / f"{key}.lock", what="the test's hold"):
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        readers = [threading.Thread(target=lambda p=p, e=e: e.extend(p.stderr), daemon=True)
                   for p, e in zip(procs, errs, strict=True)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 120
        while not all(any("waiting for another process" in line for line in e) for e in errs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), errs
            time.sleep(0.05)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r in readers:
        r.join(timeout=10)
    assert [p.returncode for p in procs] == [0, 0], errs
    n = len(open_dataset(root).samples)
    assert sum(f"computed {n} images" in out for out in outs) == 1, outs  # one computed them all...
    assert sum("(cached)" in out for out in outs) == 1, outs  # ... the other read them

    # the entry equals one that a single process makes
    single = subprocess.run([*argv[:argv.index("--cache-dir") + 1], str(tmp_path / "single"), *EXTRACT_TWICE],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    assert f"computed {n} images" in single.stdout
    shared_entry, single_entry = cache / key, tmp_path / "single" / key
    assert np.array_equal(np.load(shared_entry / "features.npy"), np.load(single_entry / "features.npy"))
    assert (shared_entry / "index.json").read_text() == (single_entry / "index.json").read_text()
    assert not (shared_entry / "chunks").exists()


def test_images_that_vanish_after_the_scan_are_named_and_a_reopened_dataset_extracts(tmp_path: Path) -> None:
    """A file deleted (or unmounted) between the dataset's scan and extraction: a named error (the cache key
    covers the files, so a dataset that changed under it is reopened, not mixed), and the reopened dataset
    extracts without the file."""
    from dogbench.data.datasets import DataNotFoundError

    root = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog"), n_train=4, n_test=2)
    dataset = open_dataset(root)
    gone = [s for s in dataset.samples if s.split == "train"][0]
    gone.path.unlink()
    with pytest.raises(DataNotFoundError, match=f"{gone.path} was removed after the dataset was opened"):
        extract_features(_backbone(), dataset, cfg=_cfg(tmp_path / "cache"), progress=False)
    features = extract_features(_backbone(), open_dataset(root), cfg=_cfg(tmp_path / "cache"), progress=False)
    assert gone.sample_id not in features.sample_ids and len(features.sample_ids) == len(dataset.samples) - 1
