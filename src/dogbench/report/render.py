"""Assemble the report from run folders and write it twice: ``report.html`` (self-contained, every image embedded
as a data URI, opens offline) and ``report.md`` with its PNG/JPEG files in ``report_files/``.

The content is built once as a list of ``Section`` blocks (figures, tables, cards); the HTML template and the
Markdown writer only lay them out. No torch import.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader
from PIL import Image as PILImage

from dogbench import __version__
from dogbench.atomic import atomic_write_bytes, atomic_write_text
from dogbench.data import STANFORD_DOGS, display_names
from dogbench.report import plots
from dogbench.report.runs import (
    ModelRun,
    RunFolder,
    aligned,
    all_models,
    comparisons,
    load_runs,
    select_examples,
)
from dogbench.results import verdict
from dogbench.rundir import EXPLANATIONS_DIR

FILES_DIR = "report_files"
THUMB_PX = 180


@dataclass(frozen=True)
class Image:
    """An image file of the report: embedded in the HTML, a file beside report.md."""

    name: str  # file name under report_files/
    alt: str
    width: int | None = None  # display width in px (None: the figure's own, up to the page width)
    wide: bool = False  # shown at its natural size in a scrolling frame (a 120-class confusion matrix)


@dataclass(frozen=True)
class Line:
    text: str
    ok: bool | None = None  # green (right) / red (wrong) / plain


Cell = str | Image | list[Line]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass(frozen=True)
class Card:
    image: Image | None
    title: str
    lines: list[Line]


@dataclass(frozen=True)
class Cards:
    cards: list[Card]


@dataclass(frozen=True)
class Figure:
    image: Image
    caption: str


Block = Figure | Table | Cards


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    subtitle: str
    verdicts: list[str]
    caveats: list[str]
    sections: list[Section]
    files: dict[str, bytes]  # report_files/<name> -> bytes
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    version: str = __version__


class _Assets:
    """Collects the report's image files under unique names."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, name: str, data: bytes, alt: str, width: int | None = None, *, wide: bool = False) -> Image:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        stem, dot, ext = safe.rpartition(".")
        unique, i = safe, 1
        while unique in self.files:
            i += 1
            unique = f"{stem}-{i}{dot}{ext}"
        self.files[unique] = data
        return Image(unique, alt, width, wide)

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


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]"


def _seconds(result: dict[str, Any]) -> float:
    t = result.get("timing_s", {})
    return sum(float(t.get(k, 0.0)) for k in ("extract", "tune", "baseline", "fit", "train", "evaluate"))


def _method(result: dict[str, Any]) -> str:
    method = result.get("method", "frozen")
    if method == "frozen":
        return f"tuned {result.get('head', {}).get('kind', '?')} head"
    return f"{method} fine-tuning"


def _summary_table(models: list[ModelRun]) -> Table:
    header = ["model", "method", "test top-1 [95% CI]", "top-5", "macro-F1", "val top-1", "params", "GFLOPs",
              "extract s", "tune s", "fit s", "eval s", "img/s", "device"]
    rows: list[list[Cell]] = []
    for m in models:
        r = m.result
        t = r.get("timing_s", {})
        common = [f"{r['params'] / 1e6:.1f}M", f"{r['gflops']:.2f}", f"{t.get('extract', 0):.1f}"]
        img_s = f"{r['throughput_img_s']:.1f}" if r.get("throughput_img_s") else "cached"
        device = f"{r['device']} ({r['precision']})"
        test = r["test"]
        rows.append([m.key, _method(r), f"{_pct(test['top1'])} {_ci(test['top1_ci95'])}",
                     _pct(test["top5"]), f"{test['macro_f1']:.4f}", _pct(r["val"]["top1"]), *common,
                     f"{t.get('tune', 0):.1f}", f"{t.get('fit', 0) + t.get('train', 0):.1f}",
                     f"{t.get('evaluate', 0):.2f}", img_s, device])
        base = r.get("baseline") or {}
        if base:
            bt = base["test"]
            rows.append([m.key, f"logistic regression (C={base['C']:.3g})",
                         f"{_pct(bt['top1'])} {_ci(bt['top1_ci95'])}", _pct(bt["top5"]), f"{bt['macro_f1']:.4f}",
                         _pct(base["val"]["top1"]), *common, f"{t.get('baseline', 0):.1f}", "", "", img_s, device])
    return Table(header, rows, "Test top-1 with its 95% bootstrap interval; val top-1 is the best trial's (tuned head) "
                 "or the swept C's (baseline), a fine-tuned model's best epoch's. Seconds are wall time per stage "
                 "(the baseline's C sweep, refit and scoring together under tune s; fine-tuning under fit s); img/s "
                 "is extraction throughput (\"cached\": features came from the cache).")


