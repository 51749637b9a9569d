"""Content-keyed on-disk feature store: atomic, resumable in chunks, memory-mapped, verified on load.

Layout of one entry, ``<root>/<key>/``::

    meta.json           what the key was computed from, N, D, chunk size (written first)
    chunks/00000.npz    features, readable-mask and error text for samples [0, chunk_size) ...
    features.npy        (N, D) float32, all chunks joined (written when every chunk exists)
    index.json          sample ids, readable-mask, errors: written last, marks the entry complete

Labels and splits are not stored: they do not change the features, and come from the dataset when the
entry is loaded (the ids are checked, in order, so rows and labels cannot drift apart).

Every file is written to a temporary name and renamed, so a process killed at any point leaves only
whole files behind; the next run skips the chunks that exist and computes the rest. ``<root>/<key>.lock`` is
held while an entry is computed: a second process on the same key waits, then reads what the first wrote.
A file of a complete entry that is missing or unreadable is an error naming it (delete the entry's folder to
recompute it); a chunk that cannot be read is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dogbench.atomic import atomic_write_json, atomic_write_with
from dogbench.errors import DogbenchError
from dogbench.locks import locked

SCHEMA_VERSION = 2
# Partial chunks are reused only when these match: other samples or chunking are other rows, and another device
# type gives other low bits. The batch size (and an out-of-memory back-off) is taken from the entry instead.
RESUME_FIELDS = ("n", "chunk_size", "ids_sha256", "device_type")


class CacheError(DogbenchError, RuntimeError):
    """A cache entry whose contents do not match what the caller expects (stale or corrupt)."""


def cache_key(components: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the numbers (plus the schema version)."""
    canonical = json.dumps({"schema": SCHEMA_VERSION, **components}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def ids_digest(sample_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """Features of samples ``start .. start + len(ok)`` in dataset order; rows of unreadable images are zero."""

    start: int
    features: np.ndarray  # (n, D) float32
    ok: np.ndarray  # (n,) bool: False = the image could not be read
    errors: np.ndarray  # (n,) str: the reason where ok is False, else ""


@dataclass(frozen=True)
class CachedFeatures:
    """A complete entry: all N rows (unreadable ones included, masked by ``ok``) with their sample ids."""

    key: str
    features: np.ndarray  # (N, D) float32, memory-mapped
    sample_ids: tuple[str, ...]
    ok: np.ndarray  # (N,) bool
    errors: dict[str, str]  # sample_id -> reason, for rows where ok is False
    meta: dict[str, Any]


class FeatureCache:
    """The store under ``root``: one folder per key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> CacheEntry:
        return CacheEntry(self.root / key, key)

    def donor_rows(self, family: str, row_ids: Sequence[str], *, exclude: str, dim: int,
                   only: Sequence[str] | None = None) -> tuple[dict[int, np.ndarray], list[str]]:
        """Rows of ``row_ids`` (content ids) that complete entries of the same ``family`` (model, weights,
        preprocessing, settings, view and device type: everything but the image set) already hold, by row index,
        and the keys of the entries that gave them. ``only``: take rows from these entries alone (a resumed entry
        takes what it took when it began, so its bits do not depend on what the cache gained meanwhile).

        A run after a screen (whose rungs hold subsets of its training images) or after a ``--classes`` run then
        computes only the images they lack. The rows were computed in other batches, so they can differ from a
        fresh extraction by the precision's rounding. Entries written before families were recorded, unreadable
        rows and entries that cannot be read give nothing."""
        wanted = {cid: i for i, cid in enumerate(row_ids)}
        rows: dict[int, np.ndarray] = {}
        given: list[str] = []
        keys = sorted(only) if only is not None else sorted(p.parent.name for p in self.root.glob("*/meta.json"))
        for key in keys:
            donor = self.entry(key)
            if key == exclude or not donor.is_complete():
                continue
            taken = donor.rows_for(family, wanted, dim, skip=rows.keys())
            if taken:
                rows.update(taken)
                given.append(key)
        return rows, given


class CacheEntry:
    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key

    @property
    def chunk_dir(self) -> Path:
        return self.path / "chunks"

    def is_complete(self) -> bool:
        """``index.json`` is written last: with it, the entry is complete (its other files are checked on load)."""
        return (self.path / "index.json").is_file()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of this entry while it is computed (other processes wait here)."""
        with locked(self.path.parent / f"{self.key}.lock", what=f"feature-cache entry {self.key[:16]}"):
            yield

    def _problem(self, name: str, why: str) -> CacheError:
        return CacheError(
            f"Feature cache file {self.path / name} {why}. Delete the folder {self.path} and run the same "
            "command again (or `dogbench extract` with the run's config) to recompute it"
        )

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise self._problem(name, "is missing") from None
        except (OSError, ValueError) as err:
            raise self._problem(name, f"is not readable JSON ({err})") from None

    def resumable(self, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """The meta an unfinished entry was started with when its chunks can be kept for ``meta`` (the same
        samples, chunking and device type, and a batch size to resume with); else None."""
        if self.is_complete():
            return None
        try:
            existing = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None  # none yet, or edited by hand (writes are atomic): the entry starts afresh
        if not isinstance(existing, dict) or not isinstance(existing.get("batch_size"), int):
            return None
        return existing if all(existing.get(f) == meta.get(f) for f in RESUME_FIELDS) else None

    def begin(self, meta: Mapping[str, Any]) -> None:
        """Create the entry, keeping the chunks of an unfinished one that ``resumable`` accepts for ``meta``."""
        if self.chunk_dir.is_dir() and self.resumable(meta) is None:
            # Other samples, chunking or device, or no readable record of them: a resumed run would not give the
            # bits an uninterrupted one gives, so the partial work is dropped.
            if any(self.chunk_dir.iterdir()):
                warnings.warn(f"cache entry {self.key[:16]}: partial chunks made with other samples, chunking or "
                              "device are computed again", stacklevel=3)
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "meta.json", {"key": self.key, **meta})

    def update_meta(self, **fields: Any) -> None:
        """Record more about how the entry is being computed (e.g. an out-of-memory back-off's rows per pass)."""
        meta = self._read_json("meta.json")
        atomic_write_json(self.path / "meta.json", {**meta, **fields})

    def rows_for(self, family: str, wanted: Mapping[str, int], dim: int, *,
                 skip: Iterable[int] = ()) -> dict[int, np.ndarray]:
        """This complete entry's readable rows of the content ids in ``wanted`` (id -> row index there), when it is
        of ``family`` and ``dim`` columns; nothing when it is not, or cannot be read."""
        try:
            meta = json.loads((self.path / "meta.json").read_text())
            if not isinstance(meta, dict) or meta.get("family") != family:
                return {}
            index = json.loads((self.path / "index.json").read_text())
            features = np.load(self.path / "features.npy", mmap_mode="r", allow_pickle=False)
            ids, ok, skipped = index["sample_ids"], index["ok"], set(skip)
            if features.shape != (len(ids), dim) or len(ok) != len(ids):
                return {}
            pairs = [(j, wanted[cid]) for j, (cid, good) in enumerate(zip(ids, ok, strict=True))
                     if good and cid in wanted and wanted[cid] not in skipped]
            block = np.asarray(features[[j for j, _ in pairs]], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return {}  # a donor that cannot be read gives nothing: the rows are computed instead
        return {i: block[n] for n, (_, i) in enumerate(pairs)}

    def chunk_path(self, index: int) -> Path:
        return self.chunk_dir / f"{index:05d}.npz"

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` is on disk and readable; an unreadable one is removed (it is computed again)."""
        path = self.chunk_path(index)
        if not path.is_file():
            return False
        try:
            self.read_chunk(index)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            warnings.warn(f"cache chunk {path} is unreadable: computing it again", stacklevel=2)
            path.unlink(missing_ok=True)
            return False
        return True

    def write_chunk(self, index: int, chunk: Chunk) -> None:
        assert chunk.features.shape[0] == chunk.ok.shape[0] == chunk.errors.shape[0], "chunk rows disagree"

        def write(handle: Any) -> None:
            np.savez(
                handle,
                start=np.int64(chunk.start),
                features=chunk.features.astype(np.float32, copy=False),
                ok=chunk.ok,
                errors=chunk.errors.astype(str),
            )

        atomic_write_with(self.chunk_path(index), write)

    def read_chunk(self, index: int) -> Chunk:
        with np.load(self.chunk_path(index), allow_pickle=False) as npz:
            return Chunk(int(npz["start"]), npz["features"], npz["ok"], npz["errors"])

    def finalize(self, *, n_chunks: int, sample_ids: Sequence[str]) -> CachedFeatures:
        """Join the chunks into ``features.npy``, write ``index.json`` and drop the chunks."""
        try:
            chunks = [self.read_chunk(i) for i in range(n_chunks)]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise self._problem("chunks", f"holds a chunk that cannot be read ({type(err).__name__}: {err})") from None
        starts = [c.start for c in chunks]
        if starts != sorted(starts) or sum(len(c.ok) for c in chunks) != len(sample_ids):
            raise CacheError(f"Cache entry {self.path} has chunks that do not cover the {len(sample_ids)} samples")
        features = np.concatenate([c.features for c in chunks]).astype(np.float32, copy=False)
        ok = np.concatenate([c.ok for c in chunks])
        errors = np.concatenate([c.errors for c in chunks])
        atomic_write_with(self.path / "features.npy", lambda handle: np.save(handle, features))
        index = {
            "sample_ids": list(sample_ids),
            "ok": [bool(v) for v in ok],
            "errors": {sid: str(err) for sid, err, good in zip(sample_ids, errors, ok, strict=True) if not good},
        }
        atomic_write_json(self.path / "index.json", index)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return self.load(sample_ids=sample_ids)

    def load(self, *, sample_ids: Sequence[str]) -> CachedFeatures:
        """Memory-map a complete entry and check that its sample ids are the caller's, in order."""
        index = self._read_json("index.json")
        meta = self._read_json("meta.json")
        try:
            features = np.load(self.path / "features.npy", mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise self._problem("features.npy", "is missing") from None
        except (OSError, ValueError) as err:
            raise self._problem("features.npy", f"is not a readable .npy array ({err})") from None
        try:
            cached_ids = tuple(index["sample_ids"])
            ok = np.asarray(index["ok"], dtype=bool)
            errors = dict(index["errors"])
        except (KeyError, TypeError, ValueError) as err:
            raise self._problem("index.json", f"lacks what an index holds ({type(err).__name__}: {err})") from None
        if cached_ids != tuple(sample_ids):
            raise self._problem("index.json", "lists other samples than the dataset")
        if features.ndim != 2 or features.shape[0] != len(cached_ids) or ok.shape != (len(cached_ids),):
            raise self._problem("features.npy", f"has shape {features.shape} for {len(cached_ids)} ids")
        if meta.get("dim") is not None and features.shape[1] != meta["dim"]:
            raise self._problem("features.npy", f"has {features.shape[1]} columns, meta.json says {meta['dim']}")
        return CachedFeatures(key=self.key, features=features, sample_ids=cached_ids, ok=ok, errors=errors, meta=meta)
