"""``export_run``: one model of a finished run out of dogbench, checked against its predict path, all or nothing.

Everything is written into a hidden temporary folder beside ``out`` and renamed to ``out`` only once every file
is written and every format agrees with ``predict`` on the check photos: a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dogbench import __version__
from dogbench.atomic import temporary_prefix
from dogbench.config import Precision
from dogbench.device import Policy
from dogbench.errors import DogbenchError
from dogbench.export.card import CardFacts, config_digest, model_card
from dogbench.export.onnx_model import ONNX_FILE, check_onnx_installed, check_opset, onnx_proba, write_onnx
from dogbench.export.space import write_space
from dogbench.export.spec import ExportConfig, ExportError, ExportReport, Format, ParityCheck
from dogbench.export.timm_model import classifier_model, folded_head, save_timm
from dogbench.inference import collect_images, load_run
from dogbench.names import model_name
from dogbench.predictor import ImageInput, Predictor
from dogbench.results import RunResults
from dogbench.rundir import RunDir

CARD_FILE = "README.md"


def choose_model(results: RunResults, model: str | None, run: Path) -> tuple[str, str]:
    """(label, why): the one asked for, else the best on validation by the run's ``tune.metric`` (the figure
    every row records as its validation score), the first of equals."""
    labels = list(results.models)
    if model is not None:
        if model not in results.models:
            raise ExportError(f"The run {run} has no model {model!r}. Its models: {', '.join(labels)}")
        return model, "asked for"
    metric = str(results.config.get("tune", {}).get("metric", "top1")).replace("top1", "top-1").replace("_", " ")
    best = max(labels, key=lambda label: results.models[label].val["top1"])
    others = "; ".join(f"{label} {results.models[label].val['top1']:.4f}" for label in labels if label != best)
    return best, (f"the best by validation {metric} ({results.models[best].val['top1']:.4f}"
                  f"{', against ' + others if others else ''})")


def _check_out(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty: give a new folder (or an empty one); nothing "
                          "was written")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a new folder (or an empty one); nothing was written")


def _finished(run: RunDir) -> RunResults:
    try:
        return run.read_results()
    except DogbenchError as err:
        raise ExportError(f"{run.path} is not a finished run, nothing to export: {err}") from None


def _predictor(run: RunDir, label: str) -> tuple[Predictor, tuple[str, ...], str]:
    """``label``'s single-view predictor at fp32 on the CPU (the precision and view of every export: test-time
    augmentation is not folded into the exported model), its class names, and a note when the run scored in
    another precision or over several views."""
    try:
        loaded = load_run(run.path, device="cpu")
    except DogbenchError as err:
        raise ExportError(f"{run.path} is not a finished run, its model {label!r} cannot be loaded: {err}") from None
    p = loaded.models[label]
    if p.runner.precision is Precision.FP32 and len(p.views) == 1:
        return p, loaded.classes, ""
    notes = [f"the run scored {label} in {p.runner.precision.value}; the export is fp32 and was checked against "
             "fp32"] if p.runner.precision is not Precision.FP32 else []
    if len(p.views) > 1:
        notes.append(f"the run scored {label} with {p.tta.value} test-time augmentation ({len(p.views)} views); the "
                     "exported model is single-view, checked against predict's single-view probabilities")
    note = "; ".join(notes)
    return (Predictor(label, p.backbone, p.head, classes=p.classes, features=p.features_cfg,
                      crop_to_box=p.crop_to_box, policy=Policy.resolve("cpu", Precision.FP32)), loaded.classes, note)


def check_photos(run: RunDir, label: str, cfg: ExportConfig) -> tuple[list[ImageInput], str]:
    """The photos the export is checked on, and where they came from: the caller's, else up to
    ``cfg.check_images`` of the run's test images (spread over the split), else seeded random pictures."""
    if cfg.photos:
        try:
            photos = collect_images(cfg.photos)
        except DogbenchError as err:
            raise ExportError(f"Check photos: {err}") from None
        return list(photos[: cfg.check_images]), f"{min(len(photos), cfg.check_images)} photos given"
    paths = [Path(p) for p in run.read_predictions(label).paths]
    found = [p for p in paths if p.is_file()]
    if found:
        step = max(1, len(found) // cfg.check_images)
        chosen = found[::step][: cfg.check_images]
        return list(chosen), f"{len(chosen)} of the run's {len(paths)} test images"
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(cfg.check_images)]
    return list(pictures), f"{len(pictures)} random pictures (the run's test images are not on this machine)"


