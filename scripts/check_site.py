"""Build the documentation site strictly, open it in headless Chromium and check what a reader meets (CI runs it).

    .venv/bin/python scripts/check_site.py                          # build, open, search; exit 1 on a problem
    .venv/bin/python scripts/check_site.py --screenshots docs/img   # and save the screenshots docs/guide/docs.md shows

Checks: ``mkdocs build --strict`` passes (no broken link, anchor, reference or page left out of the nav); the
home page, a tutorial and the config reference load from a local server with no console error and no failed
request; the search box, given "temperature", lists results and one of them is a page about calibration or the
config reference. ``--screenshots`` also saves the search results (four screenshots).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this machine has no network: stop Chromium's background connections, and its sandbox (root); tests/browser.py
# takes these flags and find_chromium from here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
SHOTS = {"site-home.png": "", "site-tutorial.png": "tutorials/own-photos/", "site-config.png": "reference/config/"}
QUERY = "temperature"


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or ``chromium-browser``) on PATH."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def build(site: Path) -> None:
    """``mkdocs build --strict`` into ``site``; SystemExit with its output when it fails."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          text=True, capture_output=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static server for ``site`` on 127.0.0.1 (the search index is fetched, so file:// will not do)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def search(page, query: str) -> list[str]:  # noqa: ANN001 (a Playwright page)
    """Type ``query`` into Material's search box, as a reader does, and return the results' links."""
    page.click("input.md-search__input")
    page.keyboard.type(query, delay=30)
    page.wait_for_selector(".md-search-result__item", timeout=15000)
    return [a.get_attribute("href") or "" for a in page.query_selector_all(".md-search-result__item a")]


def check(base: str, screenshots: Path | None) -> list[str]:
    """Open the pages, take the screenshots, run the search; the problems found."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        for name, path in SHOTS.items():
            page.goto(base + path, wait_until="networkidle")
            if not page.title():
                problems.append(f"{path or 'home'}: no title")
            if screenshots is not None:
                page.screenshot(path=str(screenshots / name))
        page.goto(base, wait_until="networkidle")
        links = search(page, QUERY)
        print(f"search {QUERY!r}: {len(links)} results, first: {links[:4]}")
        if not any("statistics" in h or "calibration" in h or "reference/config" in h for h in links):
            problems.append(f"search {QUERY!r} found no calibration or config page: {links[:10]}")
        if screenshots is not None:
            page.screenshot(path=str(screenshots / "site-search.png"))
        browser.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--screenshots", type=Path, help="save the screenshots into this folder")
    parser.add_argument("--site", type=Path, help="a site `mkdocs build --strict` already built (default: build one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dogbench-site-") as tmp:
        site = args.site or Path(tmp) / "site"
        if args.site is None:
            build(site)
        server, base = serve(site)
        try:
            problems = check(base, args.screenshots)
        finally:
            server.shutdown()
    for problem in problems:
        print(problem, file=sys.stderr)
    print("site: ok" if not problems else f"site: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
