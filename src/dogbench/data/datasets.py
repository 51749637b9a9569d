"""Datasets: Stanford Dogs (official or Kaggle layout) and class-per-folder image sets, with seeded splits.

`open_dataset` only lists files and reads metadata (lists, boxes); pixels are read by ``data.images``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from dogbench.data.content import file_digests
from dogbench.errors import DogbenchError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SPLITS",
    "STANFORD_DOGS",
    "Dataset",
    "DatasetLayoutError",
    "Sample",
    "detect_layout",
    "display_names",
    "open_dataset",
    "relabel_to",
    "sample_shots",
    "stratified_split",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "test")
# Images per class in the official Stanford Dogs training split; used when the official lists are absent.
STANFORD_TRAIN_PER_CLASS = 100

LAYOUTS = {
    "stanford-dogs": "root/Images/<wnid>-<breed>/*.jpg (+ optional root/Annotation/, root/lists/*.mat)",
    "stanford-dogs-kaggle": "root/images/Images/<wnid>-<breed>/*.jpg (+ optional annotations/Annotation/)",
    "class-per-folder": "root/train/<class>/<image> and root/test/<class>/<image>",
    "class-per-folder-flat": "root/<class>/<image> (split drawn with a seed)",
}
_ACCEPTED = "\n".join(f"  {name}: {shape}" for name, shape in LAYOUTS.items()) + (
    "\n  or the parent folder of a Stanford Dogs layout"
)

STANFORD_DOGS = "stanford-dogs"  # Dataset.name of Stanford Dogs in any of its layouts


class DatasetLayoutError(DogbenchError, ValueError):
    """The folder does not hold a dataset layout that dogbench can read."""


class DataNotFoundError(DogbenchError, FileNotFoundError):
    """A dataset folder or file that does not exist (any more)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    sample_id: str
    label: int
    split: str
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    layout: str
    split_source: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    def split(self, name: str) -> tuple[Sample, ...]:
        """The samples of split `name` ("train" or "test"), in dataset order."""
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}. Valid splits: {', '.join(SPLITS)}")
        return tuple(s for s in self.samples if s.split == name)

    def content_ids(self, *, with_boxes: bool, memo_dir: Path | None = None) -> tuple[str, ...]:
        """Each sample's identity for the feature cache, in sample order: the sha256 of its file's bytes (with
        its box when `with_boxes`). Neither the layout nor the sample id is in it, so the same image listed by
        folders, a labels file or a ``datasets`` folder is the same row. ``memo_dir``: see ``file_digests``."""
        try:
            digests = file_digests([s.path for s in self.samples], memo_dir=memo_dir)
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"{exc.filename} was removed after the dataset was opened; reopen it") from exc
        if not with_boxes:
            return tuple(digests)
        return tuple(f"{d}:{s.box}" for d, s in zip(digests, self.samples, strict=True))

    def fingerprint(self, *, with_boxes: bool, memo_dir: Path | None = None) -> str:
        """sha256 over the samples' ``content_ids``, sorted: the pixels' identity.

        Labels, splits, class names, sample ids and the layout are left out: features are extracted for every
        image once and labels and splits are applied when the cached features are loaded, so re-splitting or
        re-listing the same files does not force a re-extraction.
        """
        digest = hashlib.sha256()
        for content_id in sorted(self.content_ids(with_boxes=with_boxes, memo_dir=memo_dir)):
            digest.update(f"{content_id}\n".encode())
        return digest.hexdigest()


def _name_key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def relabel_to(extra: Dataset, classes: tuple[str, ...]) -> Dataset:
    """``extra`` (a second test set) with every sample a test sample labelled by its class's index in ``classes``
    (names matched ignoring case, "_", "-" and spaces); DatasetLayoutError naming the classes that match none."""
    index = {_name_key(c): i for i, c in enumerate(classes)}
    unknown = [c for c in extra.classes if _name_key(c) not in index]
    if unknown:
        raise DatasetLayoutError(
            f"Second test set {extra.root} has classes the dataset does not: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}. Its class folders must be named like the dataset's classes, "
            f"e.g. {', '.join(classes[:5])}"
        )
    mapping = [index[_name_key(c)] for c in extra.classes]
    samples = tuple(Sample(s.path, s.sample_id, mapping[s.label], "test", s.box) for s in extra.samples)
    return Dataset(extra.name, extra.root, extra.layout, "extra-test", classes, samples)


