"""The datasets of the ViT paper's transfer table (Dosovitskiy et al. 2021, Table 2) and three fine-grained ones by
name: ``--data pets | flowers102 | cifar10 | cifar100 | fgvc-aircraft | stanford-cars | cub200``.

Each lives in ``<dogbench data cache>/<name>/``. torchvision's own classes read (and, with ``data.download``,
fetch) the six it has, with their official splits; CUB-200-2011 is read from its archive's text files. CIFAR's
pickled batches are read by torchvision and each image is written once as a content-addressed PNG, so features are
cached by content like every other image.

``leaky``: whether the test images may be among the photos an ImageNet-family model was pretrained on.
  - stanford-dogs (datasets.py): built from ImageNet itself.
  - cub200: its authors warn that its images overlap ImageNet's (both drawn from Flickr).
  - pets, flowers102, fgvc-aircraft, stanford-cars: photos gathered from the same web sources as ImageNet, of
    classes that are (or sit under) ImageNet-21k synsets; no de-duplication of the public ImageNet weights against
    their test sets is documented (the ViT paper de-duplicated its own pretraining data against them, following
    BiT, because such near-duplicates exist), so they are marked leaky: not proven to overlap, not known not to.
  - cifar10, cifar100: 32x32 images from the 80 Million Tiny Images collection, not ImageNet photos; no overlap
    with ImageNet is documented. Not leaky means "not known to overlap", not "cannot".
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dogbench.atomic import atomic_write_json
from dogbench.data.content import store_bytes
from dogbench.data.datasets import STANFORD_DOGS, DataNotFoundError, Dataset, DatasetLayoutError
from dogbench.data.listing import Row, from_rows

__all__ = ["NAMED", "NAMED_LAYOUT", "NamedDataset", "imagenet_overlap", "open_named"]

NAMED_LAYOUT = "named"  # Dataset.layout of a dataset opened by name (its Dataset.name is the name)


@dataclass(frozen=True)
class NamedDataset:
    """One dataset known by name: where its files go, its official split's size, and how to get it."""

    name: str
    title: str
    folder: str  # the folder under <cache>/<name>/ that torchvision (or the CUB archive) unpacks
    holds: str  # what that folder must hold, for the error message
    classes: int
    train: int  # official training images (train + val where the dataset has a val split)
    test: int
    leaky: bool
    source: str  # what to download and from where
    torchvision: str | None = None  # torchvision.datasets class; None: read by dogbench (CUB)
    splits: tuple[tuple[str, Any], ...] = (("train", "train"), ("test", "test"))  # (dogbench split, torchvision's)


