"""`dogbench serve`: uploads screened from their header (bad files get a sentence, not a traceback, and leave no
picture), every model of a tiny fine-tuned run answers through the one inference path (the same numbers as
`predict`), the answer says whether the models agree and, for the run's own test photos, the true breed and who
got it; the Gradio API classifies a file, no request leaves a warning, big uploads are refused at the door, and
the server listens on loopback only unless told.

The browser test of the real page on real photos is in test_serve_browser.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, gradio_or_skip
from dogbench.cli import main
from dogbench.data.uploads import UploadError, UploadLimits, screen_upload

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]
LIMITS = UploadLimits()


# ---------------------------------------------------------------- screening uploads from their header


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_good_photos_pass_without_notes(tmp_path: Path) -> None:
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")):
        path = _save(Image.new("RGB", (64, 48), (200, 120, 40)), tmp_path / f"dog.{ext}", format=fmt)
        got = screen_upload(path, LIMITS)
        assert (got.format, got.size, got.frames, got.notes) == (fmt, (64, 48), 1, ()), fmt


@pytest.mark.parametrize(("content", "what"), [
    (b"hello, I am a shopping list\n", "is a text file, not an image, despite its .jpg name"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "is a PDF document, not an image, despite its .jpg name"),
    (b"PK\x03\x04\x14\x00\x00\x00", "is a ZIP archive"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "is an SVG or XML file"),
    (b"<!DOCTYPE html><html></html>", "is an HTML page"),
    (bytes(range(256)) * 4, "is not an image dogbench can read, despite its .jpg name"),
])
def test_what_is_not_an_image_is_named_as_what_it_is(tmp_path: Path, content: bytes, what: str) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(UploadError) as err:
        screen_upload(path, LIMITS)
    assert f"'photo.jpg' {what}" in str(err.value)
    assert "upload a JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC photo" in str(err.value)


def test_empty_and_oversized_files_are_refused_naming_the_limit(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UploadError, match=r"'empty.png' is empty \(0 bytes\)"):
        screen_upload(empty, LIMITS)
    big = _save(Image.new("RGB", (300, 300)), tmp_path / "big.bmp", format="BMP")  # 270 kB
    with pytest.raises(UploadError, match=r"'big.bmp' is 0.3 MB, over this demo's limit of 0.1 MB "
                                          r"\(dogbench serve --max-upload-mb\)"):
        screen_upload(big, UploadLimits(max_bytes=100 * 1024))


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path, png_bomb: Path) -> None:
    # 400 Mpx: over PIL's own cap (2 x 89.5 Mpx) as well as ours
    with pytest.raises(UploadError) as err:
        screen_upload(png_bomb, LIMITS, name="huge.png")
    assert "'huge.png' has 400,000,000 pixels, over this demo's limit of 50 megapixels (refused before decoding" \
        in str(err.value)
    # 60 Mpx: under PIL's cap, over ours
    from conftest import write_png_bomb

    wide = write_png_bomb(tmp_path / "wide.png", 10_000, 6_000)
    with pytest.raises(UploadError, match=r"10,000 x 6,000 = 60,000,000 pixels, over this demo's limit of 50 "):
        screen_upload(wide, LIMITS)
    assert screen_upload(wide, UploadLimits(max_pixels=61_000_000)).size == (10_000, 6_000)


def test_what_can_be_classified_but_deserves_a_word_gets_a_note(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "wag.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    tiff = tmp_path / "scan.tiff"
    frames[0].save(tiff, save_all=True, append_images=frames[1:])
    deep = _save(Image.fromarray(np.full((20, 30), 40000, np.uint16)), tmp_path / "deep.png")
    cmyk = _save(Image.new("CMYK", (30, 20), (0, 128, 255, 0)), tmp_path / "print.jpg", format="JPEG")
    alpha = _save(Image.new("RGBA", (30, 20), (255, 0, 0, 128)), tmp_path / "cut-out.png")
    notes = {p.name: screen_upload(p, LIMITS).notes for p in (gif, tiff, deep, cmyk, alpha)}
    assert notes["wag.gif"] == ("'wag.gif' is animated (3 frames): the first frame was classified.",)
    assert notes["scan.tiff"] == ("'scan.tiff' is multi-page (3 frames): the first frame was classified.",)
    assert notes["deep.png"] == ("'deep.png' has 16 bits per channel: it was scaled to 8 bits, as the models saw "
                                 "in training.",)
    assert notes["print.jpg"][0].startswith("'print.jpg' is CMYK (a print colour space)")
    assert notes["cut-out.png"] == ("'cut-out.png' has transparency: it was composited on white.",)


def test_a_truncated_header_is_called_corrupt(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (64, 48)), tmp_path / "good.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(UploadError, match=r"'cut.png' (is corrupt or truncated|is not an image dogbench can read)"):
        screen_upload(cut, LIMITS)


# ---------------------------------------------------------------- the demo on a tiny fine-tuned run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run with frozen and LoRA-fine-tuned rows of a small random CNN and ViT on three synthetic classes."""
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("serve")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    assert main(["finetune", "--data", str(data), "--out", str(base / "run"), *TINY, "--cache-dir",
                 str(base / "cache"), "--methods", "lora", "--trials", "2", "--set", "tune.max_epochs=10",
                 "--set", "evaluate.n_bootstrap=100", "--quiet", "--epochs", "1", "--set", "finetune.batch_size=4",
                 "--set", "report.explain=1", "--set", "report.examples=2"]) == 0
    return base / "run", data


