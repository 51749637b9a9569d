"""Open a local HTML file in headless Chromium (Debian's ``chromium``, driven by Playwright) and report what a
reader would see: broken images, console errors, the page text, and a full-page screenshot.

Used by the report tests. Without Chromium or Playwright the caller skips, except under CI (``CI`` set), where
that is a failure: ``scripts/test.sh`` installs both.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest


def script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts are no package): check_site owns the headless-Chromium flags and
    lookup that the site check and these tests share."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SITE = script("check_site")
CHROMIUM_ARGS, find_chromium = _SITE.CHROMIUM_ARGS, _SITE.find_chromium


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
    chromium = find_chromium()
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


@dataclass(frozen=True)
class LayoutCheck:
    page_errors: list[str]
    covered: list[str]  # anchors whose target starts under the sticky navigation after its link is followed
    too_wide: list[str]  # figures (alt texts) wider than the viewport, or "page" when the page scrolls sideways


COVERED_JS = """id => { const nav = document.querySelector('nav').getBoundingClientRect();
  return document.getElementById(id).getBoundingClientRect().top < nav.bottom - 1; }"""
TOO_WIDE_JS = """() => { const w = window.innerWidth;
  const wide = Array.from(document.querySelectorAll('figure > img'))
    .filter(i => i.getBoundingClientRect().right > w || i.getBoundingClientRect().width > w).map(i => i.alt);
  return document.documentElement.scrollWidth > w ? wide.concat(['page']) : wide; }"""


def check_layout(html: Path, *, width: int = 1280, height: int = 900) -> LayoutCheck:
    """Follow every link of the page's navigation and say which targets the sticky bar covers; list figures
    wider than the viewport; collect page errors."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    errors: list[str] = []
    covered = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(html.resolve().as_uri(), wait_until="load")
            too_wide = page.evaluate(TOO_WIDE_JS)
            for link in page.query_selector_all("nav a"):
                target = (link.get_attribute("href") or "#").removeprefix("#")
                link.click()
                if page.evaluate(COVERED_JS, target):
                    covered.append(target)
        finally:
            browser.close()
    return LayoutCheck(errors, covered, too_wide)