def _ladder_section(models: list[ModelRun], comps: list[dict[str, Any]], assets: _Assets) -> Section | None:
    """Frozen, parameter-efficient and full fine-tuning per backbone: accuracy with intervals against training
    cost, and each method's paired test against the frozen head of its backbone."""
    tuned = [m for m in models if m.result.get("method", "frozen") != "frozen"]
    if not tuned:
        return None
    paired = {(c["a"], c["b"]): c for c in comps}
    rungs: dict[str, list[tuple[str, float, tuple[float, float], float]]] = {}
    rows: list[list[Cell]] = []
    prefix = {m.key: m.key[: -len(m.label)] for m in models}  # "<run>/" when several runs are combined
    for m in models:
        r = m.result
        method = r.get("method", "frozen")
        base_key = m.key if method == "frozen" else prefix[m.key] + r["training"]["base"]
        if method == "frozen" and not any(prefix[t.key] + t.result["training"]["base"] == m.key for t in tuned):
            continue
        t = r.get("training") or {}
        cost = _seconds(r) if method == "frozen" else float(t.get("search_wall_s") or t.get("train_wall_s", 0.0))
        rungs.setdefault(base_key, []).append((method, r["test"]["top1"], tuple(r["test"]["top1_ci95"]), cost))
        c = paired.get((m.key, base_key))
        delta = (f"{c['delta_top1'] * 100:+.2f} [{c['delta_top1_ci95'][0] * 100:+.2f}, "
                 f"{c['delta_top1_ci95'][1] * 100:+.2f}], p = {c['mcnemar_p']:.3g}") if c else "-"
        params = (f"{t['trainable_params'] / 1e6:.3f}M ({t['trainable_params'] / t['total_params']:.1%})" if t else
                  f"the {r['head'].get('kind', '?')} head on cached features")
        rows.append([base_key, method, params, f"{_pct(r['test']['top1'])} {_ci(r['test']['top1_ci95'])}", delta,
                     f"{cost:.0f}", f"{t['train_img_s']:.1f}" if t else "-",
                     f"{t['peak_memory_mb']:.0f}" if t else "-", f"{t['best_epoch']}/{t['epochs_run']}" if t else "-"])
    png = plots.ladder(rungs)
    return Section("ladder", "Fine-tuning ladder", [
        "How much does fine-tuning add, and at what cost? Every method trained on the same training split, chose "
        "its best epoch (and its recipe, with finetune.trials) on the same validation split, and was scored once on "
        "the same test images through the same inference path as the frozen head; differences are paired "
        "(bootstrap interval and exact McNemar p against the frozen head of the same backbone). Training cost is "
        "wall time on the machine that ran it (a fine-tuned rung: every configuration its search trained; the frozen "
        "rung: extraction + head search + refit). The frozen head is refit on train + validation, a fine-tuned "
        "model trains on train only (validation picks its epoch): the comparison leans against fine-tuning."], [
        Figure(assets.add("ladder.png", png, "fine-tuning ladder"), "Accuracy against training cost"),
        Table(["backbone", "method", "trained parameters", "test top-1 [95% CI]", "vs frozen (points, 95% CI)",
               "train wall s", "train img/s", "peak MB", "best/run epochs"], rows)])


def _points(models: list[ModelRun]) -> list[plots.ModelPoint]:
    out = []
    for m in models:
        r, base = m.result, m.result.get("baseline") or {}
        out.append(plots.ModelPoint(
            key=m.key, top1=r["test"]["top1"], ci=tuple(r["test"]["top1_ci95"]), gflops=float(r["gflops"]),
            seconds=_seconds(r), baseline_top1=base["test"]["top1"] if base else None,
            baseline_ci=tuple(base["test"]["top1_ci95"]) if base else None,
        ))
    return out


def _recall(m: ModelRun, rows: np.ndarray) -> np.ndarray:
    """Per-class accuracy over the given test rows (NaN for classes without images there)."""
    n = len(m.classes)
    y, pred = m.y_true[rows], m.y_pred[rows]
    support = np.bincount(y, minlength=n).astype(float)
    hits = np.bincount(y[pred == y], minlength=n).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / support, np.nan)


