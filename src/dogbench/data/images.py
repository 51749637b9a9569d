"""Images from files: decoded to RGB (grey, 16-bit, CMYK, RGBA, palette), EXIF orientation applied, box crops.

``load_image`` is PIL (with reduced-size JPEG decoding); ``read_image`` decodes plain RGB and grey JPEGs with
libjpeg-turbo through torchvision.io into uint8 tensors, and hands everything else to ``load_image``. Both raise
``ImageError`` for a file that cannot be decoded, in dogbench's words with the path once ("dogs/a.jpg is a text
file, not an image, despite its .jpg name"; ``not_an_image`` words what a non-image is, for the demo too).
``check_image_file`` reads a header only, and ``image_files`` walks a folder, for ``dogbench predict``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from dogbench.data.datasets import IMAGE_EXTENSIONS
from dogbench.errors import DogbenchError

if TYPE_CHECKING:  # torch is imported where tensors are made: the report reads data/ without it
    import torch

__all__ = ["REDUCING_GAP", "UPRIGHT", "ImageError", "check_image_file", "check_pixels", "clamp_box", "image_files",
           "load_image", "not_an_image", "pixel_count", "read_image"]

# Reduced-size decoding keeps the decoded short side at REDUCING_GAP x the resize target or more, so that timm's
# antialiased resize still shrinks at least that much and its filter, not libjpeg's DCT scaling, shapes the
# pixels (PIL's own ``thumbnail`` drafts with the same gap). Without a gap a 513 px photo was decoded at 257 px
# and resized by 1.004: its EfficientNet-Lite0 features moved 11% (relative L2) from timm's pipeline, mosaics
# of larger photos 11% on average (docs/results/whole-photos.md).
REDUCING_GAP = 2
_BOMB = re.compile(r"\((\d+) pixels\)")
_IMAGE_NAMES = IMAGE_EXTENSIONS | {".jfif", ".heic", ".heif", ".avif"}  # extensions that claim a photo


class ImageError(DogbenchError, ValueError):
    """An image file cannot be decoded; the message starts with its path, then says why ("... does not exist")."""


def _what_it_is(head: bytes) -> str | None:
    """A guess at a non-image file from its first bytes, for the message."""
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (or an Office document)"
    stripped = head.lstrip()
    if stripped[:5].lower() in (b"<?xml", b"<svg ") or b"<svg" in stripped[:256].lower():
        return "an SVG or XML file (vector drawings are not accepted)"
    if stripped[:5].lower() in (b"<!doc", b"<html"):
        return "an HTML page"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file" if all(c.isprintable() or c in "\r\n\t" for c in text) else None


def not_an_image(path: str | Path, *, name: str | None = None) -> str:
    """What ``path``, a file no image decoder identifies, is, from its first bytes, as the end of a sentence that
    starts with its name: "is a PDF document, not an image, despite its .jpg name" (an image's extension is
    named), "is empty (0 bytes)", "is not an image dogbench can read". ``name``: how the user knows it (its
    extension is used when ``path`` has none)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "is empty (0 bytes)"
    ext = (path.suffix or os.path.splitext(name or "")[1]).lower()
    named = f", despite its {ext} name" if ext in _IMAGE_NAMES else ""
    what = _what_it_is(head)
    return f"is {what}, not an image{named}" if what else f"is not an image dogbench can read{named}"


def _unreadable(path: str | Path, err: BaseException) -> ImageError:
    """``err`` from opening or decoding ``path`` as an ImageError in dogbench's words (the path once)."""
    if isinstance(err, FileNotFoundError):
        return ImageError(f"{path} does not exist")
    if isinstance(err, IsADirectoryError):
        return ImageError(f"{path} is a folder, not an image")
    if isinstance(err, UnidentifiedImageError):
        try:
            return ImageError(f"{path} {not_an_image(path)}")
        except OSError as again:  # it vanished or cannot be opened since PIL tried
            return _unreadable(path, again)
    if isinstance(err, OSError) and err.errno is not None:  # the file system's refusal, not the image's content
        return ImageError(f"{path} could not be read ({err.strerror or err})")
    return ImageError(f"{path} is corrupt or truncated ({str(err) or type(err).__name__})")


def pixel_count(err: Image.DecompressionBombError) -> str:
    """The pixel count PIL's decompression-bomb refusal names, worded: "400,000,000 pixels" ("too many pixels")."""
    found = _BOMB.search(str(err))
    return f"{int(found.group(1)):,} pixels" if found else "too many pixels"


def _bomb(path: str | Path, err: Image.DecompressionBombError) -> ImageError:
    limit = f"{2 * int(Image.MAX_IMAGE_PIXELS or 0):,}"
    return ImageError(f"{path} has {pixel_count(err)}, over the {limit}-pixel limit (a decompression bomb?); "
                      "refused before decoding")


def check_image_file(path: str | Path) -> None:
    """Raise ImageError unless ``path`` is a file whose header an image decoder identifies, with no more pixels
    than ``check_pixels`` allows; nothing is decoded (a file corrupt past its header fails later, at decoding)."""
    try:
        with Image.open(path) as img:
            size = img.size
    except Image.DecompressionBombError as err:
        raise _bomb(path, err) from None
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise _unreadable(path, err) from None
    check_pixels(size, path)


