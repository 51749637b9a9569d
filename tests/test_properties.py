"""Bad input, clear errors (issue 14): property-based tests (hypothesis, derandomized so CI repeats them) over
what users feed dogbench. Every case ends as a value or as dogbench's named error, never another exception.

Counts per property are hypothesis' ``max_examples`` (docs/guide/reliability.md lists them); a failing case is
shrunk by hypothesis to the smallest input that shows it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dogbench.config import ConfigError, DataConfig, resolve
from dogbench.data.datasets import DatasetLayoutError, _read_box, _read_list
from dogbench.data.download import prepare_dataset
from dogbench.data.images import ImageError, clamp_box, load_image, read_image
from dogbench.data.uploads import UploadError, UploadLimits, screen_upload
from dogbench.errors import DogbenchError

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


VALID = {fmt: _valid(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP")}


def _decode_or_image_error(path: Path) -> None:
    for decode in (lambda: read_image(path), lambda: load_image(path), lambda: read_image(path, min_side=8),
                   lambda: load_image(path, box=(2, 2, 20, 20))):
        try:
            out = decode()
        except ImageError as err:
            assert str(path) in str(err)  # the error names the file
        else:
            shape = tuple(out.shape) if hasattr(out, "shape") else (3, out.size[1], out.size[0])
            assert shape[0] == 3 and shape[1] >= 1 and shape[2] >= 1


def _screen_or_upload_error(path: Path) -> None:
    try:
        screened = screen_upload(path, UploadLimits(max_bytes=1 << 20, max_pixels=1 << 20), name="upload")
    except UploadError as err:
        assert str(err)
    else:
        assert screened.size[0] * screened.size[1] <= 1 << 20


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_a_named_image_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "random bytes é.jpg"
    path.write_bytes(data)
    _decode_or_image_error(path)
    _screen_or_upload_error(path)


@SETTINGS
@given(fmt=st.sampled_from(sorted(VALID)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_truncated_and_corrupted_images_are_an_image_or_a_named_image_error(
        fmt: str, cut: float, flips: list[tuple[float, int]], tmp_path: Path) -> None:
    data = bytearray(VALID[fmt][: max(1, int(len(VALID[fmt]) * cut))])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(bytes(data))
    _decode_or_image_error(path)
    _screen_or_upload_error(path)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def _jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG whose frame header claims ``width`` x ``height`` (the scan is a real 8x8 image's)."""
    data = bytearray(_valid_small_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _valid_small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@SETTINGS
@given(width=st.integers(1, 65535), height=st.integers(1, 65535), fmt=st.sampled_from(["png", "jpg"]))
def test_absurd_sizes_in_valid_headers_are_refused_before_decoding(width: int, height: int, fmt: str,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(_png_header(width, height) if fmt == "png" else _jpeg_header(width, height))
    if width * height > Image.MAX_IMAGE_PIXELS:
        for decode in (read_image, load_image):
            with pytest.raises(ImageError, match="refused before decoding"):
                decode(path)
        with pytest.raises(UploadError):
            screen_upload(path, UploadLimits(), name="bomb")
    elif width * height <= 4_000_000:  # small enough to let the decoders try (and fail on the short data)
        _decode_or_image_error(path)


@SETTINGS
@given(box=st.tuples(*[st.integers(-10**6, 10**6)] * 4), size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_boxes_anywhere_are_clamped_inside_the_image_or_refused_by_name(box: tuple[int, int, int, int],
                                                                        size: tuple[int, int]) -> None:
    try:
        x0, y0, x1, y1 = clamp_box(box, size, "dog.jpg")
    except ImageError as err:
        assert "dog.jpg" in str(err)
    else:
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


MAT_VALUES = st.one_of(
    st.none(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.text(max_size=10), max_size=5), st.lists(st.floats(-5, 200), max_size=5),
    st.lists(st.lists(st.integers(-3, 200), max_size=3), max_size=3),
)


@SETTINGS
@given(keys=st.dictionaries(st.sampled_from(["file_list", "labels", "annotation_list", "other"]), MAT_VALUES,
                            max_size=4), raw=st.binary(max_size=300), use_raw=st.booleans())
def test_malformed_mat_lists_are_a_layout_error_naming_the_file(keys: dict, raw: bytes, use_raw: bool,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "train_list.mat"
    if use_raw:
        path.write_bytes(raw)
    else:
        try:
            scipy.io.savemat(path, {k: np.array(v, dtype=object) if isinstance(v, list) else
                                    ("" if v is None else v) for k, v in keys.items()})
        except Exception:  # noqa: BLE001 - not every value is MATLAB-writable; those are not inputs
            return
    try:
        files, labels = _read_list(path)
    except DatasetLayoutError as err:
        assert str(path) in str(err)
    else:
        assert len(files) == len(labels) and (len(labels) == 0 or labels.min() >= 1)


VOC = ("<annotation><object><name>dog</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>"
       "</bndbox></object></annotation>")


@SETTINGS
@given(fields=st.lists(st.one_of(st.integers(-10**9, 10**9).map(str), st.floats().map(str),
                                 st.text(max_size=8)), min_size=4, max_size=4),
       garbage=st.text(max_size=200), use_garbage=st.booleans())
def test_malformed_box_files_are_a_layout_error_naming_the_file(fields: list[str], garbage: str, use_garbage: bool,
                                                                tmp_path: Path) -> None:
    from xml.sax.saxutils import escape

    path = tmp_path / "n02085620_7"
    path.write_text(garbage if use_garbage else VOC.format(*(escape(f) for f in fields)), encoding="utf-8")
    try:
        box = _read_box(path)
    except DatasetLayoutError as err:
        assert str(path) in str(err)
    else:
        assert box is None or (len(box) == 4 and all(isinstance(v, int) for v in box))


CONFIG_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
SECTION_KEYS = {
    "data": ["root", "classes", "val_fraction", "seed", "crop_to_box", "extra_test"],
    "features": ["batch_size", "device", "precision", "num_workers", "decoder", "chunk_size"],
    "tune": ["trials", "heads", "timeout_s", "pruner", "max_epochs", "storage"],
    "finetune": ["methods", "epochs", "lr", "crop_scale", "wise", "precision", "batch_size", "pruner"],
    "evaluate": ["n_bootstrap", "seeds"], "shots": ["shots", "seeds"], "report": ["enabled", "examples"],
    "backbones": ["vit", "cnn"], "nonsense": ["x"],
}
BACKBONE_TABLES = st.dictionaries(st.sampled_from(["vit", "cnn", ""]), st.one_of(
    CONFIG_VALUES, st.dictionaries(st.sampled_from(["model", "weights", "seed", "crop_to_box", "img_size", "mean",
                                                    "input_size", "crop_pct", "interpolation"]), CONFIG_VALUES,
                                   max_size=4)), max_size=2)


@SETTINGS
@given(doc=st.dictionaries(
    st.sampled_from(sorted(SECTION_KEYS)),
    st.one_of(CONFIG_VALUES, st.builds(dict, st.lists(st.tuples(
        st.sampled_from(sorted({k for keys in SECTION_KEYS.values() for k in keys})), CONFIG_VALUES), max_size=4))),
    max_size=4))
def test_config_files_with_every_wrong_type_are_a_config_error(doc: dict) -> None:
    _resolves_or_config_error(doc)


@SETTINGS
@given(backbones=BACKBONE_TABLES)
def test_backbone_tables_with_every_wrong_type_are_a_config_error(backbones: dict) -> None:
    _resolves_or_config_error({"backbones": backbones})


@SETTINGS
@given(key=st.sampled_from(["crop_scale", "wise", "methods", "classes", "shots", "heads", "extra_test"]),
       value=st.lists(CONFIG_VALUES, max_size=4))
def test_list_settings_with_elements_of_every_type_are_a_config_error(key: str, value: list) -> None:
    section = {"crop_scale": "finetune", "wise": "finetune", "methods": "finetune", "classes": "data",
               "shots": "shots", "heads": "tune", "extra_test": "data"}[key]
    _resolves_or_config_error({section: {key: value}})


def _resolves_or_config_error(doc: dict) -> None:
    try:
        cfg = resolve(doc)
    except ConfigError as err:
        assert str(err)
    else:
        assert cfg.backbones  # a config that resolves is complete


NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1,
                max_size=24).filter(lambda n: n not in (".", "..") and not n.startswith(".") and n.strip() == n
                                    and len(n.encode()) < 200)


@SETTINGS
@given(classes=st.lists(NAMES, min_size=0, max_size=3, unique_by=str.casefold), image=NAMES,
       counts=st.lists(st.integers(0, 3), min_size=3, max_size=3))
def test_unicode_spaced_and_empty_class_folders_open_or_name_the_problem(classes: list[str], image: str,
                                                                         counts: list[int], tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data set ü"
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "test"):
        for c, n in zip(classes, counts, strict=False):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{image} {i}.png").write_bytes(VALID["PNG"])
    root.mkdir(parents=True, exist_ok=True)
    try:
        ds = prepare_dataset(DataConfig(root=str(root), download=False), progress=False)
    except DogbenchError as err:
        assert str(err)
    else:
        assert len(ds.classes) >= 2 and all(s.path.is_file() for s in ds.samples)


def test_symlink_loops_in_the_data_folder_do_not_hang_the_scan(tmp_path: Path) -> None:
    """Class folders that link back up the tree (a loop) and a dangling link: the scan ends (in a subprocess
    with a deadline) with a dataset or a named error."""
    import subprocess
    import sys

    root = tmp_path / "loops"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "a.png").write_bytes(VALID["PNG"])
        (root / split / "cat" / "up").symlink_to(root / split, target_is_directory=True)
        (root / split / "loop").symlink_to(root, target_is_directory=True)
        (root / split / "dangling").symlink_to(root / "nowhere")
    code = ("import sys; from dogbench.config import DataConfig; from dogbench.data.download import prepare_dataset;"
            "from dogbench.errors import DogbenchError\n"
            "try:\n ds = prepare_dataset(DataConfig(root=sys.argv[1], download=False), progress=False)\n"
            " print(len(ds.samples), sorted(ds.classes))\n"
            "except DogbenchError as err:\n print('error:', err)")
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    # each split has cat/a.png and dog/a.png: 4 images of 2 classes (the loops and links add nothing), or a named error
    assert done.stdout.startswith(("error:", "4 ['cat', 'dog']")), done.stdout