def _per_breed_section(a: ModelRun, b: ModelRun, assets: _Assets, colours: dict[str, str]) -> Section:
    ia, ib = aligned(a, b)
    ra, rb = _recall(a, ia), _recall(b, ib)
    keep = np.isfinite(ra) & np.isfinite(rb)
    names = [n for n, k in zip(display_names(a.classes), keep, strict=True) if k]
    ra, rb = ra[keep], rb[keep]
    scatter = assets.add("per-breed-scatter.png", plots.per_breed_scatter(names, ra, rb, a.key, b.key, colours),
                         f"per-breed accuracy, {a.key} against {b.key}")
    bars = assets.add("per-breed-differences.png",
                      plots.breed_differences(names, ra, rb, a.key, b.key, colours),
                      "breeds where the models differ most")
    diff = rb - ra
    order = np.argsort(diff, kind="stable")
    leaders = [i for i in order[::-1][:5] if diff[i] > 0] + [i for i in order[:5] if diff[i] < 0]
    rows: list[list[Cell]] = [[names[i], _pct(ra[i]), _pct(rb[i]), f"{diff[i] * 100:+.1f}"] for i in leaders]
    return Section(
        "per-breed", "Per-breed accuracy",
        [f"One point per breed: {a.key}'s accuracy on that breed's test images against {b.key}'s. Points above "
         f"the diagonal are breeds where {b.key} is better. Per-breed figures rest on few images each (about "
         f"{int(round(len(ia) / max(len(names), 1)))} per breed here), so single breeds move by whole images."],
        [Figure(scatter, "Per-breed accuracy"), Figure(bars, "Largest per-breed differences"),
         Table(["breed", a.key, b.key, f"{b.key} - {a.key} (points)"], rows or [["(no breed differs)", "", "", ""]],
               "The five breeds where each model leads most")],
    )


def _confusion_section(models: list[ModelRun], assets: _Assets, *, pairs: int) -> Section:
    section = Section("confusion", "Confusions", [
        "Errors only (each row is a true breed, normalised by its test images; correct predictions are left out), "
        "breeds ordered so that breeds confused with each other sit together. Then the most-confused pairs with a "
        "misclassified test photo and a correctly classified photo of the breed it was taken for."])
    for m in models:
        names = display_names(m.classes)
        n = len(m.classes)
        confusion = np.bincount(m.y_true * n + m.y_pred, minlength=n * n).reshape(n, n)
        img = assets.add(f"confusion-{m.key}.png", plots.confusion_figure(names, confusion, m.key),
                         f"confusion matrix of {m.key}", wide=n > 40)
        section.blocks.append(Figure(img, f"{m.key}: confusion matrix ({n} classes)"
                                     + ("; shown at full size, scroll sideways" if n > 40 else "")))
        if pairs <= 0:
            continue
        off = confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:pairs]
        rows: list[list[Cell]] = []
        for t, p in (divmod(int(i), n) for i in flat):
            if off[t, p] == 0:
                break
            wrong = np.flatnonzero((m.y_true == t) & (m.y_pred == p))
            right = np.flatnonzero((m.y_true == p) & (m.y_pred == p))
            wrong_img = assets.thumbnail(m.paths[wrong[0]], f"{names[t]} taken for {names[p]}", 120) if len(wrong) \
                else None
            right_img = assets.thumbnail(m.paths[right[0]], f"a {names[p]}", 120) if len(right) else None
            support = int((m.y_true == t).sum())
            rows.append([names[t], names[p], f"{off[t, p]} of {support}", wrong_img or "(image not readable)",
                         right_img or "(no correctly classified example)"])
        if rows:
            section.blocks.append(Table(["true breed", "taken for", "test images", "misclassified photo",
                                         "the breed it was taken for"], rows, f"{m.key}: most-confused breed pairs"))
    return section


