from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import (
    class_image,
    make_class_folder_layout,
    make_official_layout,
    official_box,
    shared_dir,
    write_list,
)
from dogbench.data import (
    LAYOUTS,
    Dataset,
    DatasetLayoutError,
    ImageError,
    detect_layout,
    load_image,
    open_dataset,
    stratified_split,
)
from dogbench.data.images import check_image_file, image_files, not_an_image, read_image
from dogbench.data.uploads import UploadError, UploadLimits, screen_upload

SHARED_DATA = shared_dir() / "data"


def _check_order(ds: Dataset) -> None:
    train, test = ds.split("train"), ds.split("test")
    assert ds.samples == train + test
    assert [s.sample_id for s in train] == sorted(s.sample_id for s in train)
    assert [s.sample_id for s in test] == sorted(s.sample_id for s in test)
    assert len({s.sample_id for s in ds.samples}) == len(ds.samples)
    assert all(s.path.is_absolute() and s.path.is_file() for s in ds.samples)


# ---------------------------------------------------------------- official layout


def test_official_layout_with_lists_and_boxes(official_root: Path) -> None:
    ds = open_dataset(official_root)
    assert (ds.name, ds.layout, ds.split_source) == ("stanford-dogs", "stanford-dogs", "official-lists")
    assert ds.root == official_root.resolve()
    assert ds.classes == ("Breed0", "Breed1", "Breed2")
    assert len(ds.split("train")) == 18 and len(ds.split("test")) == 12
    _check_order(ds)
    sample = next(s for s in ds.samples if s.sample_id == "n00000001-Breed1/n00000001_7.jpg")
    assert (sample.label, sample.split) == (1, "test")
    assert sample.path == official_root.resolve() / "Images" / sample.sample_id
    # image 7 has two objects; the first one counts
    assert sample.box == official_box(7, (48, 40))
    assert all(s.label == int(s.sample_id[8]) for s in ds.samples)


def test_official_layout_missing_annotation_file_gives_no_box(official_root: Path) -> None:
    (official_root / "Annotation" / "n00000000-Breed0" / "n00000000_0").unlink()
    ds = open_dataset(official_root)
    boxes = {s.sample_id: s.box for s in ds.samples}
    assert boxes["n00000000-Breed0/n00000000_0.jpg"] is None
    assert boxes["n00000000-Breed0/n00000000_1.jpg"] == official_box(1, (48, 40))


def test_official_layout_without_annotations(tmp_path: Path) -> None:
    ds = open_dataset(make_official_layout(tmp_path / "d", with_annotations=False))
    assert ds.split_source == "official-lists"
    assert all(s.box is None for s in ds.samples)


def test_official_layout_without_lists_warns_and_splits_by_seed(tmp_path: Path) -> None:
    root = make_official_layout(tmp_path / "d", n_classes=2, n_train=6, n_test=3, with_lists=False)
    with pytest.warns(UserWarning, match="official split"):
        ds = open_dataset(root, seed=3)
    assert ds.split_source == "seeded"
    # <= 100 images per class: 2/3 of each class trains
    for label in (0, 1):
        assert sum(1 for s in ds.split("train") if s.label == label) == 6
        assert sum(1 for s in ds.split("test") if s.label == label) == 3
    with pytest.warns(UserWarning):
        assert open_dataset(root, seed=3) == ds
    with pytest.warns(UserWarning):
        other = open_dataset(root, seed=4)
    assert {s.sample_id for s in other.split("test")} != {s.sample_id for s in ds.split("test")}


def test_official_seeded_split_keeps_100_train_images_per_class(tmp_path: Path) -> None:
    root = make_official_layout(
        tmp_path / "d",
        n_classes=1,
        n_train=105,
        n_test=0,
        with_lists=False,
        with_annotations=False,
        image_size=(8, 8),
    )
    with pytest.warns(UserWarning):
        ds = open_dataset(root)
    assert (len(ds.split("train")), len(ds.split("test"))) == (100, 5)