@pytest.fixture(scope="module")
def demo(tiny_run: tuple[Path, Path]):
    from dogbench.serve import Demo, ServeConfig

    return Demo.from_run_dir(tiny_run[0], ServeConfig(top_k=3, examples=4))


def _photos(data: Path) -> list[Path]:
    return sorted(p for p in (data / "test").rglob("*") if p.suffix in (".jpg", ".png"))


def test_every_model_answers_with_predicts_numbers_and_shows_where_it_looked(demo, tiny_run) -> None:
    import dogbench

    photos = _photos(tiny_run[1])[:3]
    expected = dogbench.load_run(tiny_run[0]).predict(photos, top_k=3)
    assert list(demo.run.models) == ["cnn", "vit", "cnn/lora", "vit/lora"]
    for photo, want in zip(photos, expected, strict=True):
        answer = demo.answer(photo)
        assert answer.error is None and answer.name == photo.name
        assert [m.label for m in answer.models] == list(demo.run.models)
        for m in answer.models:
            assert [b for b, _ in m.top] == [b for b, _ in want.top[m.label]], (photo.name, m.label)
            np.testing.assert_allclose([p for _, p in m.top], [p for _, p in want.top[m.label]], atol=1e-6)
            assert m.method == ("attention rollout" if m.label.startswith("vit") else "grad-cam")
            assert m.overlay is not None and m.overlay.size[0] > 0 and m.latency_ms > 0 and m.explain_ms > 0
        tops = {m.top[0][0] for m in answer.models}
        assert answer.agreement.startswith("All 4 models agree" if len(tops) == 1 else "The models disagree: ")


def test_the_page_words_come_from_the_run(demo) -> None:
    from dogbench.names import model_name
    from dogbench.report import load_runs

    assert demo.verdicts and all(isinstance(v, str) and v for v in demo.verdicts)
    assert any("randomly initialised" in c for c in demo.caveats)
    assert demo.report is not None and demo.report.name == "report.html"
    assert 1 <= len(demo.examples) <= 4 and all(e.path.is_file() for e in demo.examples)
    assert all(e.truth == e.path.parent.name for e in demo.examples)  # test/<class>/<photo>: the true breed
    results = load_runs([demo.run.path])[0].results["models"]
    assert {label: demo.name_of(label) for label in demo.run.models} == {
        label: model_name(results[label]) for label in demo.run.models}


def _answer(*says: tuple[str, str], truth: str | None = None):
    """An answer where each (label, breed) model says breed first."""
    from dogbench.serve import Answer, ModelAnswer

    return Answer("dog.jpg", tuple(ModelAnswer(label, "tag", ((breed, 0.6), ("other", 0.4)), 1.0)
                                   for label, breed in says), truth=truth)