def _tuning_section(models: list[ModelRun], assets: _Assets) -> Section:
    section = Section("tuning", "Head search (Optuna)", [
        "Validation top-1 of every trial of the head search (hollow: pruned, shown at its last epoch) and the best "
        "so far; then fANOVA importance of each hyper-parameter. Tuning used the validation split carved from the "
        "training images, never the test images."])
    for m in models:
        study = m.study
        if study is None or not study.trials:
            note = study.note if study else "no Optuna study recorded for this model"
            section.paragraphs.append(f"{m.key}: {note}.")
            continue
        trials = study.trials
        numbers = np.array([t.number for t in trials])
        values = np.array([np.nan if t.value is None else t.value for t in trials], dtype=float)
        hist = plots.optimisation_history(numbers, values, [t.state for t in trials], [t.head for t in trials], m.key)
        section.blocks.append(Figure(assets.add(f"optuna-history-{m.key}.png", hist, f"{m.key} optimisation history"),
                                     f"{m.key}: {len(trials)} trials, "
                                     f"{sum(t.state == 'COMPLETE' for t in trials)} complete, "
                                     f"{sum(t.state == 'PRUNED' for t in trials)} pruned"))
        if study.importance:
            n_complete = sum(t.state == "COMPLETE" for t in trials)
            imp = plots.parameter_importance(study.importance, m.key, n_complete)
            section.blocks.append(Figure(assets.add(f"optuna-importance-{m.key}.png", imp,
                                                    f"{m.key} hyper-parameter importance"),
                                         f"{m.key}: hyper-parameter importance, fANOVA over {n_complete} complete "
                                         "trials; parameters that only some heads have (MLP width, depth) are left "
                                         "out when a complete trial lacks them"))
        elif study.note:
            section.paragraphs.append(f"{m.key}: {study.note}.")
    return section


def _efficiency_section(runs: list[RunFolder], assets: _Assets, colours: dict[str, str]) -> Section | None:
    """The data-efficiency curves of every run that has them, in one figure, and their table."""
    curves: dict[str, Any] = {}
    rows: list[list[Cell]] = []
    for run in runs:
        d = run.results.get("data_efficiency") or {}
        for label, per_k in (d.get("models") or {}).items():
            key = f"{run.name}/{label}" if len(runs) > 1 else label
            curves[key] = per_k
            rows += [[key, k, f"{_pct(p['tuned']['mean'])} +- {p['tuned']['std'] * 100:.2f}",
                      f"{_pct(p['baseline']['mean'])} +- {p['baseline']['std'] * 100:.2f}" if "baseline" in p else "-",
                      str(len(p["tuned"]["runs"]))] for k, p in per_k.items()]
    if not curves:
        return None
    d = next(r.results["data_efficiency"] for r in runs if r.results.get("data_efficiency", {}).get("models"))
    png = plots.data_efficiency(curves, colours)
    return Section("efficiency", "Data efficiency", [
        f"How many labelled photos per breed does each backbone need? Test top-1 with k training images per class "
        f"(drawn from the training split with {d['seeds']} seeds; the validation split stays whole for choosing C "
        f"and tuning), for a head tuned with {d['trials']} trials and for the logistic-regression baseline, on the "
        "cached features. Bands span the seeds."],
        [Figure(assets.add("data-efficiency.png", png, "data efficiency curves"), "Accuracy against images per class"),
         Table(["model", "images per class", "tuned head (mean +- sd, points)", "baseline", "seeds"], rows)])


def _seeds_section(runs: list[RunFolder]) -> Section | None:
    """Each run's repetition over seeds: every model's spread, and every comparison's per-seed difference."""
    repeated = [(r, r.results["seeds"]) for r in runs if (r.results.get("seeds") or {}).get("n", 1) > 1]
    if not repeated:
        return None
    section = Section("seeds", "Seeds", [
        "Does the verdict survive another seed? The validation split, the head search, the refit and the test "
        "scoring were repeated with other seeds on the cached features (seed 0 is the run above); the test images "
        "are the same in every repetition."])
    for run, s in repeated:
        prefix = f"{run.name}/" if len(runs) > 1 else ""
        rows: list[list[Cell]] = []
        for label, t in s["models"].items():
            for method, name in (("tuned", "tuned head"), ("baseline", "baseline")):
                if method in t:
                    v = t[method]
                    per_seed = " ".join(f"{x * 100:.2f}" for x in v["values"])
                    rows.append([prefix + label, name, _pct(v["mean"]), f"{v['std'] * 100:.2f}",
                                 f"{_pct(v['min'])} .. {_pct(v['max'])}", per_seed])
        section.blocks.append(Table(["model", "method", "mean test top-1", "sd (points)", "range", "per seed"], rows,
                                    f"{s['n']} seeds"))
        for c in s["comparisons"]:
            d = c["delta"]
            section.paragraphs.append(
                f"{prefix}{c['a']} - {prefix}{c['b']}: {d['mean'] * 100:+.2f} points on average over {s['n']} seeds "
                f"(sd {d['std'] * 100:.2f}, range {d['min'] * 100:+.2f} to {d['max'] * 100:+.2f}); {c['a']} is "
                f"ahead in {c['a_better_in']} of them, {c['b']} in {c['b_better_in']}.")
    return section