def select_classes(dataset: Dataset, classes: int | Sequence[str] | None) -> Dataset:
    """``dataset`` restricted to some classes (``data.classes``): the first N in its order, or the named ones
    (matched ignoring case, "_", "-" and spaces), relabelled 0..K-1 in the dataset's order; None: unchanged.
    DatasetLayoutError names what is wrong and the valid choices."""
    if classes is None:
        return dataset
    if isinstance(classes, int):
        if not 2 <= classes <= len(dataset.classes):
            raise DatasetLayoutError(f"data.classes = {classes}, but {dataset.root} has {len(dataset.classes)} "
                                     "classes; choose 2 to that many")
        keep = list(range(classes))
    else:
        index = {_name_key(c): i for i, c in enumerate(dataset.classes)}
        unknown = [c for c in classes if _name_key(c) not in index]
        if unknown:
            hints = [m for u in unknown for m in difflib.get_close_matches(u, dataset.classes, n=1)]
            raise DatasetLayoutError(
                f"data.classes names classes {dataset.root} does not have: {', '.join(unknown[:10])}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                + f". Its classes are e.g. {', '.join(dataset.classes[:5])}"
            )
        keep = sorted({index[_name_key(c)] for c in classes})
    new_label = {old: new for new, old in enumerate(keep)}
    samples = tuple(Sample(s.path, s.sample_id, new_label[s.label], s.split, s.box) for s in dataset.samples
                    if s.label in new_label)
    return dataclasses.replace(dataset, classes=tuple(dataset.classes[i] for i in keep), samples=samples)


# ---------------------------------------------------------------- splits


def display_names(classes: Iterable[str]) -> tuple[str, ...]:
    """Class names as people read them: ``golden_retriever`` -> ``golden retriever``."""
    return tuple(c.replace("_", " ") for c in classes)


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: returns sorted (keep_idx, held_idx).

    Each class with n >= 2 samples holds out round(fraction * n), clamped to [1, n - 1]; singletons are kept.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")

    def held(n: int) -> int:
        return 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)

    return _split_per_class(labels, held, seed=seed)


