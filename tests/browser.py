"""Open a local HTML file in headless Chromium (Debian's ``chromium``, driven by Playwright) and report what a
reader would see: broken images, console errors, the page text, and a full-page screenshot.

Used by the report tests. Without Chromium or Playwright the caller skips, except under CI (``CI`` set), where
that is a failure: ``scripts/test.sh`` installs both.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_ARGS = [  # this machine has no network: stop Chromium's background connections and its sandbox (root)
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


@dataclass(frozen=True)
class PageCheck:
    images: int
    broken_images: list[str]  # alt texts of <img> elements that did not decode
    console_errors: list[str]
    page_errors: list[str]
    failed_requests: list[str]
    text: str
    screenshot: Path


def chromium_or_skip() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        chromium = None
    if chromium is None:
        why = "headless Chromium (Debian package chromium) and the playwright package are needed"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; scripts/test.sh installs them")
        pytest.skip(why)
    return chromium


def check_page(html: Path, screenshot: Path, *, width: int = 1280) -> PageCheck:
    """Load ``html`` offline, wait for every image, take a full-page screenshot, report problems."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    console: list[str] = []
    page_errors: list[str] = []
    failed: list[str] = []
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url[:120]))
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=60_000)
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.naturalWidth > 0 && i.naturalHeight > 0))"
                ".map(i => i.alt || i.src.slice(0, 60))"
            )
            n_images = page.evaluate("document.images.length")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return PageCheck(n_images, broken, console, page_errors, failed, text, screenshot)