def _extra_test_section(runs: list[RunFolder]) -> Section | None:
    """Each second test set (data.extra_test): every model's scores on it and the paired comparisons there."""
    if not any(r.results.get("extra_test") for r in runs):
        return None
    section = Section("extra-test", "Second test sets", [
        "Does it hold on other photos? Each second test set is scored by the same tuned heads (calibrated) and "
        "baselines as the test split; its class folders carry the dataset's class names. Not used for anything "
        "but these scores."])
    for run in runs:
        prefix = f"{run.name}/" if len(runs) > 1 else ""
        for name, info in (run.results.get("extra_test") or {}).items():
            rows: list[list[Cell]] = []
            for label, r in run.results["models"].items():
                e = (r.get("extra_test") or {}).get(name)
                if not e:
                    continue
                base = e.get("baseline")
                rows.append([prefix + label, f"{_pct(e['top1'])} {_ci(e['top1_ci95'])}", _pct(e["top5"]),
                             f"{e['macro_f1']:.4f}", f"{e['calibration']['ece']:.4f}",
                             f"{_pct(base['top1'])} {_ci(base['top1_ci95'])}" if base else "-"])
            section.blocks.append(Table(["model", "top-1 [95% CI]", "top-5", "macro-F1", "ECE", "baseline top-1"],
                                        rows, f"{name}: {info['n']} images ({info['root']}), {info['skipped']} "
                                              "unreadable skipped"))
            section.paragraphs += [f"On {name}: {verdict(c)}" for c in info.get("comparisons") or []]
    return section


def _calibration_section(models: list[ModelRun], assets: _Assets) -> Section | None:
    """ECE, NLL and Brier per model before and after temperature scaling, and the reliability diagrams."""
    calibrated = [m for m in models if (m.result.get("calibration") or {}).get("reliability")]
    if not calibrated:
        return None
    section = Section("calibration", "Calibration", [
        "Are the probabilities trustworthy? Expected calibration error (15 equal-width confidence bins), negative "
        "log-likelihood and Brier score on the test images, before and after temperature scaling. The temperature "
        "was fitted on the validation split (by the tuned head trained on train only), never on test; it changes no "
        "prediction, only how sure each one is. dogbench predict and the grid below show the calibrated "
        "probabilities."])
    rows: list[list[Cell]] = []
    for m in calibrated:
        cal = m.result["calibration"]
        before, after = cal["test"]["before"], cal["test"]["after"]
        rows.append([m.key, f"{cal['temperature']:.3f}", f"{before['ece']:.4f}", f"{after['ece']:.4f}",
                     f"{before['nll']:.4f}", f"{after['nll']:.4f}", f"{before['brier']:.4f}", f"{after['brier']:.4f}"])
        png = plots.reliability_diagram(cal["reliability"]["before"], cal["reliability"]["after"], m.key,
                                        cal["temperature"])
        section.blocks.append(Figure(assets.add(f"reliability-{m.key}.png", png, f"{m.key} reliability diagram"),
                                     f"{m.key}: reliability diagram on the test images (bars: accuracy per "
                                     "confidence bin; the dashed diagonal is perfect calibration)"))
    section.blocks.insert(0, Table(["model", "temperature", "ECE before", "ECE after", "NLL before", "NLL after",
                                    "Brier before", "Brier after"], rows,
                                   "Test calibration before and after temperature scaling (lower is better)"))
    return section


def _prediction_lines(m: ModelRun, row: int) -> list[Line]:
    truth = m.y_true[row]
    names = display_names(m.classes)
    out = []
    for rank, i in enumerate(np.argsort(-m.proba[row], kind="stable")[:3]):
        mark = ("right" if i == truth else "wrong") if rank == 0 else ""
        out.append(Line(f"{m.key}: {names[i]} {m.proba[row, i] * 100:.0f}%" + (f" ({mark})" if mark else ""),
                        (i == truth) if rank == 0 else None))
    return out


def _examples_section(models: list[ModelRun], ids: list[str], assets: _Assets) -> Section:
    first = models[0]
    names = display_names(first.classes)
    index = [{sid: i for i, sid in enumerate(m.sample_ids)} for m in models]
    cards = []
    for sid in ids:
        row = index[0][sid]
        lines = [line for m, idx in zip(models, index, strict=True) if sid in idx
                 for line in _prediction_lines(m, idx[sid])]
        img = assets.thumbnail(first.paths[row], f"test image {sid}")
        cards.append(Card(img, f"true: {names[first.y_true[row]]}", lines))
    return Section("predictions", "Test predictions, right and wrong", [
        "Test images drawn (seeded) from each agreement group of the first two models: both right, only one right, "
        "both wrong. Each model's top-3 breeds with their probabilities."], [Cards(cards)])


