"""The sections every report has: the summary, accuracy, per-breed accuracy, confusions, calibration, example
predictions, explanations, the backbones and the run folders. No torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from dogbench.data import display_names
from dogbench.names import model_name
from dogbench.report import plots
from dogbench.report.document import Assets, Card, Cards, Cell, Figure, Line, Section, Table
from dogbench.report.runs import ModelRun, RunFolder, aligned
from dogbench.report.why import same_as_probe
from dogbench.rundir import EXPLANATIONS_DIR


def pct(x: float) -> str:
    """0.8123 -> "81.23%"."""
    return f"{x * 100:.2f}%"


def interval(ci: Sequence[float]) -> str:
    """A (low, high) fraction interval in percent: "[80.10, 82.30]"."""
    return f"[{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]"


def stage_seconds(result: dict[str, Any]) -> float:
    """Wall seconds of a model's stages (extraction, search, baseline, refit or training, evaluation)."""
    t = result.get("timing_s", {})
    return sum(float(t.get(k, 0.0)) for k in ("extract", "tune", "baseline", "fit", "train", "evaluate"))


def _method(result: dict[str, Any]) -> str:
    """How the model was trained, in words: "tuned mlp head", "lora fine-tuning"."""
    method = result.get("method", "frozen")
    if method == "frozen":
        return f"tuned {result.get('head', {}).get('kind', '?')} head"
    return f"{method} fine-tuning"


def _balanced(test: dict[str, Any]) -> str:
    """Balanced top-1 as a percentage; "-" for results written before it was recorded."""
    return pct(test["balanced_top1"]) if "balanced_top1" in test else "-"


def _summary_table(models: list[ModelRun]) -> Table:
    header = ["model", "method", "test top-1 [95% CI]", "top-5", "macro-F1", "bal. top-1", "val top-1", "params",
              "GFLOPs",
              "extract s", "tune s", "fit s", "eval s", "img/s", "device"]
    rows: list[list[Cell]] = []
    for m in models:
        r = m.result
        t = r.get("timing_s", {})
        common = [f"{r['params'] / 1e6:.1f}M", f"{r['gflops']:.2f}", f"{t.get('extract', 0):.1f}"]
        img_s = f"{r['throughput_img_s']:.1f}" if r.get("throughput_img_s") else "cached"
        device = f"{r['device']} ({r['precision']})"
        test = r["test"]
        method = _method(r) + (" = the probe" if same_as_probe(r) else "")
        rows.append([m.key, method, f"{pct(test['top1'])} {interval(test['top1_ci95'])}",
                     pct(test["top5"]), f"{test['macro_f1']:.4f}", _balanced(test), pct(r["val"]["top1"]), *common,
                     f"{t.get('tune', 0):.1f}", f"{t.get('fit', 0) + t.get('train', 0):.1f}",
                     f"{t.get('evaluate', 0):.2f}", img_s, device])
        base = r.get("baseline") or {}
        if base:
            bt = base["test"]
            rows.append([m.key, f"logistic regression (C={base['C']:.3g})",
                         f"{pct(bt['top1'])} {interval(bt['top1_ci95'])}", pct(bt["top5"]), f"{bt['macro_f1']:.4f}",
                         _balanced(bt), pct(base["val"]["top1"]), *common, f"{t.get('baseline', 0):.1f}", "", "",
                         img_s, device])
    return Table(header, rows, "Test top-1 with its 95% bootstrap interval; bal. top-1 is balanced accuracy (the mean "
                 "per-class recall); val top-1 is the best trial's (tuned head) or the swept C's (baseline), a "
                 "fine-tuned model's best epoch's, in tune.metric when another is set. Seconds are wall time per stage "
                 "(the baseline's C sweep, refit and scoring together under tune s; fine-tuning under fit s); img/s "
                 "is extraction throughput (\"cached\": features came from the cache).")


