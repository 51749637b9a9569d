"""What the CLI prints: counts with their nouns, and ``dogbench predict``'s table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dogbench.inference import ImagePrediction


def plural(n: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``0 images`` (nouns that take an ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_predictions(
    predictions: Sequence[ImagePrediction], *, fmt: str, run: str, top_k: int, temperatures: dict[str, float | None]
) -> str:
    """``dogbench predict``'s output: an aligned table, JSON (run, models, calibration, top_k, predictions) or CSV
    rows of (image, model, rank, breed, probability, error); a file that was not predicted is one row saying why.
    ``temperatures``: per model, the calibration its probabilities carry (None: uncalibrated)."""
    if fmt == "json":
        doc = {"run": run, "models": list(temperatures), "calibration": {
            label: {"temperature": t, "calibrated": t is not None} for label, t in temperatures.items()},
            "top_k": top_k, "predictions": [p.to_dict() for p in predictions]}
        return json.dumps(doc, indent=2) + "\n"
    rows = []
    for p in predictions:
        if p.error:
            rows.append([p.image, "-", "", "", "", p.error])
            continue
        for label, top in p.top.items():
            rows += [[p.image, label, str(rank), breed, f"{prob:.6f}", ""] for rank, (breed, prob) in enumerate(top, 1)]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "model", "rank", "breed", "probability", "error"])
        writer.writerows(rows)
        return buffer.getvalue()
    lines = []
    for p in predictions:
        if p.error:  # "photos/a.jpg  -  is a text file, not an image, ...": the path is said once, in its column
            lines.append([p.image, "-", p.error.removeprefix(f"{p.image} ")])
        for label, top in p.top.items():
            lines.append([p.image, label, ", ".join(f"{breed} {prob:.1%}" for breed, prob in top)])
    header = ["image", "model", f"top-{top_k}"]
    widths = [max(len(r[k]) for r in [header, *lines]) for k in range(2)]
    out = [f"{header[0].ljust(widths[0])}  {header[1].ljust(widths[1])}  {header[2]}"]
    out += [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in lines]
    out.append("probabilities: " + ", ".join(
        f"{label} temperature-scaled (T = {t:.3f}, fitted on the run's validation split)" if t is not None
        else f"{label} uncalibrated" for label, t in temperatures.items()))
    return "\n".join(out) + "\n"

