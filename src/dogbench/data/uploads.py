"""Files from strangers (the demo's uploads): screened from their header, before a single pixel is decoded.

``screen_upload`` refuses what cannot or should not be decoded, with a message that names the upload and says
what would be accepted: a file over the byte limit, an empty file, something that is not an image (a PDF, text,
an archive or an SVG renamed ``.jpg`` is named as such), a format outside ``UPLOAD_FORMATS`` (PIL would hand
EPS to Ghostscript), and more pixels than the cap (a decompression bomb: a 20,000 x 20,000 PNG of 1 MB would
take 1.2 GB once decoded). What can be classified but deserves a word gets a note instead: animated or
multi-page files (the first frame is classified), 16-bit and CMYK images (converted as for every image
dogbench reads, see ``images._to_rgb``), transparency (composited on white).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dogbench.data.images import ImageError, not_an_image, pixel_count

__all__ = ["UPLOAD_FORMATS", "Screened", "UploadError", "UploadLimits", "screen_upload"]

# PIL format names accepted from uploads; HEIF/AVIF only where a plugin (pillow-heif, Pillow's AVIF) reads them.
# MPO is what many phones write: a JPEG whose extra frames are previews or depth maps (not an animation).
UPLOAD_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
ACCEPTED = "a JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC photo"


class UploadError(ImageError):
    """An upload refused before decoding; the message names the file, what is wrong, and what is accepted."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 48-megapixel phone photo passes; PIL itself refuses above 179M

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"upload limits must be positive, got {self}")


@dataclass(frozen=True)
class Screened:
    """An upload that may be decoded: its format, (width, height), frame count and the notes to show with it."""

    name: str
    format: str
    size: tuple[int, int]
    frames: int
    notes: tuple[str, ...] = ()


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def screen_upload(path: str | Path, limits: UploadLimits, *, name: str | None = None) -> Screened:
    """Check ``path`` from its size and image header only; ``name`` is how the user knows the file (its original
    name). Raises UploadError, else returns what may be decoded and the notes to show beside the answer."""
    path = Path(path)
    name = name or path.name
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise UploadError(f"'{name}' could not be read ({err.strerror or err}); upload it again") from None
    if size == 0:
        raise UploadError(f"'{name}' is empty (0 bytes): upload {ACCEPTED}")
    if size > limits.max_bytes:
        raise UploadError(f"'{name}' is {_mb(size)}, over this demo's limit of {_mb(limits.max_bytes)} "
                          "(dogbench serve --max-upload-mb): upload a smaller photo")
    try:
        with Image.open(path, formats=_readable_formats()) as img:  # the header only: nothing is decoded here
            fmt, mode, (width, height) = img.format or "?", img.mode, img.size
            frames = int(getattr(img, "n_frames", 1) or 1)
            rawmode = str(img.tile[0].args) if img.tile else ""
            transparent = "transparency" in img.info
    except Image.DecompressionBombError as err:  # PIL's own cap (2 x MAX_IMAGE_PIXELS), before ours
        raise UploadError(_too_many(name, pixel_count(err), limits)) from None
    except UnidentifiedImageError:  # the sentence `dogbench predict` gives too
        raise UploadError(f"'{name}' {not_an_image(path, name=name)}: upload {ACCEPTED}") from None
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise UploadError(f"'{name}' is corrupt or truncated ({err}): upload the photo again, or another one") \
            from None
    if width < 1 or height < 1:
        raise UploadError(f"'{name}' has no pixels ({width}x{height}): upload {ACCEPTED}")
    if width * height > limits.max_pixels:
        raise UploadError(_too_many(name, f"{width:,} x {height:,} = {width * height:,} pixels", limits))
    notes = []
    if frames > 1 and fmt != "MPO":
        kind = "multi-page" if fmt == "TIFF" else "animated"
        notes.append(f"'{name}' is {kind} ({frames} frames): the first frame was classified.")
    if mode.startswith("I;16") or ";16" in rawmode:
        notes.append(f"'{name}' has 16 bits per channel: it was scaled to 8 bits, as the models saw in training.")
    elif mode in ("I", "F"):
        how = "read as 16-bit (values outside 0-65535 clipped)" if mode == "I" else "rescaled to 0-1"
        notes.append(f"'{name}' has 32-bit {'integer' if mode == 'I' else 'float'} pixels: they were {how} and "
                     "converted to 8 bits, so the picture may differ from what you see.")
    if mode == "CMYK":
        notes.append(f"'{name}' is CMYK (a print colour space): it was converted to RGB, so colours may be "
                     "slightly off.")
    if mode in ("RGBA", "LA", "PA") or transparent:
        notes.append(f"'{name}' has transparency: it was composited on white.")
    return Screened(name, fmt, (width, height), frames, tuple(notes))


def _readable_formats() -> list[str]:
    """UPLOAD_FORMATS that this PIL has an opener for (MPO comes through the JPEG opener; HEIF with a plugin)."""
    Image.init()
    if "HEIF" not in Image.OPEN:
        try:  # iPhones' HEIC: the optional pillow-heif plugin (the ``demo`` extra) registers an opener with PIL
            import pillow_heif
        except ImportError:
            pass
        else:
            pillow_heif.register_heif_opener()
    return [f for f in UPLOAD_FORMATS if f in Image.OPEN]


def _too_many(name: str, pixels: str, limits: UploadLimits) -> str:
    return (f"'{name}' has {pixels}, over this demo's limit of {limits.max_pixels / 1e6:g} megapixels "
            "(refused before decoding; dogbench serve --max-megapixels): upload a smaller photo")