def summary_section(models: list[ModelRun], comps: list[dict[str, Any]]) -> Section:
    """The summary table, and every paired comparison when there is more than one; a tuned head that scores
    exactly as its probe says that the search found nothing better."""
    same = [m for m in models if same_as_probe(m.result)]
    notes = [f"{m.key}: the head search's best trial, a tuned {m.result['head'].get('kind', '?')} head, scores "
             f"exactly as the logistic-regression probe with C swept on validation ({pct(m.result['test']['top1'])} "
             "test top-1): the search found nothing better than the probe." for m in same]
    section = Section("summary", "Summary", notes, [_summary_table(models)])
    if len(comps) > 1:
        holm = any("p_holm_all" in c for c in comps)
        rows: list[list[Cell]] = [[c["a"], c["b"], f"{c['delta_top1'] * 100:+.2f}",
                                   f"[{c['delta_top1_ci95'][0] * 100:+.2f}, {c['delta_top1_ci95'][1] * 100:+.2f}]",
                                   f"{c['mcnemar_p']:.3g}", *([f"{c['p_holm_all']:.3g}" if "p_holm_all" in c else "-"]
                                                            if holm else []), str(c["n"])] for c in comps]
        header = ["a", "b", "a - b (points)", "95% CI", "McNemar p", *(["Holm p (all pairs)"] if holm else []),
                  "test images"]
        section.blocks.append(Table(header, rows, "Every paired comparison (same test images)" + (
            "; Holm's correction over all the pairs of each run's models (pairs across runs: uncorrected, -)"
            if holm else "")))
    return section


def accuracy_section(models: list[ModelRun], assets: Assets, colours: dict[str, str]) -> Section:
    """Test top-1 with intervals, and against GFLOPs and stage wall time."""
    points = _points(models)
    return Section("accuracy", "Accuracy and compute", [
        "Test top-1 per model with its 95% bootstrap interval (hollow: the logistic-regression baseline on the same "
        "features), then against the forward pass's GFLOPs and the wall time of the model's stages (extraction, "
        "tuning, baseline, refit, evaluation; extraction counts 0 when the features came from the cache)."], [
        Figure(assets.add("accuracy.png", plots.png(plots.accuracy_intervals(points, colours)),
                          "accuracy with intervals"),
               "Accuracy with intervals"),
        Figure(assets.add("accuracy-vs-compute.png", plots.png(plots.accuracy_vs_compute(points, colours)),
                          "accuracy against compute"), "Accuracy against compute"),
    ])


def _points(models: list[ModelRun]) -> list[plots.ModelPoint]:
    out = []
    for m in models:
        r, base = m.result, m.result.get("baseline") or {}
        out.append(plots.ModelPoint(
            key=m.key, top1=r["test"]["top1"], ci=tuple(r["test"]["top1_ci95"]), gflops=float(r["gflops"]),
            seconds=stage_seconds(r), baseline_top1=base["test"]["top1"] if base else None,
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


def _family(m: ModelRun) -> str:
    """"cnn", "vit" or "" (unknown)."""
    return str((m.result.get("architecture") or {}).get("family", ""))


def comparable_pair(models: list[ModelRun]) -> tuple[ModelRun, ModelRun] | None:
    """Two models with the same classes and test images in common: the first CNN / ViT pair (CNN first, so points
    above the diagonal are breeds where the ViT is better), else the first pair in run and config order."""
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]
             if a.classes == b.classes and len(aligned(a, b)[0])]
    for a, b in pairs:
        if {_family(a), _family(b)} == {"cnn", "vit"}:
            return (a, b) if _family(a) == "cnn" else (b, a)
    return pairs[0] if pairs else None


LEADERS = 5  # breeds per model in the per-breed table


def per_breed_section(a: ModelRun, b: ModelRun, assets: Assets, colours: dict[str, str]) -> Section:
    """Per-breed accuracy of two models on their common test images, and the breeds where each leads most."""
    ia, ib = aligned(a, b)
    ra, rb = _recall(a, ia), _recall(b, ib)
    keep = np.isfinite(ra) & np.isfinite(rb)
    names = [n for n, k in zip(display_names(a.classes), keep, strict=True) if k]
    ra, rb = ra[keep], rb[keep]
    scatter = assets.add("per-breed-scatter.png",
                         plots.png(plots.per_breed_scatter(names, ra, rb, a.key, b.key, colours)),
                         f"per-breed accuracy, {a.key} against {b.key}")
    bars = assets.add("per-breed-differences.png",
                      plots.png(plots.breed_differences(names, ra, rb, a.key, b.key, colours)),
                      "breeds where the models differ most")
    return Section(
        "per-breed", "Per-breed accuracy",
        [f"One point per breed: {a.key}'s accuracy on that breed's test images against {b.key}'s. Points above "
         f"the diagonal are breeds where {b.key} is better. Per-breed figures rest on few images each (about "
         f"{int(round(len(ia) / max(len(names), 1)))} per breed here), so single breeds move by whole images."],
        [Figure(scatter, "Per-breed accuracy; the breeds that differ most are named where their names fit"),
         Figure(bars, "Largest per-breed differences"), leaders_table(names, ra, rb, a, b)],
    )