def test_parent_folder_is_accepted(official_root: Path) -> None:
    ds = open_dataset(official_root.parent)
    assert ds.layout == "stanford-dogs"
    assert ds.root == official_root.resolve()
    assert detect_layout(official_root.parent) == ("stanford-dogs", official_root.resolve())


def test_kaggle_layout(tmp_path: Path) -> None:
    src = make_official_layout(tmp_path / "src")
    kaggle = tmp_path / "stanford-dogs-dataset"
    shutil.copytree(src / "Images", kaggle / "images" / "Images")
    shutil.copytree(src / "Annotation", kaggle / "annotations" / "Annotation")
    with pytest.warns(UserWarning, match="official split"):
        ds = open_dataset(kaggle)
    assert (ds.layout, ds.split_source) == ("stanford-dogs-kaggle", "seeded")
    assert ds.classes == ("Breed0", "Breed1", "Breed2")
    assert len(ds.samples) == 30
    assert all(s.box is not None for s in ds.samples)

    shutil.copytree(src / "lists", kaggle / "lists")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_dataset(kaggle)
    assert ds.split_source == "official-lists"
    assert len(ds.split("train")) == 18


def test_lists_at_root_as_lists_tar_unpacks(official_root: Path) -> None:
    for mat in (official_root / "lists").iterdir():
        mat.rename(official_root / mat.name)
    (official_root / "lists").rmdir()
    assert open_dataset(official_root).split_source == "official-lists"


def test_mismatched_mat_labels_raise(official_root: Path) -> None:
    files = [f"n00000000-Breed0/n00000000_{i}.jpg" for i in range(6)] + ["n00000001-Breed1/n00000001_0.jpg"]
    write_list(official_root / "lists" / "train_list.mat", files, [1] * 6 + [1])
    with pytest.raises(DatasetLayoutError, match="disagree") as info:
        open_dataset(official_root)
    assert "n00000001-Breed1/n00000001_0.jpg" in str(info.value)


def test_listed_but_missing_files_raise(official_root: Path) -> None:
    (official_root / "Images" / "n00000002-Breed2" / "n00000002_1.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="missing") as info:
        open_dataset(official_root)
    assert "n00000002-Breed2/n00000002_1.jpg" in str(info.value)


def test_one_list_without_the_other_raises(official_root: Path) -> None:
    (official_root / "lists" / "test_list.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="test_list.mat"):
        open_dataset(official_root)


# ---------------------------------------------------------------- class-per-folder


def test_class_per_folder_with_splits(class_folder_root: Path) -> None:
    ds = open_dataset(class_folder_root)
    assert (ds.name, ds.layout, ds.split_source) == ("pets", "class-per-folder", "folders")
    assert ds.classes == ("cat", "dog", "fox")
    assert len(ds.split("train")) == 15 and len(ds.split("test")) == 9
    _check_order(ds)
    assert ds.samples[0].sample_id == "train/cat/cat_000.jpg"
    assert all(s.sample_id.split("/")[1] == ds.classes[s.label] for s in ds.samples)
    assert all(s.box is None for s in ds.samples)
    assert not any(".ipynb" in s.sample_id or s.sample_id.endswith(".txt") for s in ds.samples)


def test_class_missing_from_test_is_fine(class_folder_root: Path) -> None:
    make_class_folder_layout(class_folder_root, classes=("cat", "dog", "fox", "yak"), n_train=2, n_test=0)
    ds = open_dataset(class_folder_root)
    assert ds.classes == ("cat", "dog", "fox", "yak")
    assert {s.label for s in ds.split("test")} == {0, 1, 2}


def test_flat_class_per_folder(flat_class_folder_root: Path) -> None:
    ds = open_dataset(flat_class_folder_root, test_fraction=0.25, seed=1)
    assert (ds.layout, ds.split_source) == ("class-per-folder-flat", "seeded")
    assert ds.classes == ("cat", "dog", "fox")
    assert len(ds.samples) == 24
    assert len(ds.split("test")) == 6
    _check_order(ds)
    assert ds.samples[0].sample_id.count("/") == 1
    for label in range(3):
        assert sum(s.label == label for s in ds.split("test")) == 2
    assert open_dataset(flat_class_folder_root, test_fraction=0.25, seed=1) == ds


def test_unknown_split_name_lists_valid_ones(class_folder_root: Path) -> None:
    with pytest.raises(ValueError, match="train, test"):
        open_dataset(class_folder_root).split("val")


# ---------------------------------------------------------------- errors


def test_unrecognised_layout_lists_accepted_layouts(tmp_path: Path) -> None:
    (tmp_path / "weird" / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "weird" / "readme.md").write_text("hi")
    with pytest.raises(DatasetLayoutError) as info:
        open_dataset(tmp_path / "weird")
    message = str(info.value)
    assert "nested/" in message and "readme.md" in message
    for layout in LAYOUTS:
        assert layout in message


def test_train_without_test_is_explained(tmp_path: Path) -> None:
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no test/"):
        open_dataset(tmp_path / "d")


def test_empty_dataset_raises(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "d" / split / "cat").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="No images"):
        open_dataset(tmp_path / "d")
    (tmp_path / "s" / "Images" / "n1-a").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="No images"):
        open_dataset(tmp_path / "s")