def image_files(folder: str | Path) -> list[Path]:
    """The image files (by extension: ``IMAGE_EXTENSIONS``) under ``folder``, walked and sorted, hidden entries
    skipped."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent) / f for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale 0..65535 to 0..255 instead of letting PIL clip.
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(grey.min()), float(grey.max())
        if lo < 0.0 or hi > 1.0:
            grey = (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)
        return Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def clamp_box(box: tuple[int, int, int, int], size: tuple[int, int], path: str | Path) -> tuple[int, int, int, int]:
    """``box`` clipped to an image of ``size`` (width, height); ImageError when nothing of it is left."""
    width, height = size
    xmin, ymin = min(max(box[0], 0), width), min(max(box[1], 0), height)
    xmax, ymax = min(max(box[2], 0), width), min(max(box[3], 0), height)
    if xmax <= xmin or ymax <= ymin:
        raise ImageError(f"{path} has its box {box} outside the {width}x{height} image")
    return xmin, ymin, xmax, ymax


def check_pixels(size: tuple[int, int], path: str | Path) -> None:
    """Refuse, from the header alone, an image larger than PIL's decompression-bomb limit (``MAX_IMAGE_PIXELS``,
    89.5 megapixels, which PIL itself only warns about below twice that): decoding it could take gigabytes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(f"{path} has {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the "
                         f"{int(limit):,}-pixel limit (a decompression bomb?); refused before decoding")


def load_image(
    path: str | Path, *, box: tuple[int, int, int, int] | None = None, min_side: int | None = None
) -> Image.Image:
    """Decode `path` into an RGB image (EXIF orientation applied), cropped to `box` when given.

    `box` is (xmin, ymin, xmax, ymax) in stored pixel coordinates, as Pascal-VOC annotations give it, clamped
    to the image; the crop is taken before the EXIF orientation is applied. With `min_side` (the resize
    target), a JPEG whose region (its box, when cropping) has a short side of at least 2 x REDUCING_GAP x
    `min_side` is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping the region's short side at
    REDUCING_GAP x `min_side` pixels or more: the resize that follows then starts from fewer pixels (much less
    decode and resize work for large photos; pixels and features differ from a full decode by more than
    rounding, see docs/results/whole-photos.md). Raises ImageError.
    """
    try:
        with Image.open(path) as img:
            full_size = img.size
            check_pixels(full_size, path)
            if box is not None:
                box = clamp_box(box, full_size, path)
            if min_side is not None and img.format == "JPEG":
                _reduced_decode(img, box or (0, 0, *full_size), min_side)
            img.load()
            upright = UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation))
            if box is not None and img.size != full_size:
                fx, fy = img.size[0] / full_size[0], img.size[1] / full_size[1]
                box = clamp_box(
                    (int(box[0] * fx), int(box[1] * fy), math.ceil(box[2] * fx), math.ceil(box[3] * fy)),
                    img.size, path,
                )
            stored = img.copy() if box is None else img.crop(box)
            return _to_rgb(stored.transpose(upright) if upright is not None else stored)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own refusal at open, above twice MAX_IMAGE_PIXELS
        raise _bomb(path, exc) from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _unreadable(path, exc) from None


def _reduction(region: tuple[int, int, int, int], min_side: int) -> float | None:
    """The scale to ask libjpeg for (it picks the smallest of 1/2, 1/4, 1/8 at or above it): the region's short
    side kept at REDUCING_GAP x ``min_side`` or more; None when not even 1/2 would keep that (full decode)."""
    scale = REDUCING_GAP * min_side / min(region[2] - region[0], region[3] - region[1])
    return scale if scale <= 0.5 else None


def _reduced_decode(img: Image.Image, region: tuple[int, int, int, int], min_side: int) -> None:
    """Ask libjpeg for the smallest DCT scale that keeps the region's short side >= REDUCING_GAP x ``min_side``."""
    scale = _reduction(region, min_side)
    if scale is not None:
        img.draft(None, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))


def read_image(
    path: Path, *, box: tuple[int, int, int, int] | None = None, min_side: int | None = None
) -> Image.Image | torch.Tensor:
    """An image as ``load_image`` gives it (box crop in stored pixels, then EXIF orientation), decoded by
    torchvision.io into a (3, H, W) uint8 tensor when it is an RGB or grey JPEG that reduced-size decoding
    would not shrink; else the PIL image from ``load_image``. Raises ImageError.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    try:
        with Image.open(path) as img:  # the header only: format, mode, size, EXIF
            fmt, mode, size = img.format, img.mode, img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
        return load_image(path, box=box, min_side=min_side)  # raises the ImageError with PIL's reason
    check_pixels(size, path)  # torchvision's decoder has no limit of its own
    region = clamp_box(box, size, path) if box is not None else (0, 0, *size)
    small = min_side is None or _reduction(region, min_side) is None
    if fmt != "JPEG" or mode not in ("RGB", "L") or not small:
        return load_image(path, box=box, min_side=min_side)
    try:
        x = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        reason = str(err).rsplit(", ", 1)[-1]  # drop torchvision's "decode_jpeg, <file.cpp>:<line>, " prefix
        raise ImageError(f"{path} is corrupt or truncated ({reason})") from None
    if box is not None:
        x = x[:, region[1] : region[3], region[0] : region[2]]
    return _orient(x, orientation).contiguous()


def _orient(x: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """The EXIF orientation's transpose (as ``data.UPRIGHT`` gives PIL) on a (C, H, W) tensor."""
    import torch

    ops: dict[int, Any] = {
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(-1, -2),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-1, -2),
        6: lambda t: torch.rot90(t, -1, (-2, -1)),
        7: lambda t: t.transpose(-1, -2).flip(-1, -2),
        8: lambda t: torch.rot90(t, 1, (-2, -1)),
    }
    op = ops.get(orientation) if orientation is not None else None
    return op(x) if op is not None else x
