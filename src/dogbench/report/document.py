"""The report as a document: sections of figures, tables and cards, and the image files they show.

Built once by the section builders (``sections``, ``sections_studies``); the HTML template and the Markdown writer
(``render``) only lay it out. No torch import.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage

from dogbench import __version__

FILES_DIR = "report_files"
THUMB_PX = 180


@dataclass(frozen=True)
class Image:
    """An image file of the report: embedded in the HTML, a file beside report.md."""

    name: str  # file name under report_files/
    alt: str
    width: int | None = None  # display width in px (None: the figure's own, up to the page width)


@dataclass(frozen=True)
class Line:
    """A line of text in a cell or card, marked right (green) or wrong (red) when ``ok`` is set."""

    text: str
    ok: bool | None = None  # green (right) / red (wrong) / plain


Cell = str | Image | list[Line]


@dataclass(frozen=True)
class Table:
    """A table of text, image and line-list cells."""

    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass(frozen=True)
class Card:
    """A photo with a title and lines under it (one test image of the prediction grid)."""

    image: Image | None
    title: str
    lines: list[Line]


@dataclass(frozen=True)
class Cards:
    """A grid of cards."""

    cards: list[Card]


@dataclass(frozen=True)
class Figure:
    """An image with its caption, and a larger version to open below it (a 120-class confusion matrix)."""

    image: Image
    caption: str
    full: Image | None = None


Block = Figure | Table | Cards


@dataclass
class Section:
    """One heading of the report: paragraphs, then blocks."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    """The whole report: headline (title, verdicts, who is who, why, caveats), sections and their image files."""

    title: str
    subtitle: str
    verdicts: list[str]
    caveats: list[str]
    sections: list[Section]
    files: dict[str, bytes]  # report_files/<name> -> bytes
    who: list[str] = field(default_factory=list)  # each model named in full (names.ModelName.full)
    why: list[str] = field(default_factory=list)  # sentences with the run's evidence for the verdict
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    version: str = __version__


class Assets:
    """Collects the report's image files under unique names."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, name: str, data: bytes, alt: str, width: int | None = None) -> Image:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        stem, dot, ext = safe.rpartition(".")
        unique, i = safe, 1
        while unique in self.files:
            i += 1
            unique = f"{stem}-{i}{dot}{ext}"
        self.files[unique] = data
        return Image(unique, alt, width)

    def thumbnail(self, path: str, alt: str, px: int = THUMB_PX) -> Image | None:
        """A JPEG thumbnail of a dataset image, or None when the file cannot be read (moved, corrupt)."""
        try:
            with PILImage.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((px * 2, px * 2))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
        except (OSError, ValueError):
            return None
        return self.add(f"thumb-{Path(path).stem}.jpg", buf.getvalue(), alt, px)


__all__ = ["Assets", "Block", "Card", "Cards", "Cell", "FILES_DIR", "Figure", "Image", "Line", "Report", "Section",
           "Table"]
