from __future__ import annotations

import hashlib
import io
import shutil
import socket
import tarfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import make_class_folder_layout, make_official_layout
from dogbench.config import DataConfig
from dogbench.data import DatasetLayoutError, download, open_dataset
from dogbench.data.download import (
    STANFORD_DOGS_URL,
    Archive,
    DownloadError,
    default_cache_dir,
    fetch,
    prepare_stanford_dogs,
    safe_extract,
)


@dataclass
class Server:
    url: str
    root: Path  # where the files behind `url` live
    served: Path  # what the server serves; `root` is a folder inside it
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    honour_range: bool = True
    # faults, one response each, in order: "drop" (half the body, then the connection closes), "500", "403",
    # "short" (Content-Length says the whole file, a third of it comes, the connection closes)
    faults: list[str] = field(default_factory=list)


Served = tuple[Server, tuple[Archive, ...]]


def _handler_for(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Serves server.root, records (path, Range header) and answers Range with 206 unless told not to."""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            wanted = self.headers.get("Range")
            server.requests.append((self.path, wanted))
            path = server.served / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            fault = server.faults.pop(0) if server.faults else None
            if fault in ("500", "403"):
                self.send_error(int(fault))
                return
            if wanted and server.honour_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                data = data[start:]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault in ("drop", "short"):
                self.wfile.write(data[: len(data) // (2 if fault == "drop" else 3)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
            return

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    served = tmp_path / "served"
    (served / "dogs").mkdir(parents=True)
    state = Server(url="", root=served / "dogs", served=served)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/dogs/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _tar(path: Path, folder: Path, names: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images.tar, annotation.tar and lists.tar of a tiny official layout, packed like Stanford's."""
    src = make_official_layout(tmp_path_factory.mktemp("src") / "dogs", image_size=(24, 20))
    out = tmp_path_factory.mktemp("archives")
    _tar(out / "images.tar", src, ["Images"])
    _tar(out / "annotation.tar", src, ["Annotation"])
    _tar(out / "lists.tar", src / "lists", ["file_list.mat", "train_list.mat", "test_list.mat"])
    return out


def _archives(folder: Path) -> tuple[Archive, ...]:
    return tuple(
        Archive(
            name, (folder / name).stat().st_size, hashlib.sha256((folder / name).read_bytes()).hexdigest()
        )
        for name in ("images.tar", "annotation.tar", "lists.tar")
    )


@pytest.fixture
def served(server: Server, archive_dir: Path) -> Served:
    for tar in archive_dir.iterdir():
        shutil.copy(tar, server.root / tar.name)
    return server, _archives(archive_dir)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/images.tar"


# ---------------------------------------------------------------- prepare_stanford_dogs


def test_prepare_downloads_unpacks_and_reuses_the_cache(served: Served, tmp_path: Path) -> None:
    server, archives = served
    cache = tmp_path / "cache"
    folder = prepare_stanford_dogs(None, base_url=server.url, cache_dir=cache, archives=archives)
    assert folder == cache / "stanford-dogs" / "extracted"
    assert sorted(p for p, _ in server.requests) == [
        "/dogs/annotation.tar",
        "/dogs/images.tar",
        "/dogs/lists.tar",
    ]
    ds = open_dataset(folder)
    assert (ds.layout, ds.split_source) == ("stanford-dogs", "official-lists")
    assert ds.classes == ("Breed0", "Breed1", "Breed2")
    assert (len(ds.split("train")), len(ds.split("test"))) == (18, 12)
    assert all(s.box is not None for s in ds.samples)
    assert not list((cache / "stanford-dogs").glob("*.part"))

    count = len(server.requests)
    again = prepare_stanford_dogs(
        None, base_url=server.url, cache_dir=cache, archives=archives, download=False
    )
    assert again == folder and len(server.requests) == count


def test_prepare_uses_the_data_url_environment_variable(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, archives = served
    monkeypatch.setenv("DOGBENCH_DATA_URL", server.url)
    folder = prepare_stanford_dogs(None, cache_dir=tmp_path / "c", archives=archives)
    assert open_dataset(folder).split_source == "official-lists"


def test_prepare_without_download_and_empty_cache_explains(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        prepare_stanford_dogs(None, download=False, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("Stanford Dogs is not available")
    assert "download it or point --data at it" in message
    for name in ("images.tar", "annotation.tar", "lists.tar"):
        assert STANFORD_DOGS_URL + name in message
    assert str(tmp_path / "cache" / "stanford-dogs") in message


def test_prepare_offline_unpacks_archives_already_in_the_cache(archive_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(archive_dir, tmp_path / "cache" / "stanford-dogs")
    folder = prepare_stanford_dogs(
        None, download=False, cache_dir=tmp_path / "cache", archives=_archives(archive_dir)
    )
    assert open_dataset(folder).split_source == "official-lists"


def test_prepare_reports_a_failed_download(server: Server, tmp_path: Path, archive_dir: Path) -> None:
    with pytest.raises(DownloadError) as info:
        prepare_stanford_dogs(
            None, base_url=server.url, cache_dir=tmp_path / "c", archives=_archives(archive_dir)
        )
    message = str(info.value)
    assert message.startswith("Stanford Dogs is not available")
    assert "HTTP 404" in message and server.url + "images.tar" in message
    assert "download it or point --data at it" in message


@pytest.mark.parametrize(
    ("missing", "lost"), [("lists.tar", "official split"), ("annotation.tar", "no bounding boxes")]
)
def test_prepare_continues_without_an_optional_archive_that_fails(
    served: Served, tmp_path: Path, missing: str, lost: str
) -> None:
    server, archives = served
    (server.root / missing).unlink()  # the server answers 404 for it
    with pytest.warns(UserWarning, match=lost) as record:
        folder = prepare_stanford_dogs(
            None, base_url=server.url, cache_dir=tmp_path / "c", archives=archives, progress=False
        )
    message = next(str(w.message) for w in record if server.url + missing in str(w.message))
    assert "HTTP 404" in message and lost in message
    assert sorted(p for p, _ in server.requests) == ["/dogs/annotation.tar", "/dogs/images.tar", "/dogs/lists.tar"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(folder)
    assert ds.split_source == ("seeded" if missing == "lists.tar" else "official-lists")
    assert all((s.box is None) == (missing == "annotation.tar") for s in ds.samples)


def test_prepare_passes_progress_to_fetch(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server, archives = served
    prepare_stanford_dogs(None, base_url=server.url, cache_dir=tmp_path / "quiet", archives=archives, progress=False)
    assert "images.tar" not in capsys.readouterr().err
    prepare_stanford_dogs(None, base_url=server.url, cache_dir=tmp_path / "loud", archives=archives)
    assert "images.tar" in capsys.readouterr().err


def test_prepare_dataset_passes_progress_on(monkeypatch: pytest.MonkeyPatch, official_root: Path) -> None:
    seen: dict[str, object] = {}

    def fake_prepare(data: object, **kwargs: object) -> Path:
        seen.update(kwargs)
        return official_root

    monkeypatch.setattr(download, "prepare_stanford_dogs", fake_prepare)
    ds = download.prepare_dataset(DataConfig(), progress=False)
    assert seen["progress"] is False and ds.split_source == "official-lists"
    download.prepare_dataset(DataConfig())
    assert seen["progress"] is True


def test_prepare_extracts_archives_found_in_the_data_folder(archive_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "downloads"
    shutil.copytree(archive_dir, data)
    folder = prepare_stanford_dogs(data, archives=_archives(archive_dir))
    assert folder == data / "extracted"
    assert open_dataset(folder).split_source == "official-lists"
    assert (folder / ".extracted-images.tar").exists()
    assert prepare_stanford_dogs(data, archives=_archives(archive_dir)) == folder


def test_prepare_with_images_only_warns_about_lists(archive_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "downloads"
    data.mkdir()
    shutil.copy(archive_dir / "images.tar", data)
    with pytest.warns(UserWarning, match="lists.tar"):
        folder = prepare_stanford_dogs(data, archives=_archives(archive_dir))
    with pytest.warns(UserWarning, match="official split"):
        ds = open_dataset(folder)
    assert ds.split_source == "seeded" and all(s.box is None for s in ds.samples)


def test_prepare_rejects_a_corrupt_archive_in_the_data_folder(archive_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "downloads"
    shutil.copytree(archive_dir, data)
    (data / "lists.tar").write_bytes(b"\0" * 10)
    with pytest.raises(DownloadError, match="lists.tar"):
        prepare_stanford_dogs(data, archives=_archives(archive_dir))


def test_prepare_passes_readable_layouts_through(tmp_path: Path) -> None:
    src = make_official_layout(tmp_path / "src")
    kaggle = tmp_path / "kaggle"
    shutil.copytree(src / "Images", kaggle / "images" / "Images")
    shutil.copytree(src / "Annotation", kaggle / "annotations" / "Annotation")
    assert prepare_stanford_dogs(kaggle, download=False) == kaggle
    assert prepare_stanford_dogs(src, download=False) == src
    pets = make_class_folder_layout(tmp_path / "pets")
    assert prepare_stanford_dogs(pets, download=False) == pets


def test_prepare_rejects_missing_or_unreadable_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_stanford_dogs(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="images.tar"):
        prepare_stanford_dogs(tmp_path / "junk")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOGBENCH_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DOGBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dogbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dogbench"


# ---------------------------------------------------------------- fetch


def test_fetch_resumes_a_partial_download(served: Served, tmp_path: Path) -> None:
    server, archives = served
    images = archives[0]
    data = (server.root / "images.tar").read_bytes()
    dest = tmp_path / "images.tar"
    half = len(data) // 2
    (tmp_path / "images.tar.part").write_bytes(data[:half])
    fetch(server.url + "images.tar", dest, size=images.size, sha256=images.sha256, progress=False)
    assert server.requests == [("/dogs/images.tar", f"bytes={half}-")]
    assert dest.read_bytes() == data
    assert not (tmp_path / "images.tar.part").exists()


def test_fetch_restarts_when_the_server_ignores_range(served: Served, tmp_path: Path) -> None:
    server, archives = served
    server.honour_range = False
    images = archives[0]
    data = (server.root / "images.tar").read_bytes()
    (tmp_path / "images.tar.part").write_bytes(data[:1000])
    dest = fetch(server.url + "images.tar", tmp_path / "images.tar", size=images.size, sha256=images.sha256)
    assert server.requests == [("/dogs/images.tar", "bytes=1000-")]
    assert dest.read_bytes() == data


def test_fetch_skips_a_complete_file(served: Served, tmp_path: Path) -> None:
    server, archives = served
    shutil.copy(server.root / "lists.tar", tmp_path / "lists.tar")
    lists = archives[2]
    assert fetch(server.url + "lists.tar", tmp_path / "lists.tar", size=lists.size, sha256=lists.sha256)
    assert server.requests == []


def test_fetch_checksum_mismatch_deletes_the_download(served: Served, tmp_path: Path) -> None:
    server, archives = served
    lists = archives[2]
    dest = tmp_path / "lists.tar"
    with pytest.raises(DownloadError) as info:
        fetch(server.url + "lists.tar", dest, size=lists.size, sha256="0" * 64, progress=False)
    assert "0" * 64 in str(info.value) and lists.sha256 in str(info.value)
    assert not dest.exists() and not (tmp_path / "lists.tar.part").exists()
    with pytest.raises(DownloadError, match=f"expected {lists.size + 1} bytes, the server's file has {lists.size}"):
        fetch(server.url + "lists.tar", dest, size=lists.size + 1, sha256=None, progress=False)
    assert not dest.exists()


@pytest.mark.parametrize("faults", [["drop"], ["short"], ["500"], ["drop", "500", "drop"], ["403"]])
def test_an_interrupted_download_resumes_where_it_stopped(served: Served, tmp_path: Path, faults: list[str]) -> None:
    """The server drops the connection mid-file, sends less than it announced, or fails (500, 403): each try
    is a DownloadError naming the URL and the reason, the bytes already received are kept in ``.part``, and
    the same call again continues from them (a Range request) to the verified file."""
    server, archives = served
    images = archives[0]
    data = (server.root / "images.tar").read_bytes()
    dest = tmp_path / "images.tar"
    server.faults = list(faults)
    tries = 0
    while server.faults:
        tries += 1
        with pytest.raises(DownloadError) as err:
            fetch(server.url + "images.tar", dest, size=images.size, sha256=images.sha256, progress=False)
        assert server.url + "images.tar" in str(err.value) and not dest.exists()
        if "HTTP" in str(err.value):
            assert any(code in str(err.value) for code in ("HTTP 500", "HTTP 403"))
    fetch(server.url + "images.tar", dest, size=images.size, sha256=images.sha256, progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "images.tar.part").exists()
    ranges = [r for _, r in server.requests]
    received = {"drop": len(data) // 2, "short": len(data) // 3}
    if faults[0] in received:  # the next request continued from what the dropped one had delivered
        assert ranges[1] == f"bytes={received[faults[0]]}-"
    assert len(server.requests) == tries + 1


def test_fetch_404_names_the_url(server: Server, tmp_path: Path) -> None:
    url = server.url + "missing.tar"
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "missing.tar", size=None, sha256=None, progress=False)
    message = str(info.value)
    assert url in message and "HTTP 404" in message
    assert "403" in message and "--data" in message and "--data-url" in message
    assert STANFORD_DOGS_URL + "images.tar" in message
    assert not (tmp_path / "missing.tar").exists()


def test_fetch_unreachable_server_fails_fast(tmp_path: Path) -> None:
    url = _closed_port_url()
    start = time.monotonic()
    with pytest.raises(DownloadError, match=url):
        fetch(url, tmp_path / "images.tar", size=10, sha256=None, timeout=5, progress=False)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- safe_extract


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, payload in members:
            info.size = len(payload) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return path


def _member(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "evil",
    [
        _member("../evil.txt"),
        _member("Images/../../evil.txt"),
        _member("/tmp/dogbench-evil-absolute.txt"),
        _member("Images/link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("Images/link", kind=tarfile.SYMTYPE, link="../../outside"),
        _member("Images/hard", kind=tarfile.LNKTYPE, link="../outside"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-absolute", "symlink-outside", "hardlink-outside"],
)
def test_safe_extract_refuses_escaping_members(tmp_path: Path, evil: tarfile.TarInfo) -> None:
    archive = _tar_with(tmp_path / "evil.tar", (_member("Images/ok.txt"), b"fine"), (evil, b"gotcha"))
    target = tmp_path / "box" / "target"
    with pytest.raises(DownloadError, match="evil.tar") as info:
        safe_extract(archive, target)
    assert repr(evil.name) in str(info.value)
    assert not (target / "Images" / "ok.txt").exists()  # checked before anything is written
    assert not (tmp_path / "box" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/dogbench-evil-absolute.txt").exists()
    assert not (target / ".extracted-evil.tar").exists()


def test_safe_extract_skips_devices_and_marks_completion(tmp_path: Path) -> None:
    archive = _tar_with(
        tmp_path / "a.tar",
        (_member("Images/ok.txt"), b"fine"),
        (_member("Images/null", kind=tarfile.CHRTYPE), b""),
        (_member("Images/alias", kind=tarfile.SYMTYPE, link="ok.txt"), b""),
    )
    target = tmp_path / "t"
    safe_extract(archive, target)
    assert (target / "Images" / "ok.txt").read_bytes() == b"fine"
    assert (target / "Images" / "alias").read_bytes() == b"fine"
    assert not (target / "Images" / "null").exists()
    assert (target / ".extracted-a.tar").exists()

    (target / "Images" / "ok.txt").unlink()
    safe_extract(archive, target)  # marked done: nothing happens
    assert not (target / "Images" / "ok.txt").exists()
    (target / ".extracted-a.tar").unlink()  # as after an interrupted run
    safe_extract(archive, target)
    assert (target / "Images" / "ok.txt").read_bytes() == b"fine"


def test_safe_extract_reports_a_broken_archive(tmp_path: Path) -> None:
    (tmp_path / "broken.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(DownloadError, match="broken.tar"):
        safe_extract(tmp_path / "broken.tar", tmp_path / "t")


def test_two_processes_preparing_one_cache_download_and_unpack_each_archive_once(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two preparations of the same cache folder at once (threads here; the locks are file locks, which exclude
    threads and processes alike): every archive is fetched once, both get the same dataset."""
    server, archives = served
    original = download._stream
    started = threading.Barrier(2, timeout=30)

    def slow_stream(*args: object, **kwargs: object) -> None:
        time.sleep(0.2)  # let the other preparation arrive while this one downloads
        original(*args, **kwargs)

    monkeypatch.setattr(download, "_stream", slow_stream)
    results: list[Path | BaseException] = []

    def prepare() -> None:
        started.wait()
        try:
            results.append(prepare_stanford_dogs(None, base_url=server.url, cache_dir=tmp_path / "cache",
                                                 archives=archives, progress=False))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert results[0] == results[1]
    assert sorted(path for path, _ in server.requests) == sorted(f"/dogs/{a.filename}" for a in archives)
    assert len(open_dataset(results[0]).samples) > 0


def test_test_classes_without_training_images_are_warned_about_with_their_likely_twin(tmp_path: Path) -> None:
    """A misspelt test folder (test/Beagle beside train/beagle) is a class no head can predict: warned about,
    with its test images counted and the similar training class named; a class only in train is fine."""
    from conftest import make_class_folder_layout

    root = make_class_folder_layout(tmp_path / "pets", classes=("beagle", "pug", "yak"), n_train=2, n_test=0)
    make_class_folder_layout(root, classes=("Beagle", "pug"), n_train=0, n_test=3)
    with pytest.warns(UserWarning, match=r"test class\(es\) without training images: Beagle; no head can predict "
                      r"them, so their 3 test images count as mistakes \(similar training classes: Beagle ~ beagle\)"):
        ds = download.prepare_dataset(DataConfig(root=str(root), download=False), progress=False)
    assert set(ds.classes) == {"Beagle", "beagle", "pug", "yak"}
    (root / "test" / "Beagle").rename(root / "test" / "beagle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # yak, only in train, is no warning
        ds = download.prepare_dataset(DataConfig(root=str(root), download=False), progress=False)
    assert ds.classes == ("beagle", "pug", "yak")
