"""Fetch, verify and unpack the official Stanford Dogs archives into a folder that `open_dataset` reads."""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from dogbench.atomic import atomic_write_text
from dogbench.config import DataConfig
from dogbench.data.datasets import (
    DataNotFoundError,
    Dataset,
    DatasetLayoutError,
    detect_layout,
    open_dataset,
    select_classes,
)
from dogbench.data.hf import is_hf_data, open_hf
from dogbench.data.labels import is_label_file, open_label_file
from dogbench.data.named import NAMED, open_named
from dogbench.errors import DogbenchError
from dogbench.locks import locked

__all__ = [
    "STANFORD_DOGS_ARCHIVES",
    "STANFORD_DOGS_URL",
    "Archive",
    "DownloadError",
    "default_cache_dir",
    "fetch",
    "prepare_stanford_dogs",
    "safe_extract",
]


@dataclass(frozen=True)
class Archive:
    filename: str
    size: int
    sha256: str


STANFORD_DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
STANFORD_DOGS_ARCHIVES = (
    Archive("images.tar", 793579520, "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"),
    Archive("annotation.tar", 21852160, "662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd"),
    Archive("lists.tar", 481280, "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c"),
)
# Archives a dataset can do without; every other archive is required.
OPTIONAL_ARCHIVES = {
    "annotation.tar": "no bounding boxes will be available",
    "lists.tar": "the official split is unknown and a seeded split will be used",
}
EXTRACTED_DIR = "extracted"
_CHUNK = 1 << 20


class DownloadError(DogbenchError, RuntimeError):
    """An archive could not be fetched, verified or unpacked."""


