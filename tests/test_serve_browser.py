"""`dogbench serve` on a run made from ../shared data and weights, driven in headless Chromium (Debian's
``chromium``, through Playwright; no browser download) and by 20 concurrent ``gradio_client`` users.

The page, as a newcomer meets it on a 1280 x 900 screen: after a real full-size photo is uploaded, every model's
answer (its name, top-5 and overlay) is beside the photo, inside the viewport (the screenshot is kept in
test-artifacts/; docs/img/demo-after-upload.png is one of the shared-dev run); a real PDF, a text file renamed
.jpg and a 20,000 x 20,000 PNG each get dogbench's sentence in the page (no Gradio pop-up, no broken picture); an
example thumbnail says its true breed and whether each model got it; a good upload after all that is still
answered. The API: 20 requests at once give exactly what `dogbench predict` gives for the same photos.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import HAVE_SHARED_RUN, ORIGINALS, free_port, gradio_or_skip
from dogbench.cli import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not HAVE_SHARED_RUN, reason="../shared is absent"),
]
SHOT = Path(__file__).resolve().parents[1] / "test-artifacts" / "demo-after-upload.png"
SCREEN = {"width": 1280, "height": 900}
BROKEN_IMAGES = "Array.from(document.images).filter(i => i.complete && !(i.naturalWidth > 0)).map(i => i.src)"


def _originals() -> list[Path]:
    return sorted((ORIGINALS / "Images").rglob("*.jpg"))


def _breed(photo: Path) -> str:
    return photo.parent.name.split("-", 1)[1].replace("_", " ")


@pytest.fixture(scope="module")
def live(real_run_dir: Path):
    gradio_or_skip()
    from dogbench.serve import ServeConfig, serve

    app = serve(real_run_dir, ServeConfig(port=free_port()), block=False)
    yield app
    app.close()


@pytest.fixture
def page(live):
    """A fresh 1280 x 900 page of the demo; at the end, no page error may have happened."""
    from playwright.sync_api import sync_playwright

    from browser import CHROMIUM_ARGS, chromium_or_skip

    chromium = chromium_or_skip()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=SCREEN)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live.local_url, wait_until="networkidle")
            yield page
        finally:
            browser.close()
    assert errors == []


def _wait_for_status(page, text: str, timeout_s: float = 120) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=timeout_s * 1000)
    return page.inner_text("#status")


def _in_view(page, selector: str) -> None:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not shown"
    assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= SCREEN["width"] \
        and box["y"] + box["height"] <= SCREEN["height"], (selector, box)


def test_the_answer_is_beside_the_photo_on_a_1280x900_screen(page, real_run_dir: Path) -> None:
    import dogbench
    from dogbench.names import model_name

    labels = list(dogbench.load_run(real_run_dir).models)
    assert labels == ["cnn", "vit"]
    results = json.loads((real_run_dir / "results.json").read_text())["models"]
    names = {label: model_name(results[label]).short for label in labels}
    header = page.inner_text("#header")
    assert "Verdict." in header
    assert all(f"{label} is {names[label]}" in header for label in labels), header  # the models named first
    about = page.inner_text("#about")
    assert "Stanford Dogs is a subset of ImageNet" in about  # the leak caveat
    assert page.locator("#about a", has_text="full report").count() == 1

    first = _originals()[0]
    page.locator("#upload input[type=file]").set_input_files(str(first))
    _wait_for_status(page, f"Answered {first.name}")
    for k, label in enumerate(labels):
        assert page.inner_text(f"#title-{k}").startswith(f"{label} — {names[label]}")
        page.wait_for_function(f"document.querySelector('#overlay-{k} img')?.naturalWidth > 0", timeout=30_000)
        assert "ms to classify" in page.inner_text(f"#details-{k}")
        assert page.inner_text(f"#top-{k}").count("%") == 5  # five breeds with their percentages per model
    page.wait_for_function("document.querySelector('#photo img')?.naturalWidth > 0", timeout=30_000)
    for selector in ("#photo img", "#agreement", "#top-0", "#top-1"):  # the answers beside the photo, in view
        _in_view(page, selector)
    assert _breed(first) in page.inner_text("#top-0")  # the true breed in EfficientNet-Lite0's top-5
    agreement = page.inner_text("#agreement")
    assert agreement.startswith(("Both models agree: ", "The models disagree: ")), agreement
    assert page.evaluate(BROKEN_IMAGES) == []
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOT))  # the first screen, as the user sees it


def test_refused_files_get_dogbenchs_sentence_and_examples_their_true_breed(page, tmp_path: Path,
                                                                            png_bomb: Path) -> None:
    from PIL import Image

    pdf = tmp_path / "letter.pdf"
    Image.new("RGB", (300, 200), "white").save(pdf)  # a real PDF, as Pillow writes one
    text = tmp_path / "my_dog.jpg"
    text.write_text("Rex, 3 years old, loves the beach\n")
    bomb = tmp_path / "huge.png"
    bomb.symlink_to(png_bomb)
    upload = page.locator("#upload input[type=file]")
    good = _originals()[-1]
    upload.set_input_files(str(good))  # a photo first: a refusal must take its picture and answers away
    _wait_for_status(page, f"Answered {good.name}")
    for path, words in ((pdf, "'letter.pdf' is a PDF document, not an image"),
                        (text, "'my_dog.jpg' is a text file, not an image, despite its .jpg name"),
                        (bomb, "'huge.png' has 400,000,000 pixels, over this demo's limit of 50 megapixels")):
        upload.set_input_files(str(path))
        status = _wait_for_status(page, f"'{path.name}'")
        assert status.startswith("Could not answer.") and words in status, status
        assert page.locator(".toast-body").count() == 0 and "Invalid file type" not in page.inner_text("body")
        assert page.locator("#photo img").count() == 0 and not page.locator("#top-0").is_visible()
        assert page.evaluate(BROKEN_IMAGES) == []

    thumbnails = page.locator("#examples button")
    assert thumbnails.count() >= 4
    truth = thumbnails.nth(1).inner_text().strip()  # its caption: the true breed
    thumbnails.nth(1).click()
    _wait_for_status(page, "a test photo of this run")
    verdict = page.inner_text("#agreement")
    assert f"The true breed is {truth}: " in verdict, verdict
    for k in range(2):
        title = page.inner_text(f"#title-{k}")
        assert ("✓ right" in title) != ("✗ wrong" in title), title
    _in_view(page, "#top-0")

    upload.set_input_files(str(good))
    _wait_for_status(page, f"Answered {good.name}.")
    assert _breed(good) in page.inner_text("#top-0")  # EfficientNet-Lite0's top-5 again
    assert "Traceback" not in page.inner_text("body") and page.evaluate(BROKEN_IMAGES) == []


def test_twenty_concurrent_api_users_get_what_predict_gives(live, real_run_dir: Path, capsys) -> None:
    from gradio_client import Client, handle_file

    photos = _originals()[::4][:20]  # 20 photos across the four breeds
    assert len(photos) == 20
    assert main(["predict", str(real_run_dir), *map(str, photos), "--format", "json", "--quiet"]) == 0
    printed = {Path(p["image"]).name: p["models"] for p in json.loads(capsys.readouterr().out)["predictions"]}

    clients = [Client(live.local_url, verbose=False) for _ in photos]  # 20 users, connected before they ask
    together = threading.Barrier(len(photos))

    def ask(i: int) -> tuple[dict, float, float]:
        together.wait()
        start = time.perf_counter()
        doc = clients[i].predict(handle_file(str(photos[i])), 5, api_name="/classify")
        return doc, start, time.perf_counter()

    with ThreadPoolExecutor(max_workers=len(photos)) as pool:
        answers = list(pool.map(ask, range(len(photos))))
    first_answer = min(end for _, _, end in answers)
    assert all(start < first_answer for _, start, _ in answers)  # all 20 were in flight at once
    for photo, (doc, _, _) in zip(photos, answers, strict=True):
        assert doc["error"] is None and doc["image"] == photo.name
        for label, top in printed[photo.name].items():
            got = doc["models"][label]["top"]
            assert [t["breed"] for t in got] == [t["breed"] for t in top], (photo.name, label)
            assert [t["p"] for t in got] == pytest.approx([t["p"] for t in top], abs=1e-6)
