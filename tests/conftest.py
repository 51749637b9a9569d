"""Tiny synthetic datasets in every layout dogbench reads, as builder functions and tmp_path fixtures.

Each class is a distinct dominant colour plus seeded noise, so features separate the classes easily.
Integration tests that need the real data use:
    pytest.mark.skipif(not (shared_dir() / "data").exists(), reason="../shared/data is absent")
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

# scikit-learn's estimator checks run their array-API check only with this set before scipy is imported
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.io  # noqa: E402
from filelock import FileLock  # noqa: E402
from PIL import Image  # noqa: E402

CLASS_COLOURS = (
    (220, 40, 40),
    (40, 200, 60),
    (40, 70, 220),
    (230, 210, 40),
    (200, 50, 210),
    (40, 210, 210),
    (240, 140, 30),
    (120, 120, 120),
)


CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """No test writes the user's cache: commands that are not given --cache-dir (and their subprocesses) get an
    empty cache of the session's own."""
    import tempfile

    config.stash[CACHE_KEY] = os.environ["DOGBENCH_CACHE"] = tempfile.mkdtemp(prefix="dogbench-test-cache-")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(config.stash.get(CACHE_KEY, ""), ignore_errors=True)


def shared_dir() -> Path:
    """../shared next to the repository: real data and weights for integration tests (may be absent)."""
    return Path(__file__).resolve().parents[2] / "shared"


def class_image(label: int, *, size: tuple[int, int] = (48, 40), rng: np.random.Generator) -> Image.Image:
    """An RGB image of `size` (width, height) in class `label`'s colour with Gaussian noise."""
    width, height = size
    colour = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.float64)
    pixels = colour + rng.normal(0.0, 20.0, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _cell_column(strings: list[str]) -> np.ndarray:
    """(N, 1) object array of 1-element string arrays: what scipy makes of a MATLAB cell column."""
    column = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        column[i, 0] = np.array([s])
    return column


def write_list(path: Path, files: list[str], labels: list[int]) -> None:
    """An official-format list .mat: file_list, annotation_list, labels (1-based float, shape (N, 1))."""
    scipy.io.savemat(
        path,
        {
            "file_list": _cell_column(files),
            "annotation_list": _cell_column([f.rsplit(".", 1)[0] for f in files]),
            "labels": np.array(labels, dtype=np.float64).reshape(-1, 1),
        },
    )


def _voc_xml(stem: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int]], breed: str) -> str:
    objects = "".join(
        f"<object><name>{breed}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation><folder>{stem.split('_')[0][1:]}</folder><filename>{stem}</filename>"
        f"<source><database>ImageNet database</database></source>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segment>0</segment>{objects}</annotation>"
    )