def test_missing_root_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nope")


# ---------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("with_boxes", [False, True])
def test_fingerprint_is_stable_and_tracks_file_changes(official_root: Path, with_boxes: bool) -> None:
    first = open_dataset(official_root).fingerprint(with_boxes=with_boxes)
    assert len(first) == 64
    assert open_dataset(official_root).fingerprint(with_boxes=with_boxes) == first
    image = official_root / "Images" / "n00000000-Breed0" / "n00000000_3.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert open_dataset(official_root).fingerprint(with_boxes=with_boxes) == first  # content, not mtime
    image.write_bytes(image.read_bytes() + b"\0")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert open_dataset(official_root).fingerprint(with_boxes=with_boxes) != first


def test_fingerprint_of_an_opened_dataset_sees_later_changes(class_folder_root: Path) -> None:
    ds = open_dataset(class_folder_root)
    before = ds.fingerprint(with_boxes=False)
    class_image(2, rng=np.random.default_rng(99)).save(ds.samples[0].path, format="JPEG")
    assert ds.fingerprint(with_boxes=False) != before


def test_fingerprint_ignores_the_split(flat_class_folder_root: Path) -> None:
    seed0, seed1 = (open_dataset(flat_class_folder_root, seed=seed) for seed in (0, 1))
    assert seed0.split("test") != seed1.split("test")
    assert seed0.fingerprint(with_boxes=False) == seed1.fingerprint(with_boxes=False)
    assert open_dataset(flat_class_folder_root, test_fraction=0.5).fingerprint(
        with_boxes=False
    ) == seed0.fingerprint(with_boxes=False)


def test_fingerprint_without_boxes_ignores_annotations(official_root: Path) -> None:
    with_annotations = open_dataset(official_root)
    shutil.rmtree(official_root / "Annotation")
    without = open_dataset(official_root)
    assert all(s.box is None for s in without.samples)
    assert without.fingerprint(with_boxes=False) == with_annotations.fingerprint(with_boxes=False)
    assert without.fingerprint(with_boxes=True) != with_annotations.fingerprint(with_boxes=True)


def test_fingerprint_tracks_boxes_only_when_asked(official_root: Path) -> None:
    ann = official_root / "Annotation" / "n00000001-Breed1" / "n00000001_2"
    before = open_dataset(official_root)
    ann.write_text(ann.read_text().replace("<xmin>2</xmin>", "<xmin>3</xmin>"))
    after = open_dataset(official_root)
    assert after.fingerprint(with_boxes=True) != before.fingerprint(with_boxes=True)
    assert after.fingerprint(with_boxes=False) == before.fingerprint(with_boxes=False)


