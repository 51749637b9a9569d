"""Datasets by name (issue 30, part 4): ``--data pets | flowers102 | cifar10 | cifar100 | fgvc-aircraft |
stanford-cars | cub200``, each on a small copy of its extracted layout built here from synthetic images, offline.

Flowers-102 and CIFAR: torchvision checks the md5 of their label/batch files against the real ones, which synthetic
files cannot match, so those two tests stub torchvision's ``check_integrity`` (in the test only) with a check that
the file exists; everything else runs through torchvision's own classes as shipped.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import class_image
from dogbench.cli import main
from dogbench.config import DataConfig, from_mapping
from dogbench.config.load import DATASET_NAMES
from dogbench.data import Dataset, imagenet_overlap
from dogbench.data.download import prepare_dataset
from dogbench.data.named import NAMED, NAMED_LAYOUT

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=5", "--set", "evaluate.n_bootstrap=50", "--set",
        "report.enabled=false", "--set", "tune.baseline=false", "--set", "tune.heads=logistic", "--quiet"]
N_TRAIN, N_TEST = 4, 2  # images per class and split


def _image(path: Path, label: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, size=(32, 32), rng=rng).save(path)


def _per_split(classes: int) -> list[tuple[str, int, int]]:
    """(split, class, running number) for every image of a tiny dataset."""
    return [(split, k, i) for split, n in (("train", N_TRAIN), ("test", N_TEST)) for k in range(classes)
            for i in range(n)]


def make_pets(root: Path, rng: np.random.Generator) -> tuple[str, ...]:
    base, lines = root / "oxford-iiit-pet", {"train": [], "test": []}
    breeds = ("Abyssinian", "american_bulldog")
    for n, (split, k, _) in enumerate(_per_split(2), start=1):
        _image(base / "images" / f"{breeds[k]}_{n}.jpg", k, rng)
        lines[split].append(f"{breeds[k]}_{n} {k + 1} {k + 1} {k + 1}")
    (base / "annotations").mkdir()
    for split, name in (("train", "trainval"), ("test", "test")):
        (base / "annotations" / f"{name}.txt").write_text("\n".join(lines[split]) + "\n")
    return ("Abyssinian", "American Bulldog")


def make_flowers(root: Path, rng: np.random.Generator) -> tuple[str, ...]:
    base, ids = root / "flowers-102", {"trnid": [], "valid": [], "tstid": []}
    labels = []
    for n, (split, k, i) in enumerate(_per_split(2), start=1):
        _image(base / "jpg" / f"image_{n:05d}.jpg", k, rng)
        labels.append(k + 1)
        ids["tstid" if split == "test" else ("valid" if i % 2 else "trnid")].append(n)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    scipy.io.savemat(base / "setid.mat", {key: np.array([v]) for key, v in ids.items()})
    import torchvision.datasets

    return tuple(torchvision.datasets.Flowers102.classes)  # all 102 names, whichever images there are


def _cifar_batch(path: Path, labels: list[int], key: str, rng: np.random.Generator) -> np.ndarray:
    rows = [np.asarray(class_image(k, size=(32, 32), rng=rng)).transpose(2, 0, 1).ravel() for k in labels]
    data = np.stack(rows) if rows else np.empty((0, 3 * 32 * 32), np.uint8)
    with open(path, "wb") as handle:  # the format torchvision reads: a pickled dict of uint8 rows (3x32x32, CHW)
        pickle.dump({"data": data, key: labels}, handle)
    return data


def make_cifar(root: Path, rng: np.random.Generator, *, hundred: bool) -> tuple[str, ...]:
    spec = NAMED["cifar100" if hundred else "cifar10"]
    base = root / spec.folder
    base.mkdir(parents=True)
    names = ("apple", "aquarium_fish") if hundred else ("airplane", "automobile")
    key = "fine_labels" if hundred else "labels"
    train = [k for _, k, _ in _per_split(2)[: 2 * N_TRAIN]]
    test = [k for _, k, _ in _per_split(2)[2 * N_TRAIN:]]
    if hundred:
        _cifar_batch(base / "train", train, key, rng)
        _cifar_batch(base / "test", test, key, rng)
        meta = {"fine_label_names": list(names)}
    else:
        for b in range(1, 6):  # five training batches, as CIFAR-10 has; only the first holds images here
            _cifar_batch(base / f"data_batch_{b}", train if b == 1 else [], key, rng)
        _cifar_batch(base / "test_batch", test, key, rng)
        meta = {"label_names": list(names)}
    with open(base / ("meta" if hundred else "batches.meta"), "wb") as handle:
        pickle.dump(meta, handle)
    return names


def make_aircraft(root: Path, rng: np.random.Generator) -> tuple[str, ...]:
    data, lines = root / "fgvc-aircraft-2013b" / "data", {"train": [], "test": []}
    variants = ("707-320", "A340-300")
    for n, (split, k, _) in enumerate(_per_split(2), start=1000001):
        _image(data / "images" / f"{n}.jpg", k, rng)
        lines[split].append(f"{n} {variants[k]}")
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, name in (("train", "trainval"), ("test", "test")):
        (data / f"images_variant_{name}.txt").write_text("\n".join(lines[split]) + "\n")
    return variants


def make_cars(root: Path, rng: np.random.Generator) -> tuple[str, ...]:
    base, annos = root / "stanford_cars", {"train": [], "test": []}
    names = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012")
    for n, (split, k, _) in enumerate(_per_split(2), start=1):
        _image(base / f"cars_{split}" / f"{n:05d}.jpg", k, rng)
        annos[split].append((f"{n:05d}.jpg", k + 1))
    (base / "devkit").mkdir()
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    for split, path in (("train", base / "devkit" / "cars_train_annos.mat"),
                        ("test", base / "cars_test_annos_withlabels.mat")):
        scipy.io.savemat(path, {"annotations": np.array(annos[split], dtype=[("fname", object), ("class", object)])})
    return names


def make_cub(root: Path, rng: np.random.Generator) -> tuple[str, ...]:
    base = root / "CUB_200_2011"
    folders = ("001.Black_footed_Albatross", "002.Laysan_Albatross")
    images, labels, split_of = [], [], []
    for n, (split, k, _) in enumerate(_per_split(2), start=1):
        rel = f"{folders[k]}/{folders[k][4:]}_{n:04d}.jpg"
        _image(base / "images" / rel, k, rng)
        images.append(f"{n} {rel}")
        labels.append(f"{n} {k + 1}")
        split_of.append(f"{n} {int(split == 'train')}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split_of), ("classes.txt", [f"{k + 1} {f}" for k, f in
                                                                             enumerate(folders)])):
        (base / name).write_text("\n".join(lines) + "\n")
    return ("Black_footed_Albatross", "Laysan_Albatross")


MAKERS: dict[str, Callable[[Path, np.random.Generator], tuple[str, ...]]] = {
    "pets": make_pets, "flowers102": make_flowers, "fgvc-aircraft": make_aircraft, "stanford-cars": make_cars,
    "cub200": make_cub, "cifar10": lambda r, g: make_cifar(r, g, hundred=False),
    "cifar100": lambda r, g: make_cifar(r, g, hundred=True),
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DOGBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _stub_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flowers-102 and CIFAR: torchvision's md5 check would refuse synthetic files (module docstring)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102

    for module in (torchvision.datasets.cifar, torchvision.datasets.flowers102):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: Path(path).is_file())


def _opened(name: str, cache: Path) -> tuple[Dataset, tuple[str, ...]]:
    classes = MAKERS[name](cache / name, np.random.default_rng(0))
    return prepare_dataset(DataConfig(root=name, download=False), progress=False), classes


def test_the_names_are_the_configs_and_kept_as_written() -> None:
    assert tuple(NAMED) == DATASET_NAMES
    cfg = from_mapping({"data": {"root": "pets"}})
    assert cfg.data.root == "pets"
    assert Path(from_mapping({"data": {"root": "./pets"}}).data.root).is_absolute()  # a folder called pets


@pytest.mark.parametrize("name", [n for n in NAMED if n != "pets"])
def test_each_named_layout_lists_its_official_split(name: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_md5(monkeypatch)
    dataset, classes = _opened(name, cache)
    assert dataset.name == name and dataset.layout == NAMED_LAYOUT and dataset.split_source == "official"
    assert dataset.classes == classes
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        part = dataset.split(split)
        assert [sum(s.label == k for s in part) for k in range(2)] == [n, n], split
    assert all(s.path.is_file() for s in dataset.samples)
    assert imagenet_overlap(dataset) == (not name.startswith("cifar"))


def test_cifar_images_become_png_files_with_the_batches_pixels(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_md5(monkeypatch)
    make_cifar(cache / "cifar10", np.random.default_rng(0), hundred=False)
    with open(cache / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        written = pickle.load(handle)  # noqa: S301 - the file this test wrote, to compare pixels with
    first = prepare_dataset(DataConfig(root="cifar10", download=False), progress=False)
    test = first.split("test")
    for sample in test:
        row = int(sample.sample_id.split("/")[1])
        assert sample.path.suffix == ".png" and sample.path.is_relative_to(cache / "images")
        pixels = np.asarray(Image.open(sample.path)).transpose(2, 0, 1).ravel()
        np.testing.assert_array_equal(pixels, written["data"][row])
        assert sample.label == written["labels"][row]
    listings = list((cache / "listings").glob("cifar10-*.json"))
    assert len(listings) == 1
    again = prepare_dataset(DataConfig(root="cifar10", download=False), progress=False)
    assert again.samples == first.samples
    assert again.fingerprint(with_boxes=False) == first.fingerprint(with_boxes=False)


def test_pets_runs_end_to_end_offline(cache: Path, tmp_path: Path) -> None:
    make_pets(cache / "pets", np.random.default_rng(0))
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["run", "--data", "pets", "--no-download", "--out", str(out), "--cache-dir",
                     str(tmp_path / "features"), *TINY, *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["name"] == "pets" and results["dataset"]["layout"] == NAMED_LAYOUT
    assert results["dataset"]["split_source"] == "official"
    assert results["models"]["cnn"]["leaky"] is False  # random weights saw no ImageNet, leaky pets or not
    assert 0.0 <= results["models"]["cnn"]["test"]["top1"] <= 1.0
    with np.load(out / "cnn" / "predictions.npz") as npz:
        assert len(npz["y_true"]) == 2 * N_TEST


@pytest.mark.parametrize("name", list(NAMED))
def test_a_missing_named_dataset_is_one_line_saying_what_to_fetch(name: str, cache: Path, capsys) -> None:
    assert main(["extract", "--data", name, "--no-download", *TINY, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    spec = NAMED[name]
    assert f"download {spec.source}" in err and f"unpack it into {cache / name}," in err
    assert str(cache / name / spec.folder) in err and spec.holds in err


def test_a_failed_download_is_the_same_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torchvision.datasets.oxford_iiit_pet

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.oxford_iiit_pet, "download_and_extract_archive", offline)
    assert main(["extract", "--data", "pets", *TINY, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no network" in err and "downloading is off" not in err, err
    assert f"download {NAMED['pets'].source}" in err