def official_box(i: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The first box make_official_layout writes for image number `i` of a class."""
    width, height = size
    return (i % 5, 1 + i % 3, width - 1 - i % 4, height - 2)


def make_official_layout(
    root: Path,
    *,
    n_classes: int = 3,
    n_train: int = 6,
    n_test: int = 4,
    with_annotations: bool = True,
    with_lists: bool = True,
    image_size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """Stanford Dogs, official layout: Images/n0000000{k}-Breed{k}/n0000000{k}_{i}.jpg, lists/, Annotation/.

    Class k has label k (0-based); images 0..n_train-1 are in the train list, the rest in the test list.
    Every second image's annotation holds two objects (the first is the one that counts).
    """
    rng = np.random.default_rng(seed)
    split_files: dict[str, list[str]] = {"train": [], "test": []}
    split_labels: dict[str, list[int]] = {"train": [], "test": []}
    for k in range(n_classes):
        wnid, breed = f"n{k:08d}", f"Breed{k}"
        folder = f"{wnid}-{breed}"
        (root / "Images" / folder).mkdir(parents=True, exist_ok=True)
        if with_annotations:
            (root / "Annotation" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_test):
            stem = f"{wnid}_{i}"
            class_image(k, size=image_size, rng=rng).save(
                root / "Images" / folder / f"{stem}.jpg", quality=90
            )
            split = "train" if i < n_train else "test"
            split_files[split].append(f"{folder}/{stem}.jpg")
            split_labels[split].append(k + 1)
            if with_annotations:
                boxes = [official_box(i, image_size)] + ([(0, 0, 10, 10)] if i % 2 else [])
                (root / "Annotation" / folder / stem).write_text(_voc_xml(stem, image_size, boxes, breed))
    if with_lists:
        (root / "lists").mkdir(parents=True, exist_ok=True)
        write_list(root / "lists" / "train_list.mat", split_files["train"], split_labels["train"])
        write_list(root / "lists" / "test_list.mat", split_files["test"], split_labels["test"])
        write_list(
            root / "lists" / "file_list.mat",
            split_files["train"] + split_files["test"],
            split_labels["train"] + split_labels["test"],
        )
    return root


def make_class_folder_layout(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    n_train: int = 5,
    n_test: int = 3,
    flat: bool = False,
    seed: int = 0,
) -> Path:
    """train/<class>/ + test/<class>/ (or <class>/ when flat) with n_train + n_test images per class.

    Odd-numbered images are PNG, the rest JPEG; a notes.txt, a .DS_Store and a hidden folder ride along
    and must be ignored.
    """
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        for i in range(n_train + n_test):
            if flat:
                folder = root / cls
            else:
                folder = root / ("train" if i < n_train else "test") / cls
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".png" if i % 2 else ".jpg"
            class_image(k, size=(40 + 4 * (i % 3), 32 + 4 * (i % 2)), rng=rng).save(
                folder / f"{cls}_{i:03d}{suffix}"
            )
            (folder / ".DS_Store").write_bytes(b"\0\1")
            (folder / "notes.txt").write_text("not an image\n")
    hidden = root / ("train" if not flat else "") / ".ipynb_checkpoints"
    hidden.mkdir(parents=True, exist_ok=True)
    class_image(0, rng=rng).save(hidden / "stray.jpg")
    return root


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid RGB PNG of ``width`` x ``height`` black pixels, streamed: 20,000 x 20,000 is a 1.2 MB file that
    would take 1.2 GB decoded (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    deflate = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        data = bytearray()
        for _ in range(height):
            data += deflate.compress(row)
        data += deflate.flush()
        out.write(chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b""))
    return path


def make_bad_images_layout(root: Path) -> tuple[Path, list[str]]:
    """A train/test class-per-folder set (red, green, blue) whose train split also holds broken files.

    Broken (returned as sample ids): a truncated JPEG, a zero-byte .jpg, a text file named .jpg.
    Valid but unusual (must load): train/green/cmyk.jpg (CMYK JPEG), train/blue/grey16.png (16-bit grey PNG).
    """
    make_class_folder_layout(root, classes=("red", "green", "blue"), n_train=4, n_test=2, seed=7)
    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    class_image(0, size=(64, 64), rng=rng).save(buffer, format="JPEG", quality=95)
    red = root / "train" / "red"
    (red / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (red / "empty.jpg").write_bytes(b"")
    (red / "text.jpg").write_text("this is not a JPEG\n")
    class_image(1, rng=rng).convert("CMYK").save(root / "train" / "green" / "cmyk.jpg", quality=95)
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))
    Image.fromarray(ramp).save(root / "train" / "blue" / "grey16.png")
    return root, ["train/red/truncated.jpg", "train/red/empty.jpg", "train/red/text.jpg"]


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    return make_official_layout(tmp_path / "stanford")


@pytest.fixture
def class_folder_root(tmp_path: Path) -> Path:
    return make_class_folder_layout(tmp_path / "pets")


@pytest.fixture
def flat_class_folder_root(tmp_path: Path) -> Path:
    return make_class_folder_layout(tmp_path / "pets-flat", flat=True)


@pytest.fixture
def bad_images_root(tmp_path: Path) -> tuple[Path, list[str]]:
    """(root, sample ids of the three unreadable files); see make_bad_images_layout."""
    return make_bad_images_layout(tmp_path / "bad")


@pytest.fixture(scope="session")
def png_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20,000 x 20,000 PNG (1.2 MB on disk, 1.2 GB decoded)."""
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png", 20_000, 20_000)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for tiny models: spin-waiting OpenMP threads crawl on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gradio_or_skip() -> None:
    """Gradio comes with the ``demo`` extra (and the ``test`` one); under CI its absence is a failure."""
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("gradio and gradio_client are needed: pip install -e '.[test]'")
        pytest.skip("gradio is not installed (pip install 'dogbench[demo]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_url(variable: str, what: str, example: str) -> str:
    """The URL of a server ``.ci/run`` starts (``variable``): skipped without it, a failure under CI."""
    url = os.environ.get(variable)
    if not url:
        why = f"no {what} server: set {variable}={example} (.ci/run starts one)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return url


def postgres_url() -> str:
    return service_url("DOGBENCH_TEST_POSTGRES", "PostgreSQL", "postgresql://USER@HOST:PORT/DB")


# ---------------------------------------------------------------- a real run on a slice of ../shared

DEV = shared_dir() / "data" / "stanford-dogs-dev"
WEIGHTS = shared_dir() / "weights"
CNN = WEIGHTS / "tf_efficientnet_lite0.in1k.safetensors"
VIT = WEIGHTS / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
ORIGINALS = shared_dir() / "data" / "stanford-dogs-originals"
# the originals' four breeds are among them, so `predict` on those full-size photos can be right
BREEDS = ("n02085620-Chihuahua", "n02085936-Maltese_dog", "n02099601-golden_retriever", "n02106662-German_shepherd",
          "n02109525-Saint_Bernard", "n02110958-pug")
HAVE_SHARED_RUN = DEV.is_dir() and CNN.is_file() and VIT.is_file()  # what real_run_dir needs
# the real run's ViT input: its img_size option, not timm's 518 (nor the 224 of the configs: a quarter of the
# tokens, so the ViT's extraction and predictions on one thread cost a quarter; no test scores the ViT)
VIT_SIZE = 112


def official_slice(root: Path, breeds: tuple[str, ...]) -> Path:
    """An official-layout dataset of a few breeds: links to the real images, lists filtered and renumbered."""
    (root / "Images").mkdir(parents=True)
    (root / "lists").mkdir()
    for breed in breeds:
        (root / "Images" / breed).symlink_to(DEV / "Images" / breed, target_is_directory=True)
    for split in ("train", "test"):
        mat = scipy.io.loadmat(DEV / "lists" / f"{split}_list.mat")
        files = [str(f[0][0]) for f in mat["file_list"]]
        keep = [f for f in files if f.split("/")[0] in breeds]
        write_list(root / "lists" / f"{split}_list.mat", keep, [breeds.index(f.split("/")[0]) + 1 for f in keep])
    return root


@pytest.fixture(scope="session")
def real_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dogbench run` on six real breeds with the real weights: shared by the integration and demo tests, which
    only read it. Under xdist the first worker to ask makes it in the session's base folder and the others wait
    for it (a lock), so the run is made once per session, not once per worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _make_real_run(tmp_path_factory.mktemp("real"))
    shared = tmp_path_factory.getbasetemp().parent  # this session's, above every worker's own
    with FileLock(str(shared / "real-run.lock")):
        if not (shared / "real" / "run" / "results.json").is_file():
            shutil.rmtree(shared / "real", ignore_errors=True)
            _make_real_run(shared / "real")
    return shared / "real" / "run"


def _make_real_run(base: Path) -> Path:
    from dogbench.cli import main

    data = official_slice(base / "dogs", BREEDS)
    args = [
        "run", "--data", str(data), "--out", str(base / "run"), "--cache-dir", str(base / "cache"), "--quiet",
        "--backbone", f"cnn=tf_efficientnet_lite0@{CNN}",
        "--backbone", f"vit=vit_small_patch14_dinov2@{VIT},img_size={VIT_SIZE},crop_pct=0.875",
        "--trials", "8", "--set", "evaluate.n_bootstrap=500",
        "--set", f'data.extra_test=["{ORIGINALS}"]',  # the originals' four breeds are among the slice's
        "--shots", "1,5,all", "--set", "shots.seeds=2", "--set", "shots.trials=3", "--seeds", "2",
    ]
    assert main(args) == 0
    return base / "run"


# ------------------------------------------------------------------------------------------- real full disks


class MountUnavailable(Exception):
    """This machine or user may not mount a tmpfs (needs root or CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``where``: a disk that really fills up; unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
    except FileNotFoundError as error:  # no mount(8) on this machine
        raise MountUnavailable(f"cannot mount a tmpfs at {where}: {error}") from None
    if done.returncode != 0:
        raise MountUnavailable(f"cannot mount a tmpfs at {where}: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        undone = subprocess.run(["umount", "-l", str(where)], capture_output=True, text=True)
        if undone.returncode != 0:
            warnings.warn(f"could not unmount the tmpfs at {where}: {undone.stderr.strip()}", stacklevel=2)


def unmount_below(folder: Path) -> list[str]:
    """Unmount what is still mounted below ``folder`` (a harness killed before its own unmount); those mounts."""
    below = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
             if line.split()[1].startswith(f"{folder.resolve()}/")]
    for mount in below:
        subprocess.run(["umount", "-l", mount], check=True)
    return below


def fill(disk: Path, free: int) -> Path:
    """Fill ``disk`` with one file until ``free`` bytes are left; the file (delete it to free the disk)."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    left = stats.f_bavail * stats.f_frsize - free
    with open(filler, "wb") as handle:
        while left > 0:
            left -= handle.write(bytes(min(left, 1 << 20)))
    return filler


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (skipped where mounting is not allowed), unmounted after the test."""
    try:
        with tmpfs(tmp_path / "disk", 1 << 20) as disk:
            yield disk
    except MountUnavailable as err:
        pytest.skip(str(err))
