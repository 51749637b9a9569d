"""Labels from a file: ``--data labels.csv`` (columns ``path,label[,split]``), a ``.tsv`` with the same header, or
a ``.txt`` of ``path label`` lines. Paths are relative to the file's folder and may not leave it."""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

from dogbench.data.datasets import DataNotFoundError, Dataset, DatasetLayoutError
from dogbench.data.listing import Row, from_rows

__all__ = ["LABEL_FILES", "is_label_file", "open_label_file"]

LABEL_FILES = {".csv": ",", ".tsv": "\t", ".txt": None}  # suffix -> delimiter (None: whitespace, no header)
COLUMNS = ("path", "label")  # required; "split" is optional


def is_label_file(path: str | Path) -> bool:
    """Whether ``--data`` names a labels file (by its suffix), present or not."""
    return Path(path).suffix.lower() in LABEL_FILES and not Path(path).expanduser().is_dir()


def _relative(text: str, where: str) -> str:
    """``text`` as a path inside the labels file's folder ("/"-separated, normalised); refuses escapes."""
    posix = text.strip().replace("\\", "/")
    norm = os.path.normpath(posix).replace(os.sep, "/") if posix else ""
    if not norm or norm == ".":
        raise DatasetLayoutError(f"{where}: empty path")
    if PurePosixPath(posix).is_absolute() or norm == ".." or norm.startswith("../"):
        raise DatasetLayoutError(f"{where}: path {text.strip()!r} is outside the labels file's folder (paths are "
                                 "relative to it, and may not start with / or climb out with ..)")
    return norm


def _table(path: Path, delimiter: str) -> list[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = [h.strip().lower() for h in next(reader, [])]
        lacking = [c for c in COLUMNS if c not in header]
        if lacking:
            raise DatasetLayoutError(f"{path}: no {' or '.join(lacking)} column (its header is "
                                     f"{','.join(header) or 'empty'}); expected columns path,label[,split]")
        return [(n, dict(zip(header, (v.strip() for v in values), strict=False)))
                for n, values in enumerate(reader, start=2) if any(v.strip() for v in values)]


def _text_lines(path: Path) -> list[tuple[int, dict[str, str]]]:
    table = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.strip().rsplit(None, 1)
        if len(fields) != 2:
            raise DatasetLayoutError(f"{path} line {n}: expected 'path label', got {line.strip()!r}")
        table.append((n, {"path": fields[0], "label": fields[1]}))
    return table


def open_label_file(path: str | Path, *, test_fraction: float, seed: int) -> Dataset:
    """The dataset a labels file lists (see the module's docstring); DatasetLayoutError for bad rows."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DataNotFoundError(f"Labels file {path} does not exist")
    delimiter = LABEL_FILES[path.suffix.lower()]
    try:
        table = _table(path, delimiter) if delimiter else _text_lines(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetLayoutError(f"{path} is not a readable text table ({exc})") from None
    rows = []
    for n, record in table:
        where = f"{path} line {n}"
        label = record.get("label") or ""
        if not label:
            raise DatasetLayoutError(f"{where}: empty label")
        rel = _relative(record.get("path") or "", where)
        split = (record.get("split") or "").lower() or None
        rows.append(Row(path.parent / rel, rel, label, split))
    return from_rows(rows, name=path.stem, root=path.parent, layout=f"labels-{path.suffix.lower()[1:]}",
                     where=str(path), test_fraction=test_fraction, seed=seed)
