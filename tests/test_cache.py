from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dogbench.features.cache import CacheEntry, CacheError, Chunk, FeatureCache, cache_key, ids_digest

N, D, CHUNK = 7, 5, 3
IDS = [f"train/c{i % 2}/img_{i:02d}.jpg" for i in range(N)]
BAD = 4  # row whose image "could not be read"


def _meta(*, chunk_size: int = CHUNK, ids: list[str] = IDS, batch_size: int = 2, device_type: str = "cpu") -> dict:
    return {"n": len(ids), "dim": D, "chunk_size": chunk_size, "ids_sha256": ids_digest(ids),
            "batch_size": batch_size, "device_type": device_type}


def _features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)


def _chunk(index: int, features: np.ndarray, *, chunk_size: int = CHUNK) -> Chunk:
    start = index * chunk_size
    rows = range(start, min(start + chunk_size, len(features)))
    errors = np.array(["cannot read image x.jpg" if i == BAD else "" for i in rows], dtype=str)
    feats = features[start : start + len(errors)].copy()
    feats[errors != ""] = 0.0
    return Chunk(start=start, features=feats, ok=errors == "", errors=errors)


def _fill(entry: CacheEntry, features: np.ndarray, *, chunk_size: int = CHUNK) -> int:
    n_chunks = -(-len(features) // chunk_size)
    for i in range(n_chunks):
        entry.write_chunk(i, _chunk(i, features, chunk_size=chunk_size))
    return n_chunks


def test_cache_key_ignores_dict_order() -> None:
    a = {"dataset": "abc", "timm_tag": "resnet50", "preprocess": {"crop_pct": 0.875, "mean": [0.1, 0.2, 0.3]}}
    b = {"preprocess": {"mean": [0.1, 0.2, 0.3], "crop_pct": 0.875}, "timm_tag": "resnet50", "dataset": "abc"}
    assert cache_key(a) == cache_key(b)
    assert len(cache_key(a)) == 64 and int(cache_key(a), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"dataset": "abd"},
        {"timm_tag": "resnet50.a1_in1k"},
        {"preprocess": {"crop_pct": 0.9, "mean": [0.1, 0.2, 0.3]}},
        {"preprocess": {"crop_pct": 0.875, "mean": [0.1, 0.2, 0.4]}},
        {"precision": "bf16"},
    ],
)
def test_cache_key_changes_with_any_component(change: dict) -> None:
    base = {"dataset": "abc", "timm_tag": "resnet50", "preprocess": {"crop_pct": 0.875, "mean": [0.1, 0.2, 0.3]}}
    assert cache_key({**base, **change}) != cache_key(base)


def test_round_trip_begin_write_finalize_load(tmp_path: Path) -> None:
    entry = FeatureCache(tmp_path).entry("k1")
    assert entry.path == tmp_path / "k1" and not entry.is_complete()
    entry.begin(_meta())
    assert json.loads((entry.path / "meta.json").read_text())["key"] == "k1"
    features = _features()
    assert not entry.has_chunk(0)
    n_chunks = _fill(entry, features)
    assert n_chunks == 3 and all(entry.has_chunk(i) for i in range(n_chunks))
    assert not entry.is_complete()

    cached = entry.finalize(n_chunks=n_chunks, sample_ids=IDS)

    assert entry.is_complete()
    assert not entry.chunk_dir.exists(), "finalize must drop the chunks"
    expected = features.copy()
    expected[BAD] = 0.0
    np.testing.assert_array_equal(cached.features, expected)
    assert cached.features.dtype == np.float32 and isinstance(cached.features, np.memmap)
    assert cached.sample_ids == tuple(IDS)
    assert cached.ok.tolist() == [i != BAD for i in range(N)]
    assert cached.errors == {IDS[BAD]: "cannot read image x.jpg"}
    assert cached.meta["chunk_size"] == CHUNK and cached.key == "k1"

    again = FeatureCache(tmp_path).entry("k1").load(sample_ids=IDS)
    np.testing.assert_array_equal(again.features, expected)
    assert again.errors == cached.errors


def test_read_chunk_returns_what_was_written(tmp_path: Path) -> None:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    chunk = _chunk(1, _features())
    entry.write_chunk(1, chunk)
    back = entry.read_chunk(1)
    assert back.start == chunk.start == CHUNK
    np.testing.assert_array_equal(back.features, chunk.features)
    np.testing.assert_array_equal(back.ok, chunk.ok)
    assert back.errors.tolist() == chunk.errors.tolist()


@pytest.fixture
def complete_entry(tmp_path: Path) -> CacheEntry:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    entry.finalize(n_chunks=_fill(entry, _features()), sample_ids=IDS)
    return entry


def test_load_with_other_ids_is_refused(complete_entry: CacheEntry) -> None:
    with pytest.raises(CacheError, match="other samples than the dataset"):
        complete_entry.load(sample_ids=IDS[::-1])
    with pytest.raises(CacheError, match=str(complete_entry.path)):
        complete_entry.load(sample_ids=IDS[:-1])


def test_load_detects_a_features_file_of_the_wrong_length(complete_entry: CacheEntry) -> None:
    np.save(complete_entry.path / "features.npy", np.zeros((N - 1, D), dtype=np.float32))
    with pytest.raises(CacheError, match="features.npy has shape"):
        complete_entry.load(sample_ids=IDS)


def test_finalize_refuses_chunks_that_do_not_cover_the_samples(tmp_path: Path) -> None:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    _fill(entry, _features())
    with pytest.raises(CacheError, match="do not cover"):
        entry.finalize(n_chunks=2, sample_ids=IDS)
    assert not entry.is_complete()


def test_restart_with_same_meta_keeps_chunks(tmp_path: Path) -> None:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    entry.write_chunk(0, _chunk(0, _features()))
    FeatureCache(tmp_path).entry("k").begin(_meta())
    assert entry.has_chunk(0)


@pytest.mark.parametrize(
    "changed",
    [
        {"chunk_size": CHUNK + 1},
        {"ids": [*IDS[:-1], "train/c0/other.jpg"]},
        {"ids": IDS[:-1]},
        {"device_type": "cuda"},
    ],
)
def test_restart_with_other_chunking_or_samples_discards_old_chunks(tmp_path: Path, changed: dict) -> None:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    entry.write_chunk(0, _chunk(0, _features()))
    entry.write_chunk(1, _chunk(1, _features()))

    entry.begin(_meta(**changed))

    assert not entry.has_chunk(0) and not entry.has_chunk(1)
    assert entry.chunk_dir.is_dir()
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["chunk_size"] == _meta(**changed)["chunk_size"]
    assert meta["ids_sha256"] == _meta(**changed)["ids_sha256"]


def test_leftover_temp_files_are_not_chunks(tmp_path: Path) -> None:
    entry = FeatureCache(tmp_path).entry("k")
    entry.begin(_meta())
    # What a process killed inside atomic_write_with leaves behind.
    (entry.chunk_dir / f".{entry.chunk_path(0).name}.x1y2z3.tmp").write_bytes(b"PK\x03\x04 half a zip")
    assert not entry.has_chunk(0)
    features = _features()
    n_chunks = _fill(entry, features)
    cached = entry.finalize(n_chunks=n_chunks, sample_ids=IDS)
    assert cached.features.shape == (N, D)
    assert not entry.chunk_dir.exists()


def test_ids_digest_is_order_sensitive() -> None:
    assert ids_digest(IDS) == ids_digest(list(IDS))
    assert ids_digest(IDS) != ids_digest(IDS[::-1])