def _explanations_section(runs: list[RunFolder], assets: _Assets, notes: Sequence[str] = ()) -> Section | None:
    records = [(run, r) for run in runs for r in run.explanations]
    if not records and not notes:
        return None
    section = Section("explanations", "Where the models look", [
        "The same test images through each model: attention rollout for ViTs (attention of the class token, heads "
        "averaged with the identity added, multiplied through the layers) and Grad-CAM for CNNs (gradients of the "
        "predicted breed's score at the last convolutional stage), overlaid on the image as the model sees it "
        "(after its resize and centre crop)."])
    seen: set[tuple[str, str]] = set()
    for run, record in records:  # one record per (image, model); the side-by-side figure holds them all
        figure = record["figure"]
        png = run.path / EXPLANATIONS_DIR / figure
        if (run.name, figure) in seen or not png.is_file():
            continue
        seen.add((run.name, figure))
        img = assets.add(f"explain-{Path(figure).name}", png.read_bytes(),
                         f"explanations for {record.get('sample_id') or record['image']}")
        section.blocks.append(Figure(img, record.get("caption") or Path(record["image"]).name))
    section.paragraphs += list(notes)
    return section if section.blocks or notes else None


def _architecture_section(models: list[ModelRun]) -> Section | None:
    rows: list[list[Cell]] = []
    for m in models:
        arch = m.result.get("architecture") or {}
        if not arch:
            continue

        def cell(k: str, arch: dict[str, Any] = arch) -> str:
            v = arch.get(k)
            return "" if v is None else "x".join(map(str, v)) if isinstance(v, list) else str(v)

        layers = cell("layers") + (f" ({'-'.join(map(str, arch['stages']))})" if arch.get("stages") else "")
        pre = m.result.get("pretraining", "") + (" - leaky, see the caveat" if m.result.get("leaky") else "")
        rows.append([m.key, m.result["backbone"], str(arch.get("family", "")), layers, cell("hidden_size"),
                     cell("mlp_size"), cell("heads"), cell("patch_size"), cell("image_size"),
                     f"{m.result['params'] / 1e6:.1f}M", pre])
    if not rows:
        return None
    return Section("models", "The backbones", [
        "Read off the models the run loaded (timm), not from a slide: layers are transformer blocks (ViT) or "
        "residual blocks per stage (CNN); parameters without a classifier. The command dogbench models prints the "
        "ViT paper's Base/Large/Huge table the same way."],
        [Table(["model", "timm tag", "family", "layers", "hidden size D", "MLP size", "heads", "patch", "input",
                "params", "pretraining"], rows)])


def _caveats(runs: list[RunFolder]) -> list[str]:
    out = []
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        leaky = [f"{k} ({m['pretraining']})" for k, m in run.results["models"].items() if m.get("leaky")]
        if leaky:
            out.append(f"{prefix}Stanford Dogs is a subset of ImageNet, and {', '.join(leaky)} "
                       f"{'was' if len(leaky) == 1 else 'were'} pretrained on ImageNet-family data: some test photos "
                       "may have been seen in pretraining, so these accuracies may be optimistic (flag \"leaky\" in "
                       "results.json). The comparison between equally exposed models is still fair.")
        random = [k for k, m in run.results["models"].items() if m.get("weights") == "random"]
        if random:
            out.append(f"{prefix}{', '.join(random)} use randomly initialised weights: a smoke test, not a finding.")
        ds = run.results["dataset"]
        if ds.get("name") == STANFORD_DOGS and ds.get("split_source") != "official-lists":
            out.append(f"{prefix}Stanford Dogs without its official lists: the train/test split was drawn with a seed "
                       f"({ds.get('split_source')}), so the figures are not comparable with published ones.")
        if ds.get("skipped"):
            out.append(f"{prefix}{ds['skipped']} unreadable images were skipped (listed in results.json).")
    return out


def _verdicts(runs: list[RunFolder], comps: list[dict[str, Any]], models: list[ModelRun]) -> list[str]:
    """Each run's headline comparison (its first two backbones), then models of the same label across runs."""
    out = []
    for run in runs:
        c = run.results.get("comparison")
        if c:
            prefix = f"{run.name}: " if len(runs) > 1 else ""
            if len(runs) > 1:
                c = {**c, "a": f"{run.name}/{c['a']}", "b": f"{run.name}/{c['b']}"}
            out.append(prefix + verdict(c))
    tuned = {m.key: m.result["training"]["base"] for m in models if m.result.get("method", "frozen") != "frozen"}
    for c in comps:
        if c.get("across_runs") and c["a"].split("/", 1)[1] == c["b"].split("/", 1)[1]:
            out.append("Across runs: " + verdict(c))
        elif c["a"] in tuned and c["b"].endswith(tuned[c["a"]]) and not c.get("across_runs"):
            out.append("Fine-tuning: " + verdict(c))
    if not out:
        out = ["Only one model: nothing to compare." if len(models) < 2 else
               f"{len(models)} models, but no two of them scored the same test images with the same classes: "
               "nothing to compare pairwise."]
    return out