# ---------------------------------------------------------------- load_image


def test_load_image_grey_l(tmp_path: Path) -> None:
    Image.new("L", (10, 6), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert (img.mode, img.size) == ("RGB", (10, 6))
    assert img.getpixel((3, 3)) == (77, 77, 77)


def test_load_image_16bit_grey_scales_instead_of_clipping(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_load_image_32bit_int_and_float(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert [load_image(tmp_path / "i.tif").getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert [load_image(tmp_path / "f.tif").getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_load_image_cmyk(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 150 and g < 80 and b < 80


def test_load_image_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.getpixel((1, 1)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 255)
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)


def test_load_image_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((2, 2)) == (10, 200, 30)
    pal.save(tmp_path / "pt.png", transparency=1)
    assert load_image(tmp_path / "pt.png").getpixel((2, 2)) == (255, 255, 255)
    pal.save(tmp_path / "p.gif", transparency=1)
    assert load_image(tmp_path / "p.gif").getpixel((2, 2)) == (255, 255, 255)


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    assert sum(loaded.getpixel((10, 2))) > 600  # the left band is now at the top
    assert sum(loaded.getpixel((10, 37))) < 100


def test_load_image_crops_to_clamped_box(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 20), (0, 0, 0))
    img.paste((255, 0, 0), (5, 4, 15, 10))
    img.save(tmp_path / "b.png")
    crop = load_image(tmp_path / "b.png", box=(5, 4, 15, 10))
    assert crop.size == (10, 6)
    assert crop.getpixel((0, 0)) == (255, 0, 0) and crop.getpixel((9, 5)) == (255, 0, 0)
    assert load_image(tmp_path / "b.png", box=(-5, 10, 100, 40)).size == (30, 10)
    with pytest.raises(ImageError, match="outside"):
        load_image(tmp_path / "b.png", box=(40, 0, 50, 10))


def test_load_image_crops_in_stored_coordinates_before_exif_orientation(tmp_path: Path) -> None:
    stored = class_image(0, size=(40, 24), rng=np.random.default_rng(3))
    stored.paste((0, 0, 255), (0, 0, 8, 24))  # a blue left band, a non-symmetric landmark
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rot.png", exif=exif)
    box = (4, 3, 30, 20)  # Pascal-VOC: stored pixel coordinates
    with Image.open(tmp_path / "rot.png") as raw:
        raw.load()
        assert raw.getexif()[0x0112] == 6
        expected = ImageOps.exif_transpose(raw.crop(box))
    loaded = load_image(tmp_path / "rot.png", box=box)
    assert loaded.size == (17, 26) == expected.size
    assert np.array_equal(np.asarray(loaded), np.asarray(expected.convert("RGB")))
    assert np.array_equal(np.asarray(loaded), np.asarray(stored.crop(box).transpose(Image.Transpose.ROTATE_270)))


def test_load_image_closes_its_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    before = len(list(fd_dir.iterdir()))
    images = [load_image(tmp_path / "x.jpg") for _ in range(20)]
    assert len(images) == 20
    assert len(list(fd_dir.iterdir())) <= before


def test_bad_images_raise_image_error_naming_the_path(bad_images_root: tuple[Path, list[str]]) -> None:
    root, bad_ids = bad_images_root
    ds = open_dataset(root)
    by_id = {s.sample_id: s for s in ds.samples}
    assert set(bad_ids) <= set(by_id)
    said = {"train/red/truncated.jpg": "is corrupt or truncated", "train/red/empty.jpg": "is empty (0 bytes)",
            "train/red/text.jpg": "is a text file, not an image, despite its .jpg name"}
    assert set(said) == set(bad_ids)
    for sample_id in bad_ids:
        path = str(by_id[sample_id].path)
        header_only = () if sample_id.endswith("truncated.jpg") else (check_image_file,)  # its header is fine
        for read in (load_image, read_image, *header_only):  # dogbench's words, the path said once
            with pytest.raises(ImageError) as info:
                read(by_id[sample_id].path)
            message = str(info.value)
            assert message.startswith(f"{path} {said[sample_id]}") and message.count(path) == 1, message
            assert "cannot identify" not in message
    unusual = [by_id["train/green/cmyk.jpg"], by_id["train/blue/grey16.png"]]
    good = [s for s in ds.samples if s.sample_id not in bad_ids]
    assert all(load_image(s.path).mode == "RGB" for s in good + unusual)
    ramp = np.asarray(load_image(by_id["train/blue/grey16.png"].path))
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[0, -1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(("content", "said"), [
    (b"hello, I am a shopping list\n", "is a text file, not an image, despite its .jpg name"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "is a PDF document, not an image, despite its .jpg name"),
    (bytes(range(256)), "is not an image dogbench can read, despite its .jpg name"),
])
def test_a_file_that_is_no_image_gets_the_demos_sentence(content: bytes, said: str, tmp_path: Path) -> None:
    """The CLI's and the demo's words for a file that is no image are one sentence (data.images.not_an_image)."""
    path = tmp_path / "notadog.jpg"
    path.write_bytes(content)
    assert not_an_image(path) == said
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == f"{path} {said}"
    with pytest.raises(UploadError) as upload:
        screen_upload(path, UploadLimits(), name="notadog.jpg")
    assert str(upload.value).startswith(f"'notadog.jpg' {said}: upload ")
    named_so = path.rename(tmp_path / "notes.txt")  # no "despite" for a name that does not claim an image
    assert not_an_image(named_so) == said.removesuffix(", despite its .jpg name")


def test_a_missing_path_or_a_folder_is_named_as_such(tmp_path: Path) -> None:
    for read in (load_image, read_image, check_image_file):
        with pytest.raises(ImageError, match=r"missing\.jpg does not exist$"):
            read(tmp_path / "missing.jpg")
        with pytest.raises(ImageError, match=r"is a folder, not an image$"):
            read(tmp_path)


def test_image_files_walks_a_folder_by_extension_skipping_hidden_entries(tmp_path: Path) -> None:
    for rel in ("b/2.JPG", "b/1.png", "a.jpeg", "notes.txt", ".hidden.jpg", ".cache/3.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert image_files(tmp_path) == [tmp_path / "a.jpeg", tmp_path / "b" / "1.png", tmp_path / "b" / "2.JPG"]


def test_decompression_bomb_becomes_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="big.png"):
        load_image(tmp_path / "big.png")


# ---------------------------------------------------------------- stratified_split


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_stratified_split_properties(fraction: float) -> None:
    labels = np.repeat(np.arange(6), [1, 2, 3, 10, 25, 7])
    np.random.default_rng(0).shuffle(labels)
    keep, held = stratified_split(labels, fraction=fraction, seed=5)
    assert keep.dtype.kind == "i" and held.dtype.kind == "i"
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)
    assert np.intersect1d(keep, held).size == 0
    assert np.array_equal(np.union1d(keep, held), np.arange(len(labels)))
    for cls in range(6):
        n = int(np.sum(labels == cls))
        n_held = int(np.sum(labels[held] == cls))
        expected = 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)
        assert n_held == expected
        if n >= 2:
            assert int(np.sum(labels[keep] == cls)) >= 1
    again = stratified_split(labels, fraction=fraction, seed=5)
    assert np.array_equal(again[0], keep) and np.array_equal(again[1], held)


def test_stratified_split_depends_on_seed() -> None:
    labels = np.repeat(np.arange(3), 20)
    held_a = stratified_split(labels, fraction=0.3, seed=0)[1]
    held_b = stratified_split(labels, fraction=0.3, seed=1)[1]
    assert not np.array_equal(held_a, held_b)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        stratified_split(np.zeros(4, dtype=int), fraction=fraction, seed=0)


# ---------------------------------------------------------------- real data


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_DATA / "stanford-dogs-dev").exists(), reason="../shared/data is absent")
def test_real_stanford_dogs_dev() -> None:
    ds = open_dataset(SHARED_DATA / "stanford-dogs-dev")
    assert (ds.layout, ds.split_source) == ("stanford-dogs", "official-lists")
    assert len(ds.classes) == 120 and ds.classes[0] == "Chihuahua"
    assert (len(ds.split("train")), len(ds.split("test"))) == (4800, 2400)
    assert {s.label for s in ds.split("test")} == set(range(120))
    assert load_image(ds.samples[0].path).size == (224, 224)


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_DATA / "stanford-dogs-originals").exists(), reason="../shared/data is absent")
def test_real_stanford_dogs_originals_with_boxes() -> None:
    ds = open_dataset(SHARED_DATA / "stanford-dogs-originals")
    assert len(ds.classes) == 4 and "German_shepherd" in ds.classes
    assert (len(ds.split("train")), len(ds.split("test"))) == (40, 40)
    assert all(s.box is not None for s in ds.samples)
    for sample in ds.samples[::10]:
        width, height = load_image(sample.path).size
        xmin, ymin, xmax, ymax = sample.box
        assert 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height
        assert load_image(sample.path, box=sample.box).size == (xmax - xmin, ymax - ymin)