def default_cache_dir() -> Path:
    """$DOGBENCH_CACHE, else $XDG_CACHE_HOME/dogbench, else ~/.cache/dogbench."""
    if os.environ.get("DOGBENCH_CACHE"):
        return Path(os.environ["DOGBENCH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dogbench"


def _archive_url(base_url: str, filename: str) -> str:
    return base_url.rstrip("/") + "/" + filename


def _manual_steps(
    base_url: str = STANFORD_DOGS_URL, archives: tuple[Archive, ...] = STANFORD_DOGS_ARCHIVES
) -> str:
    urls = "\n".join(f"  {_archive_url(base_url, a.filename)}" for a in archives)
    return (
        "The official server has been reported to answer 403 at times. Download the archives yourself:\n"
        f"{urls}\n"
        "put them in one folder and point --data at it, or set a mirror with --data-url (base_url=...)."
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (archives here; weight files in dogbench.backbones)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, *, size: int | None, sha256: str | None) -> str | None:
    """None when `path` matches the expected size and sha256, else what is wrong."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch for {path.name}: expected {size} bytes, got {actual_size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            return f"sha256 mismatch for {path.name}: expected {sha256}, got {actual}"
    return None


def _stream(url: str, part: Path, *, size: int | None, timeout: float, progress: bool) -> int | None:
    """Append the rest of `url` to `part`, restarting from zero when the server ignores the Range request; the
    file's whole size as the server announced it (None when it did not say)."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return size
    headers = {"User-Agent": "dogbench", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        part.unlink()  # a partial file the server cannot continue: start over
        return _stream(url, part, size=size, timeout=timeout, progress=progress)
    with response:
        resumed = offset > 0 and response.status == 206
        mode = "ab" if resumed else "wb"
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        announced = start + int(length) if length and length.isdigit() else None
        if size is not None and announced is not None and announced != size:  # not the catalog's file: no body
            part.unlink(missing_ok=True)
            raise DownloadError(f"Downloaded {url} but it is corrupt (size mismatch: expected {size} bytes, the "
                                f"server's file has {announced}); the partial file was deleted")
        total = size if size is not None else announced
        with (
            part.open(mode) as fh,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    return announced


def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify size and sha256, then rename into place.

    ``dest.lock`` is held meanwhile: a second process fetching the same file waits, then finds it in place.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.with_name(dest.name + ".lock"), what=f"the download of {dest.name}"):
        if dest.exists():
            if (size is None and sha256 is None) or _verify(dest, size=size, sha256=sha256) is None:
                return dest
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        try:
            announced = _stream(url, part, size=size, timeout=timeout, progress=progress)
        except HTTPError as exc:
            raise DownloadError(
                f"Could not download {url}: HTTP {exc.code} {exc.reason}.\n{_manual_steps()}"
            ) from exc
        except (URLError, OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, URLError) else exc
            raise DownloadError(f"Could not download {url}: {reason}.\n{_manual_steps()}") from exc
        got = part.stat().st_size if part.exists() else 0
        expected = size if size is not None else announced
        if expected is not None and got < expected:  # the connection ended early: keep what came, resume next time
            raise DownloadError(f"Could not download {url}: the transfer stopped after {got:,} of {expected:,} "
                                f"bytes; they are kept in {part} and the same command continues from there")
        problem = _verify(part, size=size, sha256=sha256)
        if problem:
            part.unlink()
            raise DownloadError(f"Downloaded {url} but it is corrupt ({problem}); the partial file was deleted")
        os.replace(part, dest)
    return dest


def _check_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    def inside(path: Path) -> bool:
        return path == target or target in path.parents

    name = member.name
    if os.path.isabs(name) or name.startswith(("/", "\\")) or not inside((target / name).resolve()):
        raise DownloadError(
            f"Refusing to extract {archive.name}: member {name!r} would land outside {target}"
        )
    if member.issym():
        link = Path(member.linkname)
        resolved = (target / Path(name).parent / link).resolve()
        if link.is_absolute() or not inside(resolved):
            raise DownloadError(
                f"Refusing to extract {archive.name}: symlink {name!r} -> {member.linkname!r} "
                f"points outside {target}"
            )
    if member.islnk() and (
        os.path.isabs(member.linkname) or not inside((target / member.linkname).resolve())
    ):
        raise DownloadError(
            f"Refusing to extract {archive.name}: hard link {name!r} -> {member.linkname!r} "
            f"points outside {target}"
        )


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack the tar `archive` into `target`, refusing members that would escape it; skips device files.

    A marker `.extracted-<archive name>` is written last, so an interrupted extraction is redone.
    """
    archive, target = Path(archive), Path(target)
    marker = target / f".extracted-{archive.name}"
    if marker.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    resolved_target = target.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, resolved_target, archive)
            regular = [m for m in members if not (m.ischr() or m.isblk() or m.isfifo() or m.isdev())]
            # The "data" filter (Python >= 3.11.4) re-checks every member as a second line of defence.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(resolved_target, members=regular, **extra)
    except getattr(tarfile, "FilterError", tarfile.TarError) as exc:
        raise DownloadError(f"Refusing to extract {archive.name}: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise DownloadError(
            f"{archive} is not a readable tar archive ({exc}); delete it and download it again"
        ) from exc
    atomic_write_text(marker, f"{archive.stat().st_size}\n")


def _extract_archives(
    folder: Path, archives: tuple[Archive, ...], target: Path, *, failed: dict[str, str] | None = None
) -> Path:
    """Verify and unpack into `target` the archives in `folder` not unpacked yet; returns `target`.

    `failed` maps optional archives whose download failed to why; each missing one is warned about once.
    """
    failed = failed or {}
    for archive in archives:
        path = folder / archive.filename
        if (target / f".extracted-{archive.filename}").exists():
            continue
        if not path.is_file():
            if archive.filename not in OPTIONAL_ARCHIVES:
                raise DownloadError(
                    f"{folder} lacks {archive.filename}, which is required.\n"
                    + _manual_steps(archives=archives)
                )
            lost = OPTIONAL_ARCHIVES[archive.filename]
            if archive.filename in failed:
                warnings.warn(
                    f"{failed[archive.filename]}; continuing without {archive.filename}: {lost}. "
                    f"Put {archive.filename} in {folder} to add it on a later run",
                    stacklevel=3,
                )
            elif archive.filename == "lists.tar":
                warnings.warn(f"{folder} has no lists.tar: {lost}", stacklevel=3)
            continue
        with locked(folder / f".{archive.filename}.lock", what=f"the unpacking of {archive.filename}"):
            if (target / f".extracted-{archive.filename}").exists():
                continue  # another process unpacked it while this one waited
            problem = _verify(path, size=archive.size, sha256=archive.sha256)
            if problem:
                raise DownloadError(
                    f"{path} is not the expected archive ({problem}); delete it and download it again"
                )
            safe_extract(path, target)
    try:
        detect_layout(target)
    except DatasetLayoutError as exc:
        raise DownloadError(f"Unpacked the archives of {folder} into {target}, but: {exc}") from exc
    return target


def _unavailable(folder: Path, base_url: str, archives: tuple[Archive, ...], reason: str) -> DownloadError:
    urls = "\n".join(f"  {_archive_url(base_url, a.filename)}" for a in archives)
    return DownloadError(
        f"Stanford Dogs is not available: {reason.rstrip('.')}.\n"
        "download it or point --data at it: fetch these archives\n"
        f"{urls}\n"
        f"into {folder} (dogbench unpacks them there), or pass --data with a folder holding them or an "
        "extracted dataset, or set a mirror with --data-url.\n"
        "The official server has been reported to answer 403 at times."
    )


def prepare_stanford_dogs(
    data: str | Path | None,
    *,
    download: bool = True,
    base_url: str | None = None,
    cache_dir: Path | None = None,
    archives: tuple[Archive, ...] = STANFORD_DOGS_ARCHIVES,
    progress: bool = True,
) -> Path:
    """A folder that `open_dataset` reads: `data` as it is, its archives unpacked, or the cached download.

    `data` may be a dataset folder (any layout `open_dataset` accepts), a folder holding the archives, or
    None for the cache (`cache_dir` or `default_cache_dir()`), downloading into it when `download` is True.
    Only images.tar is required: an optional archive that fails to download is warned about and skipped.
    The downloaded tarballs (~800 MB) stay in the cache folder next to the extracted copy, so a download
    resumes and is verified; once unpacked they may be deleted by hand, and the extracted copy is still used.
    """
    if data is not None:
        return _given_folder(Path(data).expanduser(), archives)
    base = base_url or os.environ.get("DOGBENCH_DATA_URL") or STANFORD_DOGS_URL
    folder = (cache_dir or default_cache_dir()) / "stanford-dogs"
    target = folder / EXTRACTED_DIR
    if (target / f".extracted-{archives[0].filename}").exists():
        return _extract_archives(folder, archives, target)
    missing = [
        a
        for a in archives
        if not (folder / a.filename).is_file() and not (target / f".extracted-{a.filename}").exists()
    ]
    if not download:
        required = [a.filename for a in missing if a.filename not in OPTIONAL_ARCHIVES]
        if required:
            reason = f"{folder} lacks {', '.join(required)} and downloading is off"
            raise _unavailable(folder, base, archives, reason)
        missing = []
    failed = _fetch_archives(folder, base, archives, missing, progress=progress)
    return _extract_archives(folder, archives, target, failed=failed)


def _given_folder(folder: Path, archives: tuple[Archive, ...]) -> Path:
    """``--data``: a dataset folder as it is, or a folder of archives unpacked beside them."""
    if not folder.is_dir():
        raise DataNotFoundError(
            f"--data {folder} does not exist or is not a folder. Accepted: a dataset folder "
            "(Stanford Dogs Images/, Kaggle images/Images/, train/<class>/ + test/<class>/, or <class>/ "
            f"folders), a folder holding {', '.join(a.filename for a in archives)}, a labels file (.csv, .tsv, "
            ".txt), a Hugging Face datasets folder or parquet file, or hf://owner/name"
        )
    has_archives = any((folder / a.filename).is_file() for a in archives)
    try:
        _, located = detect_layout(folder)
    except DatasetLayoutError as exc:
        if not has_archives:
            raise DatasetLayoutError(
                f"{exc}\n  or a folder holding the archives {', '.join(a.filename for a in archives)}"
            ) from exc
        located = None
    # A dataset right here wins; one found only in a subfolder may be a half-unpacked earlier run.
    if located is not None and (located == folder.resolve() or not has_archives):
        return folder
    return _extract_archives(folder, archives, folder / EXTRACTED_DIR)


def _fetch_archives(folder: Path, base: str, archives: tuple[Archive, ...], missing: list[Archive], *,
                    progress: bool) -> dict[str, str]:
    """Download ``missing`` into ``folder``; an optional archive that fails is skipped: {filename: reason}."""
    failed: dict[str, str] = {}
    for archive in missing:
        try:
            fetch(_archive_url(base, archive.filename), folder / archive.filename, size=archive.size,
                  sha256=archive.sha256, progress=progress)
        except DownloadError as exc:
            reason = str(exc).split("\n", 1)[0].rstrip(".")
            if archive.filename not in OPTIONAL_ARCHIVES:
                raise _unavailable(folder, base, archives, reason) from exc
            failed[archive.filename] = reason
    return failed


def prepare_dataset(cfg: DataConfig, *, progress: bool = True) -> Dataset:
    """Find (or download) the data and open it: the first stage, torch-free, so a missing dataset fails fast.
    ``data.root`` may also be a labels file (``data.labels``), Hugging Face data (``data.hf``) or a dataset's
    name (``data.named``: torchvision is imported for those)."""
    root = cfg.root
    if root in NAMED:
        opened = open_named(root, cache_dir=default_cache_dir(), download=cfg.download)
    elif root is not None and is_label_file(root):
        opened = open_label_file(root, test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    elif root is not None and is_hf_data(root):
        opened = open_hf(root, images_dir=default_cache_dir() / "images", test_fraction=cfg.test_fraction,
                         seed=cfg.split_seed)
    else:
        root = prepare_stanford_dogs(cfg.root, download=cfg.download, base_url=cfg.data_url, progress=progress)
        opened = open_dataset(root, test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    dataset = select_classes(opened, cfg.classes)
    trained = sorted({dataset.classes[s.label] for s in dataset.samples if s.split == "train"})
    if len(trained) < 2:  # one class is no benchmark: every classifier would score 1.0
        raise DatasetLayoutError(f"{root} has training images of {len(trained)} class(es) ({', '.join(trained)}): "
                                 "a benchmark needs at least 2 classes, each a folder of images")
    tested = sorted({dataset.classes[s.label] for s in dataset.samples if s.split == "test"})
    unseen = sorted(set(tested) - set(trained))
    if unseen:  # often a misspelt folder (test/Beagle beside train/beagle): a head can never predict these
        hints = [f"{u} ~ {m[0]}" for u in unseen if (m := difflib.get_close_matches(u, trained, n=1))]
        n = sum(1 for s in dataset.samples if s.split == "test" and dataset.classes[s.label] in unseen)
        warnings.warn(f"{root}: test class(es) without training images: {', '.join(unseen[:10])}"
                      f"{' ...' if len(unseen) > 10 else ''}; no head can predict them, so their {n} test images "
                      "count as mistakes" + (f" (similar training classes: {', '.join(hints[:5])})" if hints else ""),
                      stacklevel=2)
    return dataset