def headline(runs: list[RunFolder]) -> tuple[list[str], list[str]]:
    """The report's verdict sentences and caveats (the ImageNet overlap among them), without building the rest:
    what ``dogbench serve`` puts on its page."""
    return _verdicts(runs, comparisons(runs), all_models(runs)), _caveats(runs)


def _family(m: ModelRun) -> str:
    return str((m.result.get("architecture") or {}).get("family", ""))


def _comparable_pair(models: list[ModelRun]) -> tuple[ModelRun, ModelRun] | None:
    """Two models with the same classes and test images in common: the first CNN / ViT pair (CNN first, so points
    above the diagonal are breeds where the ViT is better), else the first pair in run and config order."""
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]
             if a.classes == b.classes and len(aligned(a, b)[0])]
    for a, b in pairs:
        if {_family(a), _family(b)} == {"cnn", "vit"}:
            return (a, b) if _family(a) == "cnn" else (b, a)
    return pairs[0] if pairs else None


def build_report(runs: list[RunFolder], *, examples: int = 12, confused_pairs: int = 8, seed: int = 0,
                 notes: Sequence[str] = ()) -> Report:
    """Everything the report shows, from loaded run folders."""
    models = all_models(runs)
    colours = plots.palette([m.key for m in models])
    assets = _Assets()
    comps = comparisons(runs)
    verdicts = _verdicts(runs, comps, models)
    sections = [Section("summary", "Summary", [], [_summary_table(models)])]
    if len(comps) > 1:
        rows: list[list[Cell]] = [[c["a"], c["b"], f"{c['delta_top1'] * 100:+.2f}",
                                   f"[{c['delta_top1_ci95'][0] * 100:+.2f}, {c['delta_top1_ci95'][1] * 100:+.2f}]",
                                   f"{c['mcnemar_p']:.3g}", str(c["n"])] for c in comps]
        sections[0].blocks.append(Table(["a", "b", "a - b (points)", "95% CI", "McNemar p", "test images"], rows,
                                        "Every paired comparison (same test images)"))
    points = _points(models)
    sections.append(Section("accuracy", "Accuracy and compute", [
        "Test top-1 per model with its 95% bootstrap interval (hollow: the logistic-regression baseline on the same "
        "features), then against the forward pass's GFLOPs and the wall time of the model's stages (extraction, "
        "tuning, baseline, refit, evaluation; extraction counts 0 when the features came from the cache)."], [
        Figure(assets.add("accuracy.png", plots.accuracy_intervals(points, colours), "accuracy with intervals"),
               "Accuracy with intervals"),
        Figure(assets.add("accuracy-vs-compute.png", plots.accuracy_vs_compute(points, colours),
                          "accuracy against compute"), "Accuracy against compute"),
    ]))
    pair = _comparable_pair(models)
    if pair is not None:
        sections.append(_per_breed_section(*pair, assets, colours))
    sections.append(_confusion_section(models, assets, pairs=confused_pairs))
    ladder = _ladder_section(models, comps, assets)
    if ladder is not None:
        sections.append(ladder)
    sections.append(_tuning_section([m for m in models if m.result.get("method", "frozen") == "frozen"], assets))
    for extra in (_seeds_section(runs), _efficiency_section(runs, assets, colours), _extra_test_section(runs),
                  _calibration_section(models, assets)):
        if extra is not None:
            sections.append(extra)
    ids = select_examples(models, n=examples, seed=seed)
    if ids:
        sections.append(_examples_section(models, ids, assets))
    for extra in (_explanations_section(runs, assets, notes), _architecture_section(models)):
        if extra is not None:
            sections.append(extra)
    sections.append(_details_section(runs))
    datasets = sorted({r.results["dataset"]["name"] for r in runs})
    ds = runs[0].results["dataset"]
    subtitle = (f"{', '.join(datasets)}: {ds['n_train']} train / {ds['n_val']} val / {ds['n_test']} test images, "
                f"{ds['n_classes']} classes" + (f"; {len(runs)} runs combined" if len(runs) > 1 else ""))
    title = "dogbench: " + " vs ".join(m.key for m in models)
    return Report(title, subtitle, verdicts, _caveats(runs), sections, assets.files)