def sample_shots(labels: np.ndarray, *, k: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``k`` rows of every class (all of a class that has fewer), drawn with ``seed``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _split_per_class(labels, lambda n: min(k, n), seed=seed)[1]


def _stanford_held(n: int) -> int:
    """Test images of a class under the official protocol's count: 100 train, the rest test."""
    if n > STANFORD_TRAIN_PER_CLASS:
        return n - STANFORD_TRAIN_PER_CLASS
    return 0 if n < 2 else n - min(max(round(2 * n / 3), 1), n - 1)


def _split_per_class(
    labels: np.ndarray, held: Callable[[int], int], *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    rng = np.random.default_rng(seed)
    held_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        held_parts.append(rng.permutation(members)[: held(len(members))])
    held_idx = np.sort(np.concatenate(held_parts)) if held_parts else np.empty(0, dtype=np.int64)
    keep_mask = np.ones(len(labels), dtype=bool)
    keep_mask[held_idx] = False
    return np.flatnonzero(keep_mask).astype(np.int64), held_idx.astype(np.int64)


# ---------------------------------------------------------------- layout detection


@dataclass(frozen=True)
class _Located:
    layout: str
    root: Path
    images: Path  # folder that sample ids are relative to
    annotations: Path | None = None


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if _visible(e) and e.is_dir())


def _image_names(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if _is_image(e.name) and e.is_file())


def _locate_stanford(root: Path) -> _Located | None:
    if (root / "Images").is_dir():
        ann = root / "Annotation"
        return _Located("stanford-dogs", root, root / "Images", ann if ann.is_dir() else None)
    if (root / "images" / "Images").is_dir():
        ann = next(
            (p for p in (root / "annotations" / "Annotation", root / "Annotation") if p.is_dir()), None
        )
        return _Located("stanford-dogs-kaggle", root, root / "images" / "Images", ann)
    return None


def _describe(root: Path) -> str:
    with os.scandir(root) as it:
        entries = sorted(e.name + ("/" if e.is_dir() else "") for e in it if _visible(e))
    shown = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
    return shown or "an empty folder"


def _locate(root: Path) -> _Located:
    if not root.exists():
        raise DataNotFoundError(f"Dataset folder {root} does not exist. Accepted layouts:\n{_ACCEPTED}")
    if not root.is_dir():
        raise DatasetLayoutError(f"Dataset path {root} is not a folder. Accepted layouts:\n{_ACCEPTED}")
    found = _locate_stanford(root)
    if found:
        return found
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _Located("class-per-folder", root, root)
    children = _subdirs(root)
    nested = [loc for loc in map(_locate_stanford, children) if loc]
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        raise DatasetLayoutError(
            f"{root} holds several Stanford Dogs folders ({', '.join(str(n.root.name) for n in nested)}); "
            "point at one of them"
        )
    if any(_image_names(child) for child in children):
        return _Located("class-per-folder-flat", root, root)
    hint = " (found train/ but no test/)" if (root / "train").is_dir() else ""
    raise DatasetLayoutError(
        f"No dataset layout recognised in {root}{hint}: it holds {_describe(root)}.\n"
        f"Accepted layouts:\n{_ACCEPTED}"
    )


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """(layout, folder holding it) for `root` without reading any image; raises DatasetLayoutError."""
    found = _locate(Path(root).expanduser().resolve())
    return found.layout, found.root


# ---------------------------------------------------------------- Stanford Dogs


def _mat_strings(column: np.ndarray) -> list[str]:
    """Strings from a MATLAB cell column as scipy loads it: (N, 1) object array of 1-element arrays."""
    return [str(np.asarray(cell).ravel()[0]) for cell in np.asarray(column).ravel()]


def _read_list(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        mat = scipy.io.loadmat(path)
        files = _mat_strings(mat["file_list"])
        labels = np.asarray(mat["labels"], dtype=np.float64).ravel()
    # scipy's reader raises many kinds for a malformed file (MatReadError, NotImplementedError for v7.3 HDF5,
    # TypeError, ...): any of them is a list that cannot be read (found by tests/test_properties.py)
    except Exception as exc:  # noqa: BLE001
        raise DatasetLayoutError(
            f"Cannot read {path}: {exc!r}; expected a MATLAB file with 'file_list' and 'labels'"
        ) from exc
    if len(files) != len(labels):
        raise DatasetLayoutError(f"{path}: {len(files)} files but {len(labels)} labels")
    if not np.all(labels == np.round(labels)) or (len(labels) and labels.min() < 1):
        raise DatasetLayoutError(f"{path}: labels must be whole numbers >= 1 (1-based)")
    return [f.replace("\\", "/") for f in files], labels.astype(np.int64)


def _find_lists(located: _Located) -> tuple[Path, Path] | None:
    for folder in (located.root / "lists", located.root, located.images.parent / "lists"):
        train, test = folder / "train_list.mat", folder / "test_list.mat"
        if train.is_file() and test.is_file():
            return train, test
        if train.is_file() or test.is_file():
            present, absent = (train, test) if train.is_file() else (test, train)
            raise DatasetLayoutError(f"Found {present} but not {absent}; both official lists are needed")
    return None


def _check_list_labels(path: Path, files: list[str], labels: np.ndarray, folders: list[str]) -> None:
    """The .mat labels are 1-based indices into the sorted class folders of ``Images/`` (``folders``), whichever
    of them the list mentions: a test list may cover only some breeds."""
    wrong = [
        (f, int(lab))
        for f, lab in zip(files, labels, strict=True)
        if lab > len(folders) or folders[lab - 1] != f.split("/", 1)[0]
    ]
    if wrong:
        examples = "; ".join(
            f"{f} has label {lab} ({folders[lab - 1] if lab <= len(folders) else 'out of range'})"
            for f, lab in wrong[:3]
        )
        raise DatasetLayoutError(
            f"{path}: {len(wrong)} labels disagree with the image folders (labels are 1-based in sorted "
            f"folder order): {examples}"
        )


def _read_box(path: Path) -> tuple[int, int, int, int] | None:
    """First object's bndbox from a Pascal-VOC annotation file, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        node = ET.parse(path).getroot().find("object/bndbox")
        if node is None:
            return None
        xmin, ymin, xmax, ymax = (int(float(node.findtext(k, ""))) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (ET.ParseError, ValueError) as exc:
        raise DatasetLayoutError(f"Cannot read bounding box from annotation {path}: {exc}") from exc
    return xmin, ymin, xmax, ymax


def _open_stanford(located: _Located, *, seed: int) -> Dataset:
    class_dirs = _subdirs(located.images)
    folder_label = {d.name: k for k, d in enumerate(class_dirs)}
    classes = tuple(d.name.split("-", 1)[1] if "-" in d.name else d.name for d in class_dirs)
    on_disk = sorted(f"{d.name}/{name}" for d in class_dirs for name in _image_names(d))
    if not on_disk:
        raise DatasetLayoutError(f"No images found under {located.images}")

    lists = _find_lists(located)
    if lists:
        split_of: dict[str, str] = {}
        for split, list_path in zip(SPLITS, lists, strict=True):
            files, labels = _read_list(list_path)
            _check_list_labels(list_path, files, labels, [d.name for d in class_dirs])
            for f in files:
                if split_of.setdefault(f, split) != split:
                    raise DatasetLayoutError(f"{f} is listed in both the train and the test list")
        present = set(on_disk)
        missing = [f for f in split_of if f not in present]
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} images listed in {lists[0].parent} are missing under {located.images}: "
                + ", ".join(missing[:5])
            )
        split_source = "official-lists"
    else:
        warnings.warn(
            f"No official lists (train_list.mat, test_list.mat) found for {located.root}: the official split "
            f"is unknown, using a seeded split with {STANFORD_TRAIN_PER_CLASS} training images per class "
            f"(seed={seed})",
            UserWarning,
            stacklevel=3,
        )
        labels = np.array([folder_label[f.split("/", 1)[0]] for f in on_disk])
        _, test_idx = _split_per_class(labels, _stanford_held, seed=seed)
        test_set = {on_disk[i] for i in test_idx}
        split_of = {f: ("test" if f in test_set else "train") for f in on_disk}
        split_source = "seeded"

    def box_of(sample_id: str) -> tuple[int, int, int, int] | None:
        if located.annotations is None:
            return None
        return _read_box(located.annotations / os.path.splitext(sample_id)[0])

    samples = (
        Sample(located.images / f, f, folder_label[f.split("/", 1)[0]], split, box_of(f))
        for f, split in split_of.items()
    )
    return Dataset(STANFORD_DOGS, located.root, located.layout, split_source, classes, _ordered(samples))


# ---------------------------------------------------------------- class-per-folder


def _open_class_folders(located: _Located, *, test_fraction: float, seed: int) -> Dataset:
    root = located.root
    if located.layout == "class-per-folder":
        found = {split: {d.name: _image_names(d) for d in _subdirs(root / split)} for split in SPLITS}
        named = set(found["train"]) | set(found["test"])
        classes = tuple(sorted(c for c in named if found["train"].get(c) or found["test"].get(c)))
        if len(classes) < len(named):  # a folder without images (or a link to one) is no class: say which
            empty = sorted(named - set(classes))
            warnings.warn(f"{root}: class folders without images skipped: {', '.join(empty[:10])}"
                          + (f" and {len(empty) - 10} more" if len(empty) > 10 else ""), stacklevel=3)
        label = {c: k for k, c in enumerate(classes)}
        samples = (
            Sample(root / split / cls / name, f"{split}/{cls}/{name}", label[cls], split)
            for split in SPLITS
            for cls, names in found[split].items()
            for name in names
        )
        return Dataset(root.name, root, located.layout, "folders", classes, _ordered(samples))

    found_flat = {d.name: _image_names(d) for d in _subdirs(root)}
    classes = tuple(sorted(c for c, names in found_flat.items() if names))
    ids = sorted(f"{c}/{name}" for c in classes for name in found_flat[c])
    label = {c: k for k, c in enumerate(classes)}
    labels = np.array([label[i.split("/", 1)[0]] for i in ids])
    _, test_idx = stratified_split(labels, fraction=test_fraction, seed=seed)
    test_set = set(test_idx.tolist())
    samples = (
        Sample(root / i, i, int(labels[k]), "test" if k in test_set else "train") for k, i in enumerate(ids)
    )
    return Dataset(root.name, root, located.layout, "seeded", classes, _ordered(samples))


def _ordered(samples: Iterable[Sample]) -> tuple[Sample, ...]:
    return tuple(sorted(samples, key=lambda s: (SPLITS.index(s.split), s.sample_id)))


def open_dataset(root: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Detect the layout under `root` and list its samples (train then test, each sorted by sample_id).

    `test_fraction` and `seed` only matter for layouts without a given split.
    """
    located = _locate(Path(root).expanduser().resolve())
    if located.layout.startswith("stanford-dogs"):
        dataset = _open_stanford(located, seed=seed)
    else:
        dataset = _open_class_folders(located, test_fraction=test_fraction, seed=seed)
    if not dataset.samples:
        raise DatasetLayoutError(f"No images found in {located.root} ({located.layout} layout)")
    return dataset