def test_agreement_and_the_true_breed_in_words() -> None:
    assert _answer(("cnn", "pug"), ("vit", "pug")).agreement == "Both models agree: pug."
    assert _answer(("a", "pug"), ("b", "pug"), ("c", "pug")).agreement == "All 3 models agree: pug."
    assert _answer(("cnn", "pug")).agreement == "One model: pug."
    assert _answer(("cnn", "pug"), ("vit", "chow")).agreement == "The models disagree: cnn says pug; vit says chow."
    assert _answer(("a", "pug"), ("b", "chow"), ("c", "pug")).agreement == \
        "The models disagree: a and c say pug; b says chow."
    assert _answer(("cnn", "pug"), ("vit", "chow")).verdict == ""  # an upload: nobody knows the true breed
    both_wrong = _answer(("cnn", "Italian greyhound"), ("vit", "Italian greyhound"), truth="whippet")
    assert both_wrong.agreement == "Both models agree: Italian greyhound."
    assert both_wrong.verdict == "The true breed is whippet: both models got it wrong."
    assert _answer(("cnn", "pug"), ("vit", "pug"), truth="pug").verdict == \
        "The true breed is pug: both models got it right."
    assert _answer(("cnn", "pug"), ("vit", "chow"), ("lora", "chow"), truth="chow").verdict == \
        "The true breed is chow: vit and lora got it right, cnn got it wrong."


def test_an_example_says_its_true_breed_and_who_got_it(demo, tmp_path: Path) -> None:
    import shutil

    from dogbench.report import load_runs
    from dogbench.serve import page_values
    from dogbench.serve.page import PER_MODEL

    stored = load_runs([demo.run.path])[0].models
    labels = list(demo.run.models)
    for example in demo.examples:
        answer = demo.answer(example.path)
        assert answer.error is None and answer.truth == example.truth
        values = page_values(answer, demo)
        shown_name = example.path.name.replace("_", "\\_")  # Markdown-escaped
        assert values[1] == f"Answered **{shown_name}**, a test photo of this run."
        assert values[2] == f"**{answer.agreement}** {answer.verdict}"
        assert f"The true breed is {example.truth}: " in answer.verdict
        titles = values[3:3 + PER_MODEL * len(labels):PER_MODEL]
        for label, model, title in zip(labels, answer.models, titles, strict=True):
            right = model.breed == example.truth
            assert title.startswith(f"**{label}** — {demo.name_of(label).short}<br>")
            assert ("✓ **right**" in title, "✗ **wrong**" in title) == (right, not right), title
            run = stored[label]  # the run's own test prediction for this photo agrees with the live answer
            row = [str(p) for p in run.paths].index(str(example.path))
            assert bool(run.correct[row]) == right, (label, example.path.name)
    copy = Path(shutil.copy(demo.examples[0].path, tmp_path / "my dog.png"))
    assert demo.answer(copy).truth is None  # an upload is never claimed to be an example