def _details_section(runs: list[RunFolder]) -> Section:
    rows: list[list[Cell]] = []
    for run in runs:
        env = run.results.get("environment", {})
        rows.append([run.name, str(run.path), run.results.get("created", ""),
                     ", ".join(f"{k} {v}" for k, v in env.items()),
                     f"{run.results.get('timing_s', {}).get('total', 0):.1f} s"])
    return Section("details", "Runs", ["Each run folder holds config.json (the resolved configuration), "
                                       "results.json, results.csv and the predictions behind every figure here."],
                   [Table(["run", "folder", "created", "environment", "total wall time"], rows)])


# ---------------------------------------------------------------- writers


def _data_uri(name: str, data: bytes) -> str:
    mime = "image/png" if name.endswith(".png") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(report: Report) -> str:
    env = Environment(loader=PackageLoader("dogbench.report", "templates"), autoescape=True)
    env.filters["data_uri"] = lambda image: _data_uri(image.name, report.files[image.name])
    env.tests["image"] = lambda x: isinstance(x, Image)
    env.tests["lines"] = lambda x: isinstance(x, list)
    env.tests["figure"] = lambda x: isinstance(x, Figure)
    env.tests["table"] = lambda x: isinstance(x, Table)
    env.tests["cards"] = lambda x: isinstance(x, Cards)
    return env.get_template("report.html.j2").render(report=report)


def _md_escape(text: str) -> str:
    """Text that Markdown shows as it is: table pipes, emphasis, links and HTML characters escaped."""
    for ch in "\\`*_[]<>|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Image):
        return f"![{_md_escape(cell.alt)}]({FILES_DIR}/{cell.name})"
    if isinstance(cell, list):
        return "<br>".join(_md_escape(("✔ " if x.ok else "✘ " if x.ok is False else "") + x.text) for x in cell)
    return _md_escape(cell)


def _md_table(table: Table) -> list[str]:
    out = [f"*{_md_escape(table.caption)}*", ""] if table.caption else []
    out += ["| " + " | ".join(_md_escape(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return [*out, ""]


def render_markdown(report: Report) -> str:
    lines = [f"# {_md_escape(report.title)}", "", f"{_md_escape(report.subtitle)}  ",
             f"dogbench {report.version}, {report.created}", ""]
    for v in report.verdicts:
        lines += [f"**{_md_escape(v)}**", ""]
    for c in report.caveats:
        lines += [f"> **Caveat.** {_md_escape(c)}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for p in section.paragraphs:
            lines += [_md_escape(p), ""]
        for block in section.blocks:
            if isinstance(block, Figure):
                lines += [_md_cell(block.image), "", f"*{_md_escape(block.caption)}*", ""]
            elif isinstance(block, Table):
                lines += _md_table(block)
            else:
                table = Table(["image", "truth", "predictions (top-3)"],
                              [[c.image or "(image not readable)", c.title, c.lines] for c in block.cards])
                lines += _md_table(table)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    files_dir: Path
    verdicts: list[str]


def write_report(report: Report, out_dir: Path) -> ReportFiles:
    """``report.html`` (self-contained), ``report.md`` and ``report_files/`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    files_dir = out_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    for name, data in report.files.items():
        atomic_write_bytes(files_dir / name, data)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_text(out_dir / "report.html", render_html(report))
    atomic_write_text(out_dir / "report.json", json.dumps({"title": report.title, "verdicts": report.verdicts,
                                                           "caveats": report.caveats,
                                                           "sections": [s.title for s in report.sections],
                                                           "files": sorted(report.files)}, indent=2) + "\n")
    return ReportFiles(out_dir / "report.html", out_dir / "report.md", files_dir, report.verdicts)


def make_report(run_dirs: Sequence[Path], out_dir: Path, *, examples: int = 12, confused_pairs: int = 8,
                seed: int = 0, notes: Sequence[str] = ()) -> ReportFiles:
    """Load run folders, build the report, write it into ``out_dir``; ``notes`` say what could not be explained."""
    runs = load_runs([Path(d) for d in run_dirs])
    report = build_report(runs, examples=examples, confused_pairs=confused_pairs, seed=seed, notes=notes)
    return write_report(report, out_dir)


__all__ = ["Report", "ReportFiles", "build_report", "make_report", "render_html", "render_markdown", "write_report"]
