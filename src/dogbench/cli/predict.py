"""``dogbench predict``: photos (files and folders) -> every model's top-k breeds as a table, JSON or CSV.

A missing or unreadable file is a line of the output that says why, and the other photos are still predicted;
``--strict`` stops at the first one instead, exit 2: a file whose header is bad stops it before any model is
loaded (nothing is written); one that only fails to decode stops it after what was predicted before it is written.
Every file's header is read before any model is loaded, so a batch with nothing readable fails in about a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dogbench.cli.checks import STRICT, nothing_readable
from dogbench.cli.commands import refuse_torchrun
from dogbench.cli.text import format_predictions, plural
from dogbench.errors import DogbenchError

if TYPE_CHECKING:
    from dogbench.inference import ImagePrediction, LoadedRun


def predict(args: argparse.Namespace) -> int:
    """The command: screen every file, load the run, predict the readable ones, write every line."""
    from dogbench.data import ImageError

    screened = screen(args.paths)
    bad = [error for _, error in screened if error]
    if args.strict and bad:
        raise ImageError(f"{bad[0]} {STRICT}")
    if len(bad) == len(screened):
        raise DogbenchError(nothing_readable(bad))
    refuse_torchrun("predict")
    from dogbench.inference import ImagePrediction, load_run

    run = load_run(args.run_dir, device=args.device, batch_size=args.batch_size)
    found = iter(run.predict([path for path, error in screened if not error], top_k=args.top_k, strict=False,
                             progress=not args.quiet))
    predictions = [ImagePrediction(str(path), error=error) if error else next(found) for path, error in screened]
    failed = [p.error for p in predictions if p.error]
    if len(failed) == len(predictions):  # every header was fine, every decode failed
        raise DogbenchError(nothing_readable(failed))
    first_bad = next((i for i, p in enumerate(predictions) if p.error), None)
    if args.strict and first_bad is not None:  # what was predicted before the bad file is kept
        _write(args, run, predictions[:first_bad])
        raise ImageError(f"{predictions[first_bad].error} {STRICT}")
    _write(args, run, predictions)
    return 0


def screen(paths: Sequence[Path]) -> list[tuple[Path, str | None]]:
    """Every file to predict, in the order given (folders walked), with why it cannot be read (None: it may be),
    from its header alone."""
    from dogbench.data import IMAGE_EXTENSIONS, ImageError
    from dogbench.data.images import check_image_file, image_files

    out: list[tuple[Path, str | None]] = []
    for path in paths:
        files = image_files(path) if path.is_dir() else [path]
        if not files:
            out.append((path, f"{path} is a folder with no image files in it (extensions: "
                              f"{', '.join(sorted(IMAGE_EXTENSIONS))})"))
        for file in files:
            try:
                check_image_file(file)
            except ImageError as err:
                out.append((file, str(err)))
            else:
                out.append((file, None))
    return out


def _write(args: argparse.Namespace, run: LoadedRun, predictions: Sequence[ImagePrediction]) -> None:
    """The output (standard output or --out) and a summary line on standard error."""
    from dogbench.atomic import atomic_write_text

    text = format_predictions(predictions, fmt=args.format, run=str(run.path), top_k=args.top_k,
                              temperatures={label: m.temperature for label, m in run.models.items()})
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    bad = sum(p.error is not None for p in predictions)
    skipped = f"; {plural(bad, 'file')} missing or unreadable, each on its own line" if bad else ""
    print(f"predicted {plural(len(predictions) - bad, 'image')} with {', '.join(run.models)} ({run.path})"
          f"{skipped}" + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
