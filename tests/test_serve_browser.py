"""`dogbench serve` on a run made from ../shared data and weights, driven in headless Chromium (Debian's
``chromium``, through Playwright; no browser download) and by 20 concurrent ``gradio_client`` users.

The page: a real full-size photo is answered by every model with its top-5 and its overlay (the screenshot is
kept in test-artifacts/, and docs/serve.png is a copy); a text file renamed .jpg and a 20,000 x 20,000 PNG each
get a sentence in the page; a third, good upload is still answered. The API: 20 requests at once give exactly
what `dogbench predict` gives for the same photos.
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
SHOT = Path(__file__).resolve().parents[1] / "test-artifacts" / "serve-stanford-dogs-dev.png"


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


def _wait_for_status(page, text: str, timeout_s: float = 120) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=timeout_s * 1000)
    return page.inner_text("#status")


def test_the_page_answers_a_real_photo_and_refuses_bad_uploads_in_words(live, real_run_dir: Path,
                                                                         tmp_path: Path, png_bomb: Path) -> None:
    from playwright.sync_api import sync_playwright

    from browser import CHROMIUM_ARGS, chromium_or_skip

    chromium = chromium_or_skip()
    import dogbench

    labels = list(dogbench.load_run(real_run_dir).models)
    assert labels == ["cnn", "vit"]
    photos = _originals()
    first, third = photos[0], photos[-1]  # two breeds of the originals' four
    text = tmp_path / "my_dog.jpg"
    text.write_text("Rex, 3 years old, loves the beach\n")
    bomb = tmp_path / "huge.png"
    bomb.symlink_to(png_bomb)
    page_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(live.local_url, wait_until="networkidle")
            header = page.inner_text("#header")
            assert "Verdict." in header and "Stanford Dogs is a subset of ImageNet" in header  # the leak caveat
            assert page.locator("#header a", has_text="full report").count() == 1
            upload = page.locator("#photo input[type=file]")

            upload.set_input_files(str(first))
            status = _wait_for_status(page, f"Answered {first.name}")
            for k, label in enumerate(labels):
                assert page.inner_text(f"#title-{k}").startswith(label)
                page.wait_for_function(f"document.querySelector('#overlay-{k} img')?.naturalWidth > 0",
                                       timeout=30_000)
                assert "ms to classify" in page.inner_text(f"#latency-{k}")
            cnn_top = page.inner_text("#top-0")
            assert _breed(first) in cnn_top, cnn_top  # the true breed in EfficientNet-Lite0's top-5
            agreement = page.inner_text("#agreement")
            assert agreement.startswith(("All 2 models agree: ", "The models disagree: ")), agreement
            for k in range(len(labels)):  # five breeds with their percentages per model
                assert page.inner_text(f"#top-{k}").count("%") == 5
            SHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOT), full_page=True)

            upload.set_input_files(str(text))
            status = _wait_for_status(page, "Could not answer")
            assert "'my_dog.jpg' is a text file, not an image, despite its .jpg name" in status
            upload.set_input_files(str(bomb))
            status = _wait_for_status(page, "'huge.png'")
            assert "has 400,000,000 pixels, over this demo's limit of 50 megapixels" in status, status
            assert page.locator("#overlay-0 img").count() == 0  # the last answer's overlays are gone

            page.locator("button", has_text="(cnn ").first.click()  # an example: a test photo of the run
            _wait_for_status(page, "Answered ")

            upload.set_input_files(str(third))
            _wait_for_status(page, f"Answered {third.name}")
            assert _breed(third) in page.inner_text("#top-0")  # EfficientNet-Lite0's top-5 again
            assert "Traceback" not in page.inner_text("body")
        finally:
            browser.close()
    assert page_errors == []


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