NAMED = {d.name: d for d in (
    NamedDataset("pets", "Oxford-IIIT Pets", "oxford-iiit-pet", "images/ and annotations/", 37, 3680, 3669, True,
                 "images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/data/",
                 "OxfordIIITPet", (("train", "trainval"), ("test", "test"))),
    NamedDataset("flowers102", "Oxford Flowers-102", "flowers-102", "jpg/, imagelabels.mat and setid.mat", 102,
                 2040, 6149, True, "102flowers.tgz, imagelabels.mat and setid.mat from "
                 "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/", "Flowers102",
                 (("train", "train"), ("train", "val"), ("test", "test"))),
    NamedDataset("cifar10", "CIFAR-10", "cifar-10-batches-py", "data_batch_1..5, test_batch and batches.meta", 10,
                 50000, 10000, False, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10",
                 (("train", True), ("test", False))),
    NamedDataset("cifar100", "CIFAR-100", "cifar-100-python", "train, test and meta", 100, 50000, 10000, False,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100",
                 (("train", True), ("test", False))),
    NamedDataset("fgvc-aircraft", "FGVC-Aircraft", "fgvc-aircraft-2013b", "data/images/ and data/*.txt", 100, 6667,
                 3333, True, "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                 "FGVCAircraft", (("train", "trainval"), ("test", "test"))),
    NamedDataset("stanford-cars", "Stanford Cars", "stanford_cars",
                 "devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat", 196, 8144, 8041, True,
                 "a mirror of the original archives (its URL is gone, so torchvision cannot download it)",
                 "StanfordCars"),
    NamedDataset("cub200", "CUB-200-2011", "CUB_200_2011",
                 "images/, images.txt, image_class_labels.txt, train_test_split.txt and classes.txt", 200, 5994,
                 5794, True, "CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vzc93 (dogbench does not "
                 "download it)"),
)}


def imagenet_overlap(dataset: Dataset) -> bool:
    """Whether ``dataset``'s images may be in ImageNet-family pretraining data (the ``leaky`` flag's data side)."""
    if dataset.name == STANFORD_DOGS:
        return True
    return dataset.layout == NAMED_LAYOUT and NAMED[dataset.name].leaky


def _missing(spec: NamedDataset, root: Path, reason: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{spec.title} (--data {spec.name}) is not in {root / spec.folder} ({reason}): download {spec.source} and "
        f"unpack it into {root}, so that {root / spec.folder} holds {spec.holds}")


def _torchvision_split(spec: NamedDataset, root: Path, split: Any, download: bool) -> Any:
    """torchvision's dataset object for one split; DataNotFoundError when it is absent or cannot be fetched."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, str(spec.torchvision))
    kwargs = {"train": split} if spec.name.startswith("cifar") else {"split": split}
    try:
        return cls(str(root), download=download, **kwargs)
    # torchvision: RuntimeError (not found, md5 mismatch), OSError/URLError (offline), ValueError (Cars: no URL)
    except (RuntimeError, OSError, ValueError) as exc:
        reason = str(exc).split("\n", 1)[0].rstrip(".") or type(exc).__name__
        if not download:
            reason += "; downloading is off (data.download)"
        raise _missing(spec, root, reason) from None


def _files_and_labels(tv: Any) -> list[tuple[str, int]]:
    """(file, label) of a file-based torchvision dataset, read from the lists it parsed (its private attributes:
    decoding every image through ``__getitem__`` only to learn its path would cost the whole dataset's decode;
    tests/test_named_datasets.py pins these attributes against the installed torchvision)."""
    if hasattr(tv, "_samples"):  # StanfordCars
        return [(str(f), int(k)) for f, k in tv._samples]
    files = tv._images if hasattr(tv, "_images") else tv._image_files  # OxfordIIITPet / Flowers102, FGVCAircraft
    return [(str(f), int(k)) for f, k in zip(files, tv._labels, strict=True)]


def _file_rows(spec: NamedDataset, root: Path, download: bool) -> tuple[list[Row], tuple[str, ...]]:
    rows, classes = [], ()
    for split, tv_split in spec.splits:
        tv = _torchvision_split(spec, root, tv_split, download)
        classes = tuple(str(c) for c in tv.classes)
        rows += [Row(Path(f), Path(f).relative_to(root).as_posix(), classes[k], split)
                 for f, k in _files_and_labels(tv)]
    return rows, classes


def _cifar_rows(spec: NamedDataset, root: Path, download: bool, images_dir: Path) -> tuple[list[Row], tuple[str, ...]]:
    """CIFAR through torchvision's class (it unpickles the batches), each image written once as a PNG. The listing
    is remembered, keyed by the batch files' size and mtime, so a second run does not encode 60,000 PNGs again."""
    from PIL import Image

    parts = [(split, _torchvision_split(spec, root, train, download)) for split, train in spec.splits]
    batches = sorted(f for f in (root / spec.folder).iterdir() if f.is_file())
    stamp = "".join(f"{f.name}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}\n" for f in batches)
    memo = images_dir.parent / "listings" / f"{spec.name}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.json"
    classes = tuple(str(c) for c in parts[0][1].classes)
    try:
        listed = json.loads(memo.read_text())
        return [Row(Path(p), sid, classes[k], split) for p, sid, k, split in listed], classes
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass  # not listed yet (or unreadable): the PNGs are written (again, where missing)
    listed = []
    for split, tv in parts:
        for i, (pixels, k) in enumerate(zip(tv.data, tv.targets, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            listed.append((str(store_bytes(buffer.getvalue(), images_dir, ".png")), f"{split}/{i:05d}", int(k), split))
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(memo, listed)
    return [Row(Path(p), sid, classes[k], split) for p, sid, k, split in listed], classes


def _table(path: Path, spec: NamedDataset, root: Path) -> dict[str, str]:
    """{first field: the rest} of one of CUB's ``<id> <value>`` text files."""
    if not path.is_file():
        raise _missing(spec, root, f"no {path.name}")
    table = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            fields = line.strip().split(maxsplit=1)
            if len(fields) != 2:
                raise DatasetLayoutError(f"{path} line {n}: expected '<id> <value>', got {line.strip()!r}")
            table[fields[0]] = fields[1]
    return table


def _cub_rows(spec: NamedDataset, root: Path, download: bool) -> tuple[list[Row], tuple[str, ...]]:
    """CUB-200-2011 from its archive's own files: images.txt, image_class_labels.txt, train_test_split.txt and
    classes.txt (``<id> 001.Black_footed_Albatross``: the class is the name after the number)."""
    base = root / spec.folder
    if not base.is_dir():
        raise _missing(spec, root, "no such folder" + ("; dogbench does not download CUB" if download else ""))
    images, labels = _table(base / "images.txt", spec, root), _table(base / "image_class_labels.txt", spec, root)
    is_train, names = _table(base / "train_test_split.txt", spec, root), _table(base / "classes.txt", spec, root)
    order = sorted(names, key=int)
    classes = tuple(names[c].split(".", 1)[-1] for c in order)
    unlisted = sorted(set(images) - set(labels) | set(images) - set(is_train), key=int)
    strangers = sorted({labels[i] for i in images if i in labels} - set(names))
    if unlisted or strangers:
        raise DatasetLayoutError(f"{base}: {len(unlisted)} image id(s) without a class or split (e.g. "
                                 f"{', '.join(unlisted[:3]) or '-'}), class id(s) not in classes.txt: "
                                 f"{', '.join(strangers[:3]) or '-'}")
    name_of = dict(zip(order, classes, strict=True))
    rows = [Row(base / "images" / rel, f"images/{rel}", name_of[labels[i]],
                "train" if is_train[i].strip() == "1" else "test") for i, rel in images.items()]
    return rows, classes


def open_named(name: str, *, cache_dir: Path, download: bool) -> Dataset:
    """The dataset called ``name`` (``NAMED``) from ``cache_dir/name``, its official split; downloaded there first
    when ``download`` and torchvision can. DataNotFoundError: one line naming what to download and where."""
    spec = NAMED[name]
    root = cache_dir / name
    listers: dict[str, Callable[[], tuple[list[Row], tuple[str, ...]]]] = {
        "cub200": lambda: _cub_rows(spec, root, download),
        "cifar10": lambda: _cifar_rows(spec, root, download, cache_dir / "images"),
        "cifar100": lambda: _cifar_rows(spec, root, download, cache_dir / "images"),
    }
    if download:
        root.mkdir(parents=True, exist_ok=True)
    rows, classes = listers.get(name, lambda: _file_rows(spec, root, download))()
    dataset = from_rows(rows, name=name, root=root, layout=NAMED_LAYOUT, where=f"{spec.title} in {root}",
                        classes=classes, test_fraction=0.2, seed=0)  # the official split: fraction and seed unused
    return dataclasses.replace(dataset, split_source="official")