def leaders_table(names: Sequence[str], ra: np.ndarray, rb: np.ndarray, a: ModelRun, b: ModelRun) -> Table:
    """``LEADERS`` breeds per model, where it leads most (or trails least), in a column "winner - loser" whose
    sign reads like the verdict: the model with the higher accuracy on these images first."""
    (win, r_win), (lose, r_lose) = sorted(((a, ra), (b, rb)), key=lambda m: -float(np.mean(m[0].correct)))
    diff = r_win - r_lose
    order = np.argsort(-diff, kind="stable")
    k = min(LEADERS, len(names) // 2)
    rows: list[list[Cell]] = []
    for model, picks in ((win, order[:k]), (lose, order[::-1][:k])):
        rows += [[model.key, names[i], pct(r_win[i]), pct(r_lose[i]), f"{diff[i] * 100:+.1f}"] for i in picks]
    return Table(["best against the other", "breed", win.key, lose.key, f"{win.key} - {lose.key} (points)"], rows,
                 f"The {k} breeds where each model does best against the other; in {lose.key}'s rows, only a "
                 f"negative difference means {lose.key} leads, 0 is a tie and a positive one means {win.key} is "
                 "ahead even there.")


def confusion_section(models: list[ModelRun], assets: Assets, *, pairs: int) -> Section:
    """Each model's error matrix, then its ``pairs`` most-confused breed pairs with a photo of each side."""
    section = Section("confusion", "Confusions", [
        "Errors only (each row is a true breed, normalised by its test images; correct predictions are left out), "
        "breeds ordered so that breeds confused with each other sit together. Then the most-confused pairs with a "
        "misclassified test photo and a correctly classified photo of the breed it was taken for."])
    for m in models:
        names = display_names(m.classes)
        n = len(m.classes)
        confusion = np.bincount(m.y_true * n + m.y_pred, minlength=n * n).reshape(n, n)
        order = plots.breed_order(confusion)
        full = assets.add(f"confusion-{m.key}.png", plots.png(plots.confusion_figure(names, confusion, m.key, order)),
                          f"confusion matrix of {m.key}")
        if n > plots.FULL_SIZE_ABOVE:
            fitted = assets.add(f"confusion-{m.key}-fitted.png",
                                plots.png(plots.confusion_figure(names, confusion, m.key, order, fitted=True)),
                                f"confusion matrix of {m.key}, fitted to the page")
            section.blocks.append(Figure(fitted, f"{m.key}: confusion matrix ({n} classes); the most-confused "
                                                 "pairs are named below, every breed in the full-size matrix",
                                         full=full))
        else:
            section.blocks.append(Figure(full, f"{m.key}: confusion matrix ({n} classes)"))
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


def calibration_section(models: list[ModelRun], assets: Assets) -> Section | None:
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
        png = plots.png(plots.reliability_diagram(cal["reliability"]["before"], cal["reliability"]["after"], m.key,
                                                  cal["temperature"]))
        section.blocks.append(Figure(assets.add(f"reliability-{m.key}.png", png, f"{m.key} reliability diagram"),
                                     f"{m.key}: reliability diagram on the test images (bars: accuracy per "
                                     "confidence bin; the dashed diagonal is perfect calibration)"))
    section.blocks.insert(0, Table(["model", "temperature", "ECE before", "ECE after", "NLL before", "NLL after",
                                    "Brier before", "Brier after"], rows,
                                   "Test calibration before and after temperature scaling (lower is better)"))
    return section


def _prediction_lines(m: ModelRun, row: int) -> list[Line]:
    """One model's top-3 breeds of one test image, its first marked right or wrong."""
    truth = m.y_true[row]
    names = display_names(m.classes)
    out = []
    for rank, i in enumerate(np.argsort(-m.proba[row], kind="stable")[:3]):
        mark = ("right" if i == truth else "wrong") if rank == 0 else ""
        out.append(Line(f"{m.key}: {names[i]} {m.proba[row, i] * 100:.0f}%" + (f" ({mark})" if mark else ""),
                        (i == truth) if rank == 0 else None))
    return out


def examples_section(models: list[ModelRun], ids: list[str], assets: Assets) -> Section:
    """A card per test image ``ids``: the photo, its breed and every model's top-3."""
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


def explanations_section(runs: list[RunFolder], assets: Assets, notes: Sequence[str] = ()) -> Section | None:
    """The runs' explanations (``dogbench explain`` records): per photo, the photo and each model's overlay with
    its name, method and calibrated top-3, under one colour scale; ``notes`` say what was not explained."""
    section = Section("explanations", "Where the models look", [
        "The same test images through each model: attention rollout for ViTs (attention of the class token, heads "
        "averaged with the identity added, multiplied through the layers) and Grad-CAM for CNNs (gradients of the "
        "predicted breed's score at the last convolutional stage), overlaid on the image as the model sees it "
        "(after its resize and centre crop). Under each overlay, the model's top-3 breeds with the calibrated "
        "probabilities that dogbench predict gives. " + plots.READING_GUIDE])
    for run in runs:
        figures: dict[str, list[dict[str, Any]]] = {}
        for record in run.explanations:  # one record per (image, model)
            figures.setdefault(record["figure"], []).append(record)
        for figure, records in figures.items():
            png = _explanation_png(run, records)
            if png is None:
                continue
            img = assets.add(f"explain-{Path(figure).name}", png,
                             f"explanations for {records[0].get('sample_id') or records[0]['image']}")
            section.blocks.append(Figure(img, records[0].get("caption") or Path(records[0]["image"]).name))
    section.paragraphs += list(notes)
    return section if section.blocks or notes else None


def _explanation_png(run: RunFolder, records: list[dict[str, Any]]) -> bytes | None:
    """One photo's figure, drawn from the run's overlays; the stored side-by-side figure when an overlay is
    missing; None when neither is there."""
    folder = run.path / EXPLANATIONS_DIR
    overlays = [folder / r["png"] for r in records]
    if not all(o.is_file() for o in overlays):
        stored = folder / records[0]["figure"]
        return stored.read_bytes() if stored.is_file() else None
    panels: list[tuple[str, np.ndarray, Sequence[tuple[str, float]]]] = []
    try:
        with PILImage.open(records[0]["image"]) as photo:
            photo = photo.convert("RGB")
            photo.thumbnail((448, 448))
            panels.append(("photo", np.asarray(photo), ()))
    except (OSError, ValueError):
        pass  # a moved photo: the overlays still show the model's view of it
    for r, path in zip(records, overlays, strict=True):
        title = model_name(run.results["models"].get(r["label"], {"label": r["label"], "backbone": r["model"]})).title
        with PILImage.open(path) as overlay:
            panels.append((f"{r['label']}: {title}, {r['method']}", np.asarray(overlay.convert("RGB")),
                           [(name, float(p)) for name, p in r["top3"]]))
    return plots.png(plots.explanation_figure(panels, heatmaps_from=len(panels) - len(records)))


def architecture_section(models: list[ModelRun]) -> Section | None:
    """Each backbone's shape as the run loaded it (layers, widths, heads, patch, input, parameters)."""
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


def details_section(runs: list[RunFolder]) -> Section:
    """Where each run folder is, when it was made, on what, and how long it took."""
    rows: list[list[Cell]] = []
    for run in runs:
        env = run.results.get("environment", {})
        rows.append([run.name, str(run.path), run.results.get("created", ""),
                     ", ".join(f"{k} {v}" for k, v in env.items()),
                     f"{run.results.get('timing_s', {}).get('total', 0):.1f} s"])
    return Section("details", "Runs", ["Each run folder holds config.json (the resolved configuration), "
                                       "results.json, results.csv and the predictions behind every figure here."],
                   [Table(["run", "folder", "created", "environment", "total wall time"], rows)])