def _pixels(predictor: Predictor, photos: list[ImageInput]) -> torch.Tensor:
    """The uint8 model inputs of ``photos`` as the predict path makes them, in order."""
    out: list[torch.Tensor | None] = [None] * len(photos)
    for x, rows, errors in predictor.pixels(photos, workers=0):
        for k, (row, error) in enumerate(zip(rows, errors, strict=True)):
            if error:
                raise ExportError(f"Check photo {photos[row]} cannot be read: {error}")
            out[row] = x[k]
    return torch.stack(out)


def _parity(fmt: Format, proba: np.ndarray, reference: np.ndarray, source: str, tolerance: float) -> ParityCheck:
    check = ParityCheck(fmt, len(reference), source, float(np.abs(proba - reference).max()),
                        int((proba.argmax(1) == reference.argmax(1)).sum()), tolerance)
    if not check.max_abs_diff <= tolerance:
        raise ExportError(f"The {fmt.value} export disagrees with dogbench's predict path: {check.figures()}; "
                          "nothing was written")
    return check


def _model_proba(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).double().numpy()


def _write(tmp: Path, predictor: Predictor, classes: tuple[str, ...], cfg: ExportConfig, *,
           record: dict, photos: list[ImageInput], source: str) -> tuple[list[ParityCheck], int | None]:
    """Every format into ``tmp``, each checked against ``predict`` on ``photos``; (checks, ONNX opset)."""
    from dogbench.export.loaded import load_export

    reference = predictor.predict_proba(photos, strict=True)[0]
    pixels = _pixels(predictor, photos)
    preprocess = predictor.backbone.preprocess
    head, temperature = predictor.head, predictor.temperature
    checks, opset = [], None
    if cfg.writes_timm:
        model = classifier_model(predictor.backbone, head, len(classes), temperature)
        save_timm(model, tmp, classes=classes, preprocess=preprocess.to_dict(), record=record)
        reloaded = load_export(tmp).model  # as a user loads it: timm's local-dir: and config.json
        checks.append(_parity(Format.TIMM, _model_proba(reloaded, preprocess.normalize(pixels)), reference, source,
                              cfg.tolerance))
    if Format.ONNX in cfg.formats:
        features = copy.deepcopy(predictor.backbone.model).float().to(memory_format=torch.contiguous_format)
        model = nn.Sequential(features, folded_head(head, len(classes), temperature)).eval()
        opset = write_onnx(model, preprocess, tmp / ONNX_FILE, example=pixels, opset=cfg.opset,
                           metadata={"label_names": list(classes), "dogbench": record})
        checks.append(_parity(Format.ONNX, onnx_proba(tmp / ONNX_FILE, pixels), reference, source, cfg.tolerance))
    if Format.SPACE in cfg.formats:
        write_space(tmp)
    return checks, opset


def export_run(run_dir: str | Path, out: str | Path, cfg: ExportConfig | None = None, *,
               model: str | None = None) -> ExportReport:
    """Export ``model`` of the finished run ``run_dir`` (default: the best by validation top-1) to the new
    folder ``out`` in ``cfg.formats``, with its model card; ExportError, and nothing written, when it cannot."""
    started = time.perf_counter()
    cfg = cfg or ExportConfig()
    run, out = RunDir(run_dir), Path(out)
    _check_out(out)
    results = _finished(run)
    label, why = choose_model(results, model, run.path)
    if Format.ONNX in cfg.formats:
        check_onnx_installed()
        check_opset(cfg.opset)
    predictor, classes, note = _predictor(run, label)
    if predictor.head is None:
        raise ExportError(f"{label!r} of {run.path} has no tuned head: run `dogbench evaluate {run.path}` first")
    photos, source = check_photos(run, label, cfg)
    name = model_name(asdict(results.models[label]))
    record = {"label": label, "title": f"{name.short} for {results.dataset.name}", "why": why,
              "summary": f"{name.full}. Exported by dogbench {__version__} from run {run.path.name}.",
              "run": str(run.path.resolve()), "dogbench_version": __version__,
              "config_digest": config_digest(results), "temperature": predictor.temperature,
              "method": results.models[label].method}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{temporary_prefix(out)}{os.getpid()}.", suffix=".tmp"))
    try:
        checks, opset = _write(tmp, predictor, classes, cfg, record=record, photos=photos, source=source)
        facts = CardFacts(label, why, run.path.name, cfg.formats, opset, tuple(checks), __version__)
        (tmp / CARD_FILE).write_text(model_card(results, facts))
        files = tuple(sorted((str(p.relative_to(tmp)), p.stat().st_size) for p in tmp.rglob("*") if p.is_file()))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would leave the export readable by its writer alone
        _check_out(out)  # nobody filled it meanwhile
        os.replace(tmp, out)  # an empty folder is replaced as a whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out, label, name.short, why, files, tuple(checks), opset, time.perf_counter() - started,
                        (note,) if note else ())
