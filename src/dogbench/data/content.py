"""Content digests of image files: what the feature cache is keyed by, whatever layout listed the files.

The same image in class folders, in a labels CSV or decoded out of a Hugging Face ``datasets`` folder has the
same sha256, so it shares its features. Hashing every byte of a large dataset takes seconds, so the digests of
one listing are remembered under the cache folder, keyed by each file's path, size and mtime: a listing whose
files did not change is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dogbench.atomic import atomic_write_bytes, atomic_write_json

__all__ = ["file_digest", "file_digests", "store_bytes"]

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stat_line(path: Path) -> str:
    st = path.stat()
    return f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n"


def file_digests(paths: Sequence[Path], *, memo_dir: Path | None) -> list[str]:
    """The sha256 of each file of ``paths``, in order; remembered in ``memo_dir`` (None: always read).
    FileNotFoundError names a file that is gone."""
    listing = hashlib.sha256("".join(map(_stat_line, paths)).encode()).hexdigest()
    memo = memo_dir / f"{listing}.json" if memo_dir is not None else None
    if memo is not None:
        try:
            known = json.loads(memo.read_text())
            if isinstance(known, list) and len(known) == len(paths):
                return [str(d) for d in known]
        except (OSError, ValueError):
            pass  # none yet, or unreadable: computed again
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        digests = list(pool.map(file_digest, paths))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo, digests)
    return digests


def store_bytes(data: bytes, folder: Path, suffix: str) -> Path:
    """``data`` written once to ``folder/<sha256[:2]>/<sha256><suffix>`` (content-addressed): images that come
    embedded (a ``datasets`` cell, a CIFAR batch) become files that ``data.images`` decodes like any other."""
    digest = hashlib.sha256(data).hexdigest()
    target = folder / digest[:2] / f"{digest}{suffix}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    return target