def _smooth_photo(path: Path, size: tuple[int, int]) -> Path:
    """A JPEG of ``size`` (width, height) with smooth gradients and a few shapes: realistic for DCT scaling."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pixels = np.stack([
        128 + 100 * np.sin(xx / 37.0), 128 + 100 * np.cos(yy / 29.0), 128 + 90 * np.sin((xx + yy) / 53.0),
    ], axis=-1)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def test_reduced_decode_keeps_the_short_side_above_the_target(tmp_path: Path) -> None:
    path = _smooth_photo(tmp_path / "big.jpg", (1600, 1200))
    full = load_image(path)
    reduced = load_image(path, min_side=256)
    assert full.size == (1600, 1200)
    assert reduced.size == (800, 600)  # 1/2 scale: 1/4 would give 300 px, under REDUCING_GAP x 256 = 512
    assert load_image(path, min_side=350).size == (1600, 1200)  # 1/2 would give 600 < 2 x 350: full decode
    # Same picture: the reduced decode matches the full decode shrunk to its size.
    shrunk = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(reduced, dtype=np.float64) - shrunk).mean() < 3.0


def test_reduced_decode_scales_the_box(tmp_path: Path) -> None:
    path = _smooth_photo(tmp_path / "big.jpg", (1600, 1200))
    box = (200, 100, 1400, 1100)  # 1200 x 1000: decoded at 1/2 for a 200 target (1/4 would leave 250 < 2 x 200)
    full = load_image(path, box=box)
    reduced = load_image(path, box=box, min_side=200)
    assert full.size == (1200, 1000) and reduced.size == (600, 500)
    shrunk = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(reduced, dtype=np.float64) - shrunk).mean() < 3.0


def test_reduced_decode_leaves_small_and_non_jpeg_images_alone(tmp_path: Path) -> None:
    small = _smooth_photo(tmp_path / "small.jpg", (400, 300))
    assert np.array_equal(np.asarray(load_image(small, min_side=256)), np.asarray(load_image(small)))
    png = tmp_path / "big.png"
    Image.open(_smooth_photo(tmp_path / "src.jpg", (1600, 1200))).save(png)
    assert load_image(png, min_side=256).size == (1600, 1200)


def test_a_test_list_covering_only_some_breeds_is_read(tmp_path: Path) -> None:
    """Labels index the sorted folders of Images/, not only the folders a list mentions."""
    root = make_official_layout(tmp_path / "dogs", n_classes=3, n_train=2, n_test=2)
    only_last = [f"n00000002-Breed2/n00000002_{i}.jpg" for i in (2, 3)]
    write_list(root / "lists" / "test_list.mat", only_last, [3, 3])
    ds = open_dataset(root)
    test = ds.split("test")
    assert [s.sample_id for s in test] == only_last and {s.label for s in test} == {2}
    assert ds.classes == ("Breed0", "Breed1", "Breed2")
    write_list(root / "lists" / "test_list.mat", only_last, [1, 1])  # Breed0's label on Breed2's photos
    with pytest.raises(DatasetLayoutError, match="labels disagree with the image folders"):
        open_dataset(root)


def test_a_second_test_set_takes_the_datasets_labels_by_name(tmp_path: Path) -> None:
    from dogbench.data import relabel_to

    extra = open_dataset(make_class_folder_layout(tmp_path / "extra", classes=("Golden-Retriever", "pug"), n_train=2,
                                                  n_test=1, flat=True))
    classes = ("Chihuahua", "golden_retriever", "pug")
    got = relabel_to(extra, classes)
    assert got.classes == classes and {s.split for s in got.samples} == {"test"}
    assert len(got.samples) == len(extra.samples) == 6
    by_folder = {s.sample_id.split("/")[0]: s.label for s in got.samples}
    assert by_folder == {"Golden-Retriever": 1, "pug": 2}
    with pytest.raises(DatasetLayoutError, match="has classes the dataset does not: Golden-Retriever"):
        relabel_to(extra, ("Chihuahua", "pug"))


def test_select_classes_keeps_the_first_n_or_the_named_ones_relabelled(tmp_path: Path) -> None:
    from dogbench.data import select_classes

    ds = open_dataset(make_class_folder_layout(tmp_path / "d", classes=("akita", "beagle", "corgi", "dingo"),
                                               n_train=3, n_test=2))
    assert select_classes(ds, None) is ds
    first = select_classes(ds, 2)
    assert first.classes == ("akita", "beagle") and len(first.samples) == 10
    assert {s.label for s in first.samples} == {0, 1} and {s.split for s in first.samples} == {"train", "test"}
    named = select_classes(ds, ["Dingo", "beagle"])  # matched like second test sets; the dataset's order kept
    assert named.classes == ("beagle", "dingo")
    assert {s.sample_id.split("/")[1]: s.label for s in named.samples} == {"beagle": 0, "dingo": 1}
    with pytest.raises(DatasetLayoutError, match=r"does not have: corgy \(did you mean corgi\?\)"):
        select_classes(ds, ["corgy", "akita"])
    with pytest.raises(DatasetLayoutError, match="has 4 classes; choose 2 to that many"):
        select_classes(ds, 5)


def test_the_shots_sampler_takes_exactly_k_per_class_and_is_seeded() -> None:
    from dogbench.data import sample_shots

    labels = np.repeat(np.arange(5), [10, 7, 3, 12, 1])
    rows = sample_shots(labels, k=3, seed=0)
    assert np.bincount(labels[rows]).tolist() == [3, 3, 3, 3, 1]  # a class with fewer gives all it has
    assert np.array_equal(rows, np.sort(rows)) and len(set(rows.tolist())) == len(rows)
    assert np.array_equal(rows, sample_shots(labels, k=3, seed=0))
    assert not np.array_equal(rows, sample_shots(labels, k=3, seed=1))
    assert set(sample_shots(labels, k=3, seed=0)) <= set(sample_shots(labels, k=100, seed=5))
    with pytest.raises(ValueError, match="k must be >= 1"):
        sample_shots(labels, k=0, seed=0)
