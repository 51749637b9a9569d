"""Your data as it comes: labels files (CSV, TSV, text), Hugging Face ``datasets`` folders and parquet files, and
the one feature cache they share with class folders (issue 30)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import DEV, make_class_folder_layout, shared_dir
from dogbench.cli import main
from dogbench.config import DataConfig
from dogbench.data import Dataset, DatasetLayoutError, open_dataset
from dogbench.data.download import prepare_dataset
from dogbench.data.hf import open_hf
from dogbench.data.labels import open_label_file

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=5", "--set", "evaluate.n_bootstrap=50", "--set",
        "report.enabled=false", "--set", "tune.baseline=false", "--set", "tune.heads=logistic", "--quiet"]


def write_labels(dataset: Dataset, path: Path, *, split: bool = True, delimiter: str = ",") -> Path:
    """A labels file listing ``dataset``'s samples relative to ``path``'s folder (which must be its root)."""
    head = ["path", "label"] + (["split"] if split else [])
    lines = [delimiter.join(head)] + [
        delimiter.join([s.sample_id, dataset.classes[s.label]] + ([s.split] if split else []))
        for s in dataset.samples
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_hf(dataset: Dataset, folder: Path, *, class_label: bool = True) -> Path:
    """``dataset`` as a DatasetDict saved with ``save_to_disk``: embedded image bytes, a ClassLabel column."""
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(dataset.classes)) if class_label else datasets.Value("int64"),
    })
    parts = {
        split: datasets.Dataset.from_dict(
            {"image": [str(s.path) for s in dataset.split(split)], "label": [s.label for s in dataset.split(split)]},
            features=features,
        )
        for split in ("train", "test")
    }
    # embed the bytes (as a hub dataset has them), so nothing points back at the original files
    datasets.DatasetDict(parts).save_to_disk(str(folder), max_shard_size="100MB")
    return folder


# ---------------------------------------------------------------- labels files


@pytest.fixture
def folders(tmp_path: Path) -> Dataset:
    return open_dataset(make_class_folder_layout(tmp_path / "data", n_train=4, n_test=2))


def _same_listing(a: Dataset, b: Dataset) -> None:
    assert a.classes == b.classes
    assert [(s.sample_id, s.label, s.split) for s in a.samples] == [(s.sample_id, s.label, s.split) for s in b.samples]
    assert [s.path for s in a.samples] == [s.path for s in b.samples]


@pytest.mark.parametrize(("name", "delimiter"), [("labels.csv", ","), ("labels.tsv", "\t")])
def test_a_labels_table_lists_what_the_folders_do(folders: Dataset, name: str, delimiter: str) -> None:
    listed = open_label_file(write_labels(folders, folders.root / name, delimiter=delimiter), test_fraction=0.2,
                             seed=0)
    _same_listing(listed, folders)
    assert listed.layout == f"labels-{name[-3:]}" and listed.split_source == "listed"
    assert listed.fingerprint(with_boxes=False) == folders.fingerprint(with_boxes=False)


def test_a_text_file_without_splits_gets_the_seeded_stratified_split(folders: Dataset) -> None:
    text = folders.root / "labels.txt"
    text.write_text("# path label\n" + "".join(f"{s.sample_id} {folders.classes[s.label]}\n" for s in folders.samples))
    a, b, c = (open_label_file(text, test_fraction=0.25, seed=seed) for seed in (0, 0, 1))
    assert a.split_source == "seeded" and a.classes == folders.classes
    assert a.split("test") == b.split("test") != c.split("test")
    for k in range(len(a.classes)):  # stratified: each class holds out round(0.25 * 6) = 2
        assert sum(s.label == k for s in a.split("test")) == 2


def test_val_rows_join_train_with_a_warning(folders: Dataset) -> None:
    csv = folders.root / "labels.csv"
    write_labels(folders, csv)
    csv.write_text(csv.read_text().replace("train\n", "val\n", 3))
    with pytest.warns(UserWarning, match="the 3 'val' rows join train"):
        listed = open_label_file(csv, test_fraction=0.2, seed=0)
    assert len(listed.split("train")) == len(folders.split("train"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("path,label", "file,label"), r"no path column \(its header is file,label,split\)"),
        (lambda t: t + "../outside.jpg,cat,train\n", "outside the labels file's folder"),
        (lambda t: t + "/etc/passwd,cat,train\n", "outside the labels file's folder"),
        (lambda t: t + "train/cat/gone.jpg,cat,train\ntrain/cat/gone2.jpg,cat,train\n",
         "2 of 20 listed files are missing: train/cat/gone.jpg, train/cat/gone2.jpg"),
        (lambda t: t + t.splitlines()[1] + "\n", "lists 1 path.s. more than once: train/cat/cat_000.jpg"),
        (lambda t: t.replace(",test\n", ",holdout\n", 1), "unknown split.s. holdout; valid splits: train, val, test"),
        (lambda t: t.replace(",test\n", ",\n", 1), "1 of 18 rows have no split"),
        (lambda t: t.replace(",cat,", ",,", 1), "empty label"),
    ],
)
def test_bad_labels_files_are_refused_with_one_line(folders: Dataset, edit, message: str, capsys) -> None:
    csv = write_labels(folders, folders.root / "labels.csv")
    csv.write_text(edit(csv.read_text()))
    with pytest.raises(DatasetLayoutError, match=message):
        open_label_file(csv, test_fraction=0.2, seed=0)
    assert main(["extract", "--data", str(csv), *TINY, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dogbench: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_class_only_in_test_is_warned_about(folders: Dataset) -> None:
    csv = write_labels(folders, folders.root / "labels.csv")
    shutil.copyfile(folders.root / "test/fox/fox_004.jpg", folders.root / "wolf.jpg")
    csv.write_text(csv.read_text() + "wolf.jpg,wolf,test\n")
    with pytest.warns(UserWarning, match=r"test class\(es\) without training images: wolf"):
        dataset = prepare_dataset(DataConfig(root=str(csv)), progress=False)
    assert "wolf" in dataset.classes


# ---------------------------------------------------------------- Hugging Face datasets


def test_a_save_to_disk_folder_keeps_the_classlabel_order_and_the_bytes(folders: Dataset, tmp_path: Path) -> None:
    reordered = Dataset(folders.name, folders.root, folders.layout, folders.split_source,
                        tuple(reversed(folders.classes)),
                        tuple(s.__class__(s.path, s.sample_id, 2 - s.label, s.split) for s in folders.samples))
    hf = open_hf(save_hf(reordered, tmp_path / "hf"), images_dir=tmp_path / "images", test_fraction=0.2, seed=0)
    assert hf.classes == ("fox", "dog", "cat")  # the ClassLabel's order, not sorted
    assert hf.layout == "hf-datasets" and hf.split_source == "listed"
    assert [len(hf.split(s)) for s in ("train", "test")] == [len(folders.split(s)) for s in ("train", "test")]
    by_id = dict(zip(reordered.content_ids(with_boxes=False), reordered.samples, strict=True))
    for content, sample in zip(hf.content_ids(with_boxes=False), hf.samples, strict=True):
        original = by_id[content]  # the very bytes of the original file, under its class and split
        assert (hf.classes[sample.label], sample.split) == (reordered.classes[original.label], original.split)
        assert sample.path.is_relative_to(tmp_path / "images")
    assert hf.fingerprint(with_boxes=False) == folders.fingerprint(with_boxes=False)


def test_parquet_files_read_like_the_saved_folder(folders: Dataset, tmp_path: Path) -> None:
    saved = datasets.load_from_disk(str(save_hf(folders, tmp_path / "hf")))
    for split in ("train", "test"):
        saved[split].to_parquet(str(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet"))
    from_parquet = open_hf(tmp_path / "pq", images_dir=tmp_path / "images", test_fraction=0.2, seed=0)
    from_folder = open_hf(tmp_path / "hf", images_dir=tmp_path / "images", test_fraction=0.2, seed=0)
    _same_listing(from_parquet, from_folder)


def test_parquet_files_without_split_names_are_one_set_split_with_the_seed(folders: Dataset, tmp_path: Path) -> None:
    saved = datasets.load_from_disk(str(save_hf(folders, tmp_path / "hf")))
    for i, split in enumerate(("train", "test")):
        saved[split].to_parquet(str(tmp_path / "pq" / f"part-{i}.parquet"))
    unsplit = open_hf(tmp_path / "pq", images_dir=tmp_path / "images", test_fraction=0.25, seed=0)
    assert unsplit.split_source != "listed" and len(unsplit.split("test")) > 0  # not all "train"
    assert len(unsplit.samples) == len(folders.samples)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetLayoutError, match="Cannot read the parquet files of"):
        open_hf(tmp_path / "bad", images_dir=tmp_path / "images", test_fraction=0.25, seed=0)


def test_a_datasets_folder_without_a_classlabel_is_one_line_exit_2(folders: Dataset, tmp_path: Path,
                                                                   capsys) -> None:
    hf = save_hf(folders, tmp_path / "hf", class_label=False)
    assert main(["extract", "--data", str(hf), *TINY, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no ClassLabel column (its columns: image (Image), label (Value))" in err


def test_a_hub_name_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["extract", "--data", "hf://nobody/no-such-dogs", *TINY, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Cannot load hf://nobody/no-such-dogs from the Hugging Face hub" in err
    assert "datasets.load_dataset('nobody/no-such-dogs').save_to_disk('FOLDER')" in err


# ---------------------------------------------------------------- one cache for every layout


def _three_runs(base: Path, data: Path) -> list[dict]:
    """`dogbench run` on the same images as class folders, a CSV and a save_to_disk folder, one feature cache."""
    folders = open_dataset(data)
    sources = [data, write_labels(folders, data / "labels.csv"), save_hf(folders, base / "hf")]
    results = []
    for k, source in enumerate(sources):
        out = base / f"run{k}"
        assert main(["run", "--data", str(source), "--out", str(out), "--cache-dir", str(base / "cache"), *TINY,
                     *FAST]) == 0
        with np.load(out / "cnn" / "predictions.npz") as npz:
            results.append({**json.loads((out / "results.json").read_text()), "proba": npz["proba"]})
    return results


def _check_shared(results: list[dict]) -> None:
    first = results[0]["models"]["cnn"]
    assert not first["cache_hit"]
    for later in results[1:]:
        m = later["models"]["cnn"]
        assert m["cache_hit"], later["dataset"]["layout"]
        assert m["test"]["top1"] == first["test"]["top1"]
        np.testing.assert_array_equal(later["proba"], results[0]["proba"])
    assert [r["dataset"]["layout"] for r in results] == ["class-per-folder", "labels-csv", "hf-datasets"]


def test_the_same_images_in_three_layouts_share_their_features(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("layouts")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=6, n_test=3)
    with warnings.catch_warnings(record=True) as caught:  # convergence and the like; never a skipped image
        warnings.simplefilter("always")
        _check_shared(_three_runs(base, data))
    assert not [str(w.message) for w in caught if "image" in str(w.message) and ("skipped" in str(w.message)
                                                                               or "unreadable" in str(w.message))]


@pytest.mark.skipif(not (shared_dir() / "data").exists(), reason="../shared/data is absent")
def test_real_dogs_in_three_layouts_share_their_features(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The issue's check on a slice of ../shared: 3 breeds, 6 train + 2 test photos each."""
    base = tmp_path_factory.mktemp("real-layouts")
    for breed in sorted(p.name for p in (DEV / "Images").iterdir())[:3]:
        photos = sorted((DEV / "Images" / breed).iterdir())[:8]
        for i, photo in enumerate(photos):
            target = base / "data" / ("train" if i < 6 else "test") / breed / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, target)
    with warnings.catch_warnings(record=True) as caught:  # convergence and the like; never a skipped image
        warnings.simplefilter("always")
        _check_shared(_three_runs(base, base / "data"))
    assert not [str(w.message) for w in caught if "image" in str(w.message) and ("skipped" in str(w.message)
                                                                               or "unreadable" in str(w.message))]
