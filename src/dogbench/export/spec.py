"""What ``dogbench export`` is asked for (``ExportConfig``) and what it did (``ExportReport``); its one error."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dogbench.errors import DogbenchError
from dogbench.rundir import RESULTS_FILE

TOLERANCE = 1e-4  # largest probability difference an exported model may show against dogbench's predict path
CONFIG_FILE = "config.json"  # timm's, written by save_for_hf
WEIGHTS_FILE = "model.safetensors"
DOGBENCH_KEY = "dogbench"  # config.json's record of where the export came from (timm ignores it)
CHECK_IMAGES = 16  # the run's own test images an export is checked on when no photos are given


class ExportError(DogbenchError, ValueError):
    """An export that cannot be made: the message names the problem and the valid choices."""


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a dogbench export (timm's config.json with its "dogbench" record) and no run."""
    config = Path(folder) / CONFIG_FILE
    if not (Path(folder) / WEIGHTS_FILE).is_file() or (Path(folder) / RESULTS_FILE).exists():
        return False
    try:
        return isinstance(json.loads(config.read_text()).get(DOGBENCH_KEY), dict)
    except (OSError, ValueError, AttributeError):
        return False


class Format(StrEnum):
    TIMM = "timm"  # config.json + model.safetensors, timm's own format (save_for_hf)
    ONNX = "onnx"  # model.onnx: resized and cropped uint8 pixels in, calibrated probabilities out
    SPACE = "space"  # the timm format plus app.py and requirements.txt: a Hugging Face Space as it is


def parse_formats(text: str | Sequence[str]) -> tuple[Format, ...]:
    """``"timm,onnx"`` (or a list of names) -> formats in the order given, once each; unknown names are refused
    with the closest valid one."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    known = [f.value for f in Format]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ExportError(f"Unknown export format {name!r}.{hint} Known: {', '.join(known)}")
    if not names:
        raise ExportError(f"No export format given. Known: {', '.join(known)}")
    return tuple(dict.fromkeys(Format(n) for n in names))


@dataclass(frozen=True)
class ExportConfig:
    """Which files to write and how to check them: ``photos`` (default: up to ``check_images`` of the run's own
    test images) go through dogbench's predict path and through each exported model, which must agree within
    ``tolerance``. ``opset``: the ONNX opset (None: torch's default for the exporter)."""

    formats: tuple[Format, ...] = (Format.TIMM, Format.ONNX)
    opset: int | None = None
    photos: tuple[Path, ...] = ()
    check_images: int = CHECK_IMAGES
    tolerance: float = TOLERANCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats([str(f) for f in self.formats]))
        object.__setattr__(self, "photos", tuple(Path(p) for p in self.photos))
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)
                                       or self.opset < 1):
            raise ExportError(f"--opset must be a positive whole number, got {self.opset!r}")
        if self.check_images < 1:
            raise ExportError(f"check_images must be at least 1, got {self.check_images}")
        if not self.tolerance > 0:
            raise ExportError(f"tolerance must be > 0, got {self.tolerance}")

    @property
    def writes_timm(self) -> bool:
        """A Space is the timm format plus its app: both write config.json and model.safetensors."""
        return Format.TIMM in self.formats or Format.SPACE in self.formats


@dataclass(frozen=True)
class ParityCheck:
    """One exported format against dogbench's predict path on the same photos."""

    format: Format
    n_images: int
    source: str  # where the photos came from, in words
    max_abs_diff: float  # largest |probability difference| over every image and class
    top1_agree: int  # images whose most probable class is the same
    tolerance: float

    def figures(self) -> str:
        return (f"max |p - p_predict| = {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), top-1 agrees on "
                f"{self.top1_agree} of {self.n_images} ({self.source})")

    def describe(self) -> str:
        return f"{self.format.value}: {self.figures()}"


@dataclass(frozen=True)
class ExportReport:
    """What ``export_run`` wrote: the model and why it was chosen, every file with its size, the parity checks."""

    out: Path
    label: str
    name: str  # the model as a reader knows it (names.ModelName.short)
    why: str  # "asked for" or "the best by validation top-1 (...)"
    files: tuple[tuple[str, int], ...]  # (path relative to out, bytes)
    checks: tuple[ParityCheck, ...]
    opset: int | None  # the ONNX file's opset, None without one
    wall_s: float
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"exported {self.label} ({self.name}): {self.why}", f"to {self.out} in {self.wall_s:.1f} s"]
        lines += [f"  {path}  {_size(size)}" for path, size in self.files]
        lines += [f"  check {c.describe()}" for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "label": self.label, "name": self.name, "why": self.why,
                "files": {p: s for p, s in self.files}, "opset": self.opset, "wall_s": self.wall_s,
                "checks": [{"format": c.format.value, "n_images": c.n_images, "source": c.source,
                            "max_abs_diff": c.max_abs_diff, "top1_agree": c.top1_agree, "tolerance": c.tolerance}
                           for c in self.checks], "notes": list(self.notes)}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
