"""Arguments checked before anything heavy is imported (no torch, timm, optuna, scikit-learn, Gradio or
matplotlib): numbers in range, device names, run folders, photos that exist (and, for explain, are images).
A typo costs a second, not ten."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dogbench.errors import DogbenchError

STRICT = "(--strict stops at the first missing or unreadable file)"
# the commands whose RUN_DIR must be a run folder already
RUN_READERS = ("predict", "explain", "serve", "evaluate", "export")


class ArgumentError(DogbenchError, ValueError):
    """A command-line argument that cannot work; the message names it, what is wrong and what would do."""


@dataclass(frozen=True)
class Bound:
    """A numeric flag's accepted values: ``low`` or more (more than 0 when ``positive``), ``high`` at most."""

    flag: str
    low: float = 0
    high: float | None = None
    positive: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def violation(self, value: float | None) -> str | None:
        """The message when ``value`` is out of bounds (worded as the setting's own check words it), else None."""
        if value is None:
            return None
        if self.positive:
            ok, rule = value > 0, "positive"
        elif self.high is not None:
            ok, rule = self.low <= value <= self.high, f"{self.low:g}..{self.high:g}"
        else:
            ok, rule = value >= self.low, f"at least {self.low:g}"
        return None if ok else f"{self.dest} must be {rule}, got {value} ({self.flag})"


BOUNDS: dict[str, tuple[Bound, ...]] = {
    "predict": (Bound("--top-k", 1), Bound("--batch-size", 1)),
    "export": (Bound("--opset", 14),),  # export.onnx_model.MIN_OPSET, without importing torch
    "screen": (Bound("--finalists", 1),),
    "serve": (Bound("--port", 0, 65535), Bound("--concurrency", 1), Bound("--examples", 0),
              Bound("--max-upload-mb", positive=True), Bound("--max-megapixels", positive=True)),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ArgumentError for the first argument that cannot work: numbers and the device name first, then the
    run folder, then the photos."""
    for bound in BOUNDS.get(args.command, ()):
        problem = bound.violation(getattr(args, bound.dest))
        if problem:
            raise ArgumentError(problem)
    if args.command in ("predict", "explain", "serve"):
        from dogbench.config.sections import DEVICE

        problem = DEVICE.violation("--device", args.device)
        if problem:
            raise ArgumentError(problem)
    if args.command == "predict" and args.out is not None and args.out.is_dir():
        raise ArgumentError(f"--out {args.out} is a folder: give the file to write the output to")
    if args.command in RUN_READERS:
        check_run_folder(args.command, args.run_dir)
    if args.command == "export":
        _check_export(args)
    if args.command == "screen":
        _check_screen(args)
    if args.command in ("predict", "explain"):
        _check_photos(args)


def check_run_folder(command: str, path: Path) -> None:
    """Refuse a RUN_DIR that is not a run folder, saying what one is and how to make one. A folder that has a
    run's results but lost its config passes: reading it then names the missing file and how to rebuild it."""
    from dogbench.rundir import CONFIG_FILE, RESULTS_FILE

    what = (f"A run folder is what `dogbench run --config FILE --out RUN` writes: its {CONFIG_FILE}, each model's "
            f"tuned head and {RESULTS_FILE}. Make one that way, or give `dogbench {command}` the folder a run wrote.")
    if not path.exists():
        raise ArgumentError(f"Run folder {path} does not exist. {what}")
    if not path.is_dir():
        raise ArgumentError(f"{path} is a file, not a run folder. {what}")
    if not (path / CONFIG_FILE).exists() and not (path / RESULTS_FILE).exists():
        raise ArgumentError(f"{path} is not a run folder (it has no {CONFIG_FILE}). {what}")


def _check_photos(args: argparse.Namespace) -> None:
    """explain: every photo must exist and have an image's header; predict: one at least must exist (--strict:
    every one), the others get a line of their own."""
    paths = args.images if args.command == "explain" else args.paths
    missing = [f"{p} does not exist" for p in paths if not p.exists()]
    if args.command == "explain":
        if missing:
            raise ArgumentError("; ".join(missing))
        from dogbench.data.images import check_image_file

        for photo in paths:
            check_image_file(photo)
        return
    if not missing:
        return
    if args.strict:
        raise ArgumentError(f"{missing[0]} {STRICT}")
    if len(missing) == len(paths):
        raise ArgumentError(nothing_readable(missing))


def _check_export(args: argparse.Namespace) -> None:
    """export: the formats known, ``--out`` new or empty, every photo there."""
    from dogbench.export.spec import parse_formats

    parse_formats(args.format)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ArgumentError(f"--out {args.out} exists and is not an empty folder: give a new folder (an export is "
                            "written whole or not at all, never over another)")
    missing = [str(p) for p in args.photos if not p.exists()]
    if missing:
        raise ArgumentError(f"--photos: {', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist")


def nothing_readable(errors: Sequence[str]) -> str:
    """``predict``'s message when no file given could be read: each file's own sentence on a line."""
    files = "the file given could not" if len(errors) == 1 else f"none of the {len(errors)} files given could"
    return f"nothing could be predicted: {files} be read\n  " + "\n  ".join(errors)


def _check_screen(args: argparse.Namespace) -> None:
    """The zoo exists and the budget reads as one (the rest needs the data and the models)."""
    from dogbench.screen.rungs import parse_budget
    from dogbench.screen.zoo import load_zoo

    if args.zoo is not None:
        load_zoo(args.zoo)
    if args.budget is not None:
        parse_budget(args.budget)
    if args.zoo is None and len(args.backbone) < 2 and args.config is None:
        raise ArgumentError("a screen ranks two or more backbones: give --zoo NAME (standard, small, or a .toml "
                            "file) or several --backbone LABEL=SPEC")
