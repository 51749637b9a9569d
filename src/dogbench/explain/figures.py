"""A run's explanations as files: overlays of the heatmaps on the model's input, the side-by-side figure of every
model with its calibrated top-3, and ``explanations.json``: what ``dogbench explain`` and the HTML report show
(``<stem>__<label>.png`` per model, ``<stem>.png`` side by side).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dogbench.atomic import atomic_write_bytes, atomic_write_json
from dogbench.explain.maps import Box, ExplainError, explain_image
from dogbench.inference import LoadedRun
from dogbench.names import architecture_title
from dogbench.report import plots
from dogbench.rundir import EXPLANATIONS_FILE, RunDir


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.5,
    cmap: str = plots.HEATMAP_CMAP,
    box: Sequence[float] | None = None,
) -> Image.Image:
    """Blend a (H, W) heatmap in [0, 1], coloured with matplotlib's ``cmap``, over an (H, W, 3) uint8 image;
    draw ``box`` (input pixels) in white when given."""
    from matplotlib import colormaps

    if image.shape[:2] != heatmap.shape:
        raise ExplainError(f"Heatmap shape {heatmap.shape} does not match the image's {image.shape[:2]}")
    if cmap not in colormaps:
        raise ExplainError(f"Unknown colormap {cmap!r}; e.g. jet, inferno, viridis, magma, turbo")
    colours = colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * image.astype(np.float64) / 255.0 + alpha * colours
    result = Image.fromarray(np.round(np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8))
    if box is not None:
        ImageDraw.Draw(result).rectangle(list(box), outline=(255, 255, 255), width=2)
    return result


def _png(img: Image.Image) -> bytes:
    """The image as PNG bytes."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def side_by_side(
    image: np.ndarray, panels: Sequence[tuple[str, Image.Image, Sequence[tuple[str, float]]]],
    *, box: Sequence[float] | None = None,
) -> bytes:
    """A PNG: the model input, then each (title, overlay, top-3) panel with its title and top-3 below, and the
    heatmaps' colour scale with how to read it (the report's ``plots.explanation_figure``)."""
    first = Image.fromarray(image)
    if box is not None:
        ImageDraw.Draw(first).rectangle(list(box), outline=(255, 255, 255), width=2)
    columns = [("input", np.asarray(first), ())] + [(t, np.asarray(p.convert("RGB")), top) for t, p, top in panels]
    return plots.png(plots.explanation_figure(columns, heatmaps_from=1))


# ---------------------------------------------------------------- a run's models


def _unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, or ``<stem>-2``, ``<stem>-3`` ... when an earlier photo of the same name took it."""
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def explain_run(
    run: LoadedRun,
    images: Sequence[Path | str | tuple[Path | str, Box | None]],
    out_dir: Path,
    *,
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Explain photos with every model of a loaded run (``inference.load_run``); write PNGs and
    ``explanations.json`` (rundir's ``EXPLANATIONS_FILE``) into ``out_dir``.

    ``images`` are paths or (path, box) pairs (box in original pixels: drawn on the overlays, or the crop the
    models see when the run used ``data.crop_to_box``). Per image: ``<stem>__<label>.png`` (overlay) for each
    model and ``<stem>.png`` (input | overlays with titles and top-3). Returns one record per (image, model):
    {image, stem, label, model, method, png, figure, top3 [[name, calibrated p]], target, calibrated, head (the
    head files' digest: ``RunDir.head_digest``)}, plus ``extra[i]``'s fields for the i-th image (e.g. its sample id).
    """
    out_dir = Path(out_dir)
    heads = {label: RunDir(run.path).head_digest(label) for label in run.models}
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    for i, entry in enumerate(images):
        path, box = (entry if isinstance(entry, tuple) else (entry, None))
        path = Path(path)
        stem = _unique_stem(path, used)
        panels = []
        explanations = []
        for label, model in run.models.items():
            explanation = explain_image(model, path, box=box)
            explanations.append(explanation)
            picture = overlay(explanation.image, explanation.heatmap, box=explanation.box)
            png = f"{stem}__{label.replace('/', '-')}.png"  # a fine-tuned model's label is <backbone>/<method>
            atomic_write_bytes(out_dir / png, _png(picture))
            tag = model.backbone.tag
            panels.append((f"{label}: {architecture_title(tag)}, {explanation.method}", picture, explanation.top3))
            records.append({
                "image": str(path), "stem": stem, "label": label, "model": tag,
                "method": explanation.method, "png": png, "figure": f"{stem}.png",
                "top3": [[name, round(p, 6)] for name, p in explanation.top3],
                "target": explanation.target, "calibrated": True, "head": heads[label],
                **(extra[i] if extra else {}),
            })
        first = explanations[0]  # the input panel shows the first backbone's view (input sizes may differ)
        atomic_write_bytes(out_dir / f"{stem}.png", side_by_side(first.image, panels, box=first.box))
    atomic_write_json(out_dir / EXPLANATIONS_FILE, records)
    return records
