"""Hugging Face ``datasets``: a ``save_to_disk`` folder (Dataset or DatasetDict), its parquet files, or a hub name
(``hf://owner/name``, through ``datasets.load_dataset``), with an Image column and a ClassLabel column.

Class names come from the ClassLabel feature, in its order. Embedded images are written once, unchanged, to
content-addressed files (``<images_dir>/<sha256>.<ext>``), so they are decoded by ``data.images`` like any file
and their features are cached by content: the same photos in class folders share the cache entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dogbench.data.content import store_bytes
from dogbench.data.datasets import IMAGE_EXTENSIONS, DataNotFoundError, Dataset, DatasetLayoutError
from dogbench.data.listing import Row, from_rows
from dogbench.errors import DogbenchError

__all__ = ["HUB_PREFIX", "SPLIT_NAMES", "is_hf_data", "open_hf"]

HUB_PREFIX = "hf://"
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # DatasetDict.save_to_disk / Dataset.save_to_disk
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "val", "valid": "val", "val": "val"}
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"RIFF", ".webp"))
_INSTALL = "pip install 'dogbench[hf]' (the Hugging Face datasets library)"


def _parquet_files(path: Path) -> list[Path]:
    """``path`` itself, or the parquet files up to three folders down (``data/train-*.parquet``,
    ``<config>/<split>/*.parquet``): an image folder's tree is not walked to its leaves."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if not path.is_dir():
        return []
    return sorted(f for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for f in path.glob(pattern))


def is_hf_data(data: str | Path) -> bool:
    """Whether ``--data`` is a hub name, a ``save_to_disk`` folder or parquet file(s)."""
    if str(data).startswith(HUB_PREFIX):
        return True
    path = Path(data).expanduser()
    return any((path / m).is_file() for m in SAVED_MARKERS) or bool(_parquet_files(path))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DogbenchError(f"Reading Hugging Face datasets needs the datasets library: {_INSTALL}") from None
    return datasets


def _split_of(name: str) -> str | None:
    """A parquet file's split from its name (``train-00000-of-00002.parquet``, ``data/test/...``); None when no
    part of it names one (the files then make one unsplit set, split with the seed like a single file)."""
    parts = Path(name).with_suffix("").parts
    for part in reversed(parts):
        head = part.split("-", 1)[0].lower()
        if head in SPLIT_NAMES:
            return head
    return None


def _load(datasets: Any, data: str) -> dict[str | None, Any]:
    """{HF split name (None: unsplit): datasets.Dataset}."""
    if data.startswith(HUB_PREFIX):
        name = data[len(HUB_PREFIX):]
        try:
            loaded = datasets.load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated, a config to choose: one line each
            reason = str(exc).split("\n", 1)[0]
            offline = isinstance(exc, ConnectionError | OSError | TimeoutError) or "offline" in reason.lower() or \
                "connect" in reason.lower()
            advice = (f" Without internet here: on a machine with it run datasets.load_dataset({name!r})"
                      ".save_to_disk('FOLDER'), copy FOLDER here and pass --data FOLDER" if offline else "")
            raise DataNotFoundError(f"Cannot load {data} from the Hugging Face hub: {reason}.{advice}") from None
        return dict(loaded)
    path = Path(data).expanduser()
    if any((path / m).is_file() for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: dict[str | None, list[Any]] = {}
    try:
        for file in _parquet_files(path):
            rel = str(file.relative_to(path)) if path.is_dir() else file.name
            parts.setdefault(_split_of(rel) if path.is_dir() else None, []).append(pq.read_table(file))
        return {split: datasets.Dataset(pa.concat_tables(tables)) for split, tables in parts.items()}
    except (pa.ArrowException, OSError) as err:
        raise DatasetLayoutError(f"Cannot read the parquet files of {path}: {str(err).splitlines()[0]}") from None


def _columns(datasets: Any, features: Any, where: str) -> tuple[str, str]:
    """(image column, ClassLabel column) of ``features``; DatasetLayoutError naming what is there."""
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    found = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
    if not labels:
        raise DatasetLayoutError(f"{where} has no ClassLabel column (its columns: {found}); cast the label column, "
                                 "e.g. ds.cast_column('label', datasets.ClassLabel(names=[...])), and save it again")
    if not images:
        raise DatasetLayoutError(f"{where} has no Image column (its columns: {found})")
    return images[0], ("label" if "label" in labels else labels[0])


def _stored(image: dict[str, Any], images_dir: Path) -> Path:
    """The file holding an image cell's bytes: the bytes written content-addressed, or the file it refers to."""
    data, path = image.get("bytes"), image.get("path")
    if data is None:
        if path and Path(path).is_file():
            return Path(path)
        raise DatasetLayoutError(f"an image cell has neither bytes nor a readable file ({path!r})")
    suffix = next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)
    if suffix is None:
        suffix = Path(path or "").suffix.lower() if Path(path or "").suffix.lower() in IMAGE_EXTENSIONS else ".img"
    return store_bytes(data, images_dir, suffix)


def _row(image: dict[str, Any], label: int | None, i: int, split: str | None, names: tuple[str, ...],
         images_dir: Path, where: str) -> Row:
    if label is None or label < 0:
        raise DatasetLayoutError(f"{where}: row {i} of split {split} has no label")
    sid = f"{split}/{i:06d}" if split is not None else f"{i:06d}"
    return Row(_stored(image, images_dir), sid, names[label], SPLIT_NAMES[split.lower()] if split else None)


def open_hf(data: str | Path, *, images_dir: Path, test_fraction: float, seed: int) -> Dataset:
    """The dataset of a ``datasets`` folder, parquet file(s) or hub name (module docstring)."""
    datasets = _datasets()
    where = str(data)
    parts = _load(datasets, where)
    unknown = sorted(str(s) for s in parts if s is not None and s.lower() not in SPLIT_NAMES)
    if unknown:
        raise DatasetLayoutError(f"{where} has split(s) {', '.join(unknown)}; dogbench reads "
                                 f"{', '.join(SPLIT_NAMES)} (or one unsplit dataset, split with a seed)")
    first = next(iter(parts.values()))
    image_col, label_col = _columns(datasets, first.features, where)
    names = tuple(first.features[label_col].names)
    rows = []
    for split, part in parts.items():
        if part.features[label_col] != first.features[label_col]:
            raise DatasetLayoutError(f"{where}: split {split} has other classes in {label_col} than the first split")
        raw = part.select_columns([image_col, label_col]).cast_column(image_col, datasets.Image(decode=False))
        rows += [_row(cell[image_col], cell[label_col], i, split, names, images_dir, where)
                 for i, cell in enumerate(raw)]
    name = where[len(HUB_PREFIX):].replace("/", "-") if where.startswith(HUB_PREFIX) else Path(where).name
    root = Path(where).expanduser().absolute() if not where.startswith(HUB_PREFIX) else images_dir
    return from_rows(rows, name=name, root=root, layout="hf-datasets", where=where, classes=names,
                     test_fraction=test_fraction, seed=seed)