def test_refused_uploads_get_dogbenchs_sentence_and_leave_no_picture(demo, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from dogbench.serve import page_values

    monkeypatch.setattr(demo, "upload_root", tmp_path)
    pdf = tmp_path / "letter.pdf"
    Image.new("RGB", (60, 40), "white").save(pdf)  # a real PDF, as Pillow writes one
    assert pdf.read_bytes().startswith(b"%PDF")
    text = tmp_path / "notes.txt"
    text.write_text("Rex, 3 years old, loves the beach\n")
    empty = tmp_path / "dog.jpg"
    empty.write_bytes(b"")
    n = len(demo.run.models)
    for path, words in ((pdf, "'letter.pdf' is a PDF document, not an image"),
                        (text, "'notes.txt' is a text file, not an image"), (empty, "'dog.jpg' is empty (0 bytes)")):
        answer = demo.answer_payload({"path": str(path), "orig_name": path.name, "url": None})
        assert answer.models == () and answer.photo is None and words in answer.error, answer.error
        values = page_values(answer, demo)
        assert values[0] is None  # the photo box is emptied: no broken picture of a PDF
        assert values[1].startswith("**Could not answer.** ") and words in values[1].replace("\\", "")
        assert not any(isinstance(v, Image.Image) for v in values)
        assert [v["visible"] for v in values[-n:]] == [False] * n  # the models' panels are hidden
    photo = demo.answer_payload({"path": str(demo.examples[0].path)})
    values = page_values(photo, demo)
    assert isinstance(values[0], Image.Image) and values[0].mode == "RGB"  # an answer shows the photo it read
    assert [v["visible"] for v in values[-n:]] == [True] * n


def test_bad_uploads_are_answers_with_a_sentence(demo, tmp_path: Path, png_bomb: Path) -> None:
    text = tmp_path / "bad.jpg"
    text.write_text("not a dog\n")
    assert "is a text file, not an image" in demo.answer(text).error
    assert "400,000,000 pixels" in demo.answer(png_bomb, name="bomb.png").error
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        good = _save(noise, tmp_path / f"whole.{ext}", format=fmt)
        cut = tmp_path / f"truncated.{ext}"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the header is whole, the pixels are not
        answer = demo.answer(cut)
        assert answer.models == () and str(tmp_path) not in answer.error  # the server's paths stay on the server
        if fmt == "PNG":  # PIL reads a PNG's header without touching the pixel data: decoding finds the cut
            assert answer.error.startswith("'truncated.png' could not be decoded ("), answer.error
        else:  # screening walks a JPEG's markers (to count frames): it may find the cut first
            assert answer.error.startswith(("'truncated.jpg' could not be decoded (",
                                            "'truncated.jpg' is corrupt or truncated (")), answer.error
    gif = tmp_path / "wag.gif"
    frames = [Image.new("RGB", (40, 40), c) for c in ((40, 200, 60), (220, 40, 40))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    answer = demo.answer(gif)
    assert answer.error is None and len(answer.models) == 4 and "animated (2 frames)" in answer.notes[0]


def test_only_uploaded_files_and_examples_are_read(demo, tiny_run, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setattr(demo, "upload_root", uploads)
    photo = _photos(tiny_run[1])[0]
    uploaded = Path(shutil.copy(photo, uploads / "upload.jpg"))
    by_path = demo.answer(photo, explain=False)
    record = demo.answer_payload({"path": str(uploaded), "orig_name": "my dog.jpg", "url": None}, explain=False)
    assert record.name == "my dog.jpg" and [m.top for m in record.models] == [m.top for m in by_path.models]
    example = demo.answer_payload({"path": str(demo.examples[0].path)}, explain=False)
    assert example.error is None and len(example.models) == 4
    # a hand-made API call naming any other file of the server gets a sentence, never the file or its kind
    for forged in (str(photo), {"path": str(photo)}, {"path": "/etc/hostname", "orig_name": "x.jpg"},
                   {"path": str(uploads / ".." / "outside.jpg")}):
        answer = demo.answer_payload(forged)
        assert answer.models == () and "is not a file uploaded to this demo" in answer.error, forged
    assert demo.answer_payload(None) is None
    assert "Nothing was uploaded" in demo.answer_payload({"path": None, "url": None}).error


def test_page_values_never_carry_a_traceback(demo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dogbench import serve

    def boom(*a, **k):
        raise RuntimeError("secret internal detail /srv/models")

    monkeypatch.setattr(demo, "answer", boom)
    answer = serve.page._safe(lambda: demo.answer("x"), {"orig_name": "dog.jpg"})
    assert answer.error.startswith("Something went wrong on the server while answering 'dog.jpg' (RuntimeError)")
    assert "secret" not in answer.error and "Traceback" not in answer.error
    values = serve.page_values(answer, demo)
    assert values[0] is None and values[1].startswith("**Could not answer.**")
    assert values[3:3 + 4 * 4] == [v for label in demo.run.models
                                   for v in (f"**{label}** — {demo.name_of(label).short}", None, None, "")]


def test_options_are_checked_and_the_cli_says_what_is_wrong(tmp_path: Path, capsys) -> None:
    from dogbench.serve import ServeConfig, ServeError

    with pytest.raises(ServeError, match="max_upload_mb must be positive, got 0; port must be 0..65535"):
        ServeConfig(max_upload_mb=0, port=70000)
    with pytest.raises(ServeError, match=r"max_megapixels must be at most 178 \(Pillow refuses"):
        ServeConfig(max_megapixels=500)
    from dogbench.cli import build_parser

    args = build_parser().parse_args(["serve", "run"])  # no --host: the config's default, loopback
    assert (args.host, args.port, args.max_upload_mb) == (ServeConfig.host, ServeConfig.port, 20.0)
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert main(["serve", str(tmp_path), "--max-megapixels", "-1"]) == 2
    assert "max_megapixels must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- the running server


@pytest.fixture(scope="module")
def server(tiny_run):
    gradio_or_skip()
    from dogbench.serve import ServeConfig, serve

    app = serve(tiny_run[0], ServeConfig(port=free_port(), max_upload_mb=1.0, top_k=3), block=False)
    yield app
    app.close()


def test_gradio_client_classifies_a_file(server, demo, tiny_run, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    client = Client(server.local_url, verbose=False)
    photo = _photos(tiny_run[1])[1]
    doc = client.predict(handle_file(str(photo)), 2, api_name="/classify")
    want = demo.answer(photo, explain=False)
    assert doc["image"] == photo.name and doc["error"] is None and list(doc["models"]) == list(demo.run.models)
    for m in want.models:
        got = doc["models"][m.label]
        assert [t["breed"] for t in got["top"]] == [b for b, _ in m.top[:2]] and got["model"] == m.timm_tag
        np.testing.assert_allclose([t["p"] for t in got["top"]], [p for _, p in m.top[:2]], atol=1e-6)
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello\n")
    doc = client.predict(handle_file(str(bad)), 5, api_name="/classify")
    assert doc["models"] == {} and "is a text file, not an image" in doc["error"]
    page = client.predict(handle_file(str(bad)), api_name="/explain")  # what the page shows: upload, photo, status
    assert page[1] is None and page[2].startswith("**Could not answer.** 'bad.jpg' is a text file")
    assert server.share_url is None  # never a public link


def test_no_request_leaves_a_warning(server, tiny_run) -> None:
    """Gradio's traffic summary (pandas) warned four lines per request under pandas 3; nothing may warn per request."""
    from gradio_client import Client, handle_file

    client = Client(server.local_url, verbose=False)
    photo = handle_file(str(_photos(tiny_run[1])[0]))
    client.predict(photo, 3, api_name="/classify")  # a first request may import (and warn) once
    with warnings.catch_warnings(record=True) as caught:  # the server's threads warn into the same record
        warnings.simplefilter("always")
        for _ in range(2):
            assert client.predict(photo, 3, api_name="/classify")["error"] is None
            assert client.predict(photo, api_name="/explain")[2].startswith("Answered ")
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if w.category is not ResourceWarning] == []  # (unclosed event loops: the client's, not a request's)


def test_a_forged_api_call_cannot_read_the_servers_files(server) -> None:
    import urllib.request

    secret = Path("/etc/hostname")
    for endpoint in ("classify", "explain"):
        data = [{"path": str(secret), "orig_name": "dog.jpg"}] + ([5] if endpoint == "classify" else [])
        post = urllib.request.Request(f"{server.local_url}gradio_api/call/{endpoint}", method="POST",
                                      data=json.dumps({"data": data}).encode(),
                                      headers={"Content-Type": "application/json"})
        event = json.loads(urllib.request.urlopen(post, timeout=30).read())["event_id"]
        stream = urllib.request.urlopen(f"{server.local_url}gradio_api/call/{endpoint}/{event}", timeout=60)
        text = stream.read().decode()
        assert "is not a file uploaded to this demo" in text or "event: error" in text, text[:500]
        assert "text file" not in text and secret.read_text().strip() not in text


def test_uploads_over_the_byte_limit_are_refused_at_the_door(server, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1536 * 1024))  # 1.5 MB against a 1 MB limit
    boundary = "dogbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.local_url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413


# ---------------------------------------------------------------- binding


def _non_loopback_ipv4() -> list[str]:
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not address.startswith("127."):
            found.append(address)
    return found


def _listeners(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_it_listens_on_loopback_only_unless_told(tiny_run) -> None:
    gradio_or_skip()
    from dogbench.serve import ServeConfig, serve

    others = _non_loopback_ipv4()
    assert others, "this machine has no non-loopback IPv4 address to test against"
    port = free_port()
    app = serve(tiny_run[0], ServeConfig(port=port), block=False)  # the default host
    try:
        assert _listeners(port) == {"0100007F"}  # 127.0.0.1, nothing on 0.0.0.0 nor IPv6
        assert _reachable("127.0.0.1", port)
        assert [a for a in others if _reachable(a, port)] == []
    finally:
        app.close()
    port = free_port()
    app = serve(tiny_run[0], ServeConfig(host="0.0.0.0", port=port), block=False)  # the positive control
    try:
        assert _listeners(port) == {"00000000"}
        assert all(_reachable(a, port) for a in others)
    finally:
        app.close()


def test_the_classify_answer_is_plain_json(demo, tiny_run) -> None:
    doc = demo.answer(_photos(tiny_run[1])[0], explain=False).to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) == {"image", "error", "notes", "agreement", "models"}

