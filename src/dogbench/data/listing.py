"""The one dataset abstraction every listed layout feeds: rows of (path, label, split) become a ``Dataset``.

A labels file, a Hugging Face ``datasets`` folder and a named dataset differ only in how they list their rows;
the checks are the same for all of them: files that are missing (named, with a count), paths listed twice,
splits that are not train/val/test, rows with and without a split mixed. Rows without a split get the project's
seeded stratified split (``data.test_fraction``, ``data.split_seed``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogbench.data.datasets import Dataset, DatasetLayoutError, Sample, stratified_split

__all__ = ["LISTED_SPLITS", "Row", "from_rows"]

LISTED_SPLITS = ("train", "val", "test")  # "val" joins train: validation is carved from it (data.val_fraction)


@dataclass(frozen=True)
class Row:
    """One listed image: its file, its id (the path relative to the listing's folder), class name, split."""

    path: Path
    sample_id: str
    label: str
    split: str | None = None


def _shown(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_rows(rows: Sequence[Row], where: str) -> None:
    if not rows:
        raise DatasetLayoutError(f"{where} lists no images")
    twice = [sid for sid, n in Counter(r.sample_id for r in rows).items() if n > 1]
    if twice:
        raise DatasetLayoutError(f"{where} lists {len(twice)} path(s) more than once: {_shown(twice)}")
    unknown = sorted({r.split for r in rows if r.split is not None and r.split not in LISTED_SPLITS})
    if unknown:
        raise DatasetLayoutError(f"{where} has unknown split(s) {_shown(unknown)}; valid splits: "
                                 f"{', '.join(LISTED_SPLITS)} (or no split column for a seeded split)")
    without = sum(r.split is None for r in rows)
    if 0 < without < len(rows):
        raise DatasetLayoutError(f"{where}: {without} of {len(rows)} rows have no split; give every row a split "
                                 f"({', '.join(LISTED_SPLITS)}) or none")
    missing = [r.sample_id for r in rows if not r.path.is_file()]
    if missing:
        raise DatasetLayoutError(f"{where}: {len(missing)} of {len(rows)} listed files are missing: {_shown(missing)}")


def from_rows(
    rows: Sequence[Row], *, name: str, root: Path, layout: str, where: str, classes: Sequence[str] | None = None,
    test_fraction: float, seed: int,
) -> Dataset:
    """A Dataset of ``rows`` (``where`` names the listing in errors). ``classes``: the class names in label order
    when the listing defines them (a ClassLabel feature: never re-ordered); else the sorted names of the rows."""
    _check_rows(rows, where)
    names = tuple(classes) if classes is not None else tuple(sorted({r.label for r in rows}))
    index = {c: k for k, c in enumerate(names)}
    strangers = sorted({r.label for r in rows} - set(index))
    if strangers:
        raise DatasetLayoutError(f"{where} has labels outside its classes: {_shown(strangers)}")
    labels = np.array([index[r.label] for r in rows], dtype=np.int64)
    if rows[0].split is None:
        _, test_idx = stratified_split(labels, fraction=test_fraction, seed=seed)
        held = set(test_idx.tolist())
        splits = ["test" if i in held else "train" for i in range(len(rows))]
        source = "seeded"
    else:
        splits = ["train" if r.split == "val" else str(r.split) for r in rows]
        source = "listed"
        n_val = sum(r.split == "val" for r in rows)
        if n_val:
            warnings.warn(f"{where}: the {n_val} 'val' rows join train; dogbench carves validation from train "
                          "(data.val_fraction, stratified, seeded) and tuning never sees test", stacklevel=3)
    samples = sorted((Sample(r.path, r.sample_id, int(k), s) for r, k, s in zip(rows, labels, splits, strict=True)),
                     key=lambda s: (s.split != "train", s.sample_id))
    return Dataset(name, root, layout, source, names, tuple(samples))
