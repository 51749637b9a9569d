"""The report's figures: one function per figure, data in, a matplotlib ``Figure`` out (``png`` makes the bytes);
no file or torch access. Every figure uses the constrained layout, keeps legends outside its axes and places data
labels with ``labels.place_labels``, so no text collides or crosses a border (tests/test_report_figures.py).

Colours follow one rule across figures: each model keeps its colour from ``palette``.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import leaves_list, linkage

from dogbench.report.labels import place_labels

DPI = 110
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
HEAD_COLOURS = ("#444444", "#e69f00", "#56b4e9", "#009e73")  # head kinds in the search plots, not models


def palette(keys: Sequence[str]) -> dict[str, str]:
    return {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(keys)}


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with the constrained layout, outside pyplot's global state."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def _legend_below(fig: Figure, ncols: int = 3) -> None:
    """The figure's legend under its axes, where it hides no data."""
    handles, labels = [], []
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)), fontsize=8,
                   frameon=False)


@dataclass(frozen=True)
class ModelPoint:
    """One model's headline numbers, as the accuracy figures need them."""

    key: str
    top1: float
    ci: tuple[float, float]
    gflops: float
    seconds: float  # wall time of extraction, tuning, the baseline, refit and evaluation
    baseline_top1: float | None = None
    baseline_ci: tuple[float, float] | None = None


def accuracy_intervals(points: Sequence[ModelPoint], colours: dict[str, str]) -> Figure:
    """Test top-1 with its 95% bootstrap interval per model; the logistic-regression baseline as a hollow marker."""
    fig = new_figure(7.5, 1.3 + 0.55 * len(points))
    ax = fig.add_subplot()
    for i, p in enumerate(points):
        y = len(points) - 1 - i
        ax.errorbar(p.top1 * 100, y, xerr=[[(p.top1 - p.ci[0]) * 100], [(p.ci[1] - p.top1) * 100]], fmt="o",
                    color=colours[p.key], capsize=4, ms=7, label="tuned head" if i == 0 else None)
        if p.baseline_top1 is not None and p.baseline_ci is not None:
            lo, hi = p.baseline_top1 - p.baseline_ci[0], p.baseline_ci[1] - p.baseline_top1
            ax.errorbar(p.baseline_top1 * 100, y - 0.25, xerr=[[lo * 100], [hi * 100]],
                        fmt="o", mfc="white", color=colours[p.key], capsize=3, ms=6, alpha=0.8,
                        label="logistic-regression baseline" if i == 0 else None)
    lows = [p.ci[0] for p in points] + [p.baseline_ci[0] for p in points if p.baseline_ci]
    highs = [p.ci[1] for p in points] + [p.baseline_ci[1] for p in points if p.baseline_ci]
    span = max(max(highs) - min(lows), 0.02) * 100
    ax.set_xlim(min(lows) * 100 - 0.05 * span, max(highs) * 100 + 0.2 * span)  # room for the values' labels
    for i, p in enumerate(points):
        ax.annotate(f"{p.top1 * 100:.1f}%", (p.ci[1] * 100, len(points) - 1 - i), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(range(len(points)), [p.key for p in reversed(points)])
    ax.set_xlabel("test top-1 (%), 95% bootstrap interval")
    ax.set_ylim(-0.7, len(points) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Accuracy with intervals")
    _legend_below(fig)
    return fig


def accuracy_vs_compute(points: Sequence[ModelPoint], colours: dict[str, str]) -> Figure:
    """Top-1 against GFLOPs per image and against the run's wall time, one marker per model."""
    fig = new_figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attr, xlabel in ((axes[0], "gflops", "GFLOPs per image (forward pass)"),
                             (axes[1], "seconds", "wall time of the model's stages\n(s; extraction 0 when cached)")):
        for p in points:
            ax.errorbar(max(getattr(p, attr), 1e-3), p.top1 * 100,
                        yerr=[[(p.top1 - p.ci[0]) * 100], [(p.ci[1] - p.top1) * 100]], fmt="o",
                        color=colours[p.key], capsize=3, ms=7)
        ax.set_xscale("log")
        ax.margins(x=0.35, y=0.25)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test top-1 (%)")
    fig.suptitle("Accuracy against compute")
    for ax, attr in ((axes[0], "gflops"), (axes[1], "seconds")):
        place_labels(ax, np.array([[max(getattr(p, attr), 1e-3), p.top1 * 100] for p in points]),
                     [p.key for p in points], fontsize=8)
    return fig


def ladder(rungs: dict[str, Sequence[tuple[str, float, tuple[float, float], float]]]) -> Figure:
    """The fine-tuning ladder: per backbone, test top-1 (95% interval) of each method against its training cost
    (wall seconds; the frozen rung's are extraction + head search + refit), methods joined in cost order."""
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    colours = palette(list(rungs))
    where, names = [], []
    for backbone, points in rungs.items():
        points = sorted(points, key=lambda p: p[3])
        xs = [max(p[3], 1e-3) for p in points]
        ax.plot(xs, [p[1] * 100 for p in points], "-", color=colours[backbone], alpha=0.5)
        for (method, top1, ci, _), x in zip(points, xs, strict=True):
            ax.errorbar(x, top1 * 100, yerr=[[(top1 - ci[0]) * 100], [(ci[1] - top1) * 100]], fmt="o",
                        color=colours[backbone], capsize=3, ms=7)
            where.append((x, top1 * 100))
            names.append(f"{backbone}/{method}")
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.2)
    ax.set_xlabel("training cost (wall s on this machine)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Fine-tuning ladder: accuracy against training cost")
    place_labels(ax, np.array(where), names, fontsize=8)
    return fig


def per_breed_scatter(
    names: Sequence[str], recall_a: np.ndarray, recall_b: np.ndarray, key_a: str, key_b: str, colours: dict[str, str],
    *, annotate: int = 8,
) -> Figure:
    """One point per breed: recall under ``a`` (x) against ``b`` (y), in the colour of the model that is better on
    it (grey: tied); the breeds where each leads most (``annotate`` in all) are named where their names fit."""
    fig = new_figure(6.5, 6.8)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.006, 0.006, size=(2, len(names)))  # recalls are multiples of 1/n_test: separate ties
    diff = recall_b - recall_a
    point_colours = [colours[key_b] if d > 0 else colours[key_a] if d < 0 else "grey" for d in diff]
    ax.scatter(recall_a * 100 + jitter[0] * 100, recall_b * 100 + jitter[1] * 100, s=18, alpha=0.65,
               c=point_colours, edgecolors="none")
    ax.plot([0, 100], [0, 100], color="grey", lw=1, ls="--")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel(f"{key_a}: per-breed accuracy (%)")
    ax.set_ylabel(f"{key_b}: per-breed accuracy (%)")
    above = int((diff > 0).sum())
    below = int((diff < 0).sum())
    tied = len(names) - above - below
    ax.set_title(f"Per-breed accuracy: {key_b} better on {above}, {key_a} on {below}, tied {tied}", fontsize=10)
    ax.grid(alpha=0.3)
    order = np.argsort(-diff, kind="stable")  # b's leads first: name both sides' largest, half each at most
    b_leads = [i for i in order[: annotate // 2] if diff[i] > 0]
    a_leads = [i for i in order[::-1] if diff[i] < 0][: annotate - len(b_leads)]
    picks = np.array(a_leads + b_leads, dtype=int)
    place_labels(ax, np.column_stack([recall_a[picks], recall_b[picks]]) * 100, [names[i] for i in picks])
    return fig


def breed_differences(
    names: Sequence[str], recall_a: np.ndarray, recall_b: np.ndarray, key_a: str, key_b: str, colours: dict[str, str],
    *, k: int = 10,
) -> Figure:
    """The ``k`` breeds where each model is furthest ahead of the other (accuracy points)."""
    diff = (recall_b - recall_a) * 100
    order = np.argsort(diff, kind="stable")
    picks = [i for i in order[:k] if diff[i] < 0] + [i for i in order[::-1][:k] if diff[i] > 0][::-1]
    fig = new_figure(7.5, 1.2 + 0.22 * max(len(picks), 1))
    ax = fig.add_subplot()
    ax.barh(range(len(picks)), [diff[i] for i in picks],
            color=[colours[key_b] if diff[i] > 0 else colours[key_a] for i in picks])
    ax.set_yticks(range(len(picks)), [names[i] for i in picks], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"accuracy difference (points): right = {key_b} better, left = {key_a} better")
    ax.set_title("Breeds where the models differ most")
    ax.grid(axis="x", alpha=0.3)
    return fig


def breed_order(confusion: np.ndarray) -> np.ndarray:
    """Class order that puts breeds confused with each other side by side (average-linkage on confusion rates)."""
    n = confusion.shape[0]
    if n < 3:
        return np.arange(n)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    sym = (rates + rates.T) / 2
    np.fill_diagonal(sym, 0)
    dist = 1 - sym / max(float(sym.max()), 1e-12)
    condensed = dist[np.triu_indices(n, 1)]
    return leaves_list(linkage(condensed, method="average"))


FULL_SIZE_ABOVE = 40  # classes: above this a confusion matrix is shown fitted to the page, full size on request


def confusion_figure(names: Sequence[str], confusion: np.ndarray, key: str, order: np.ndarray | None = None, *,
                     fitted: bool = False) -> Figure:
    """The errors of a confusion matrix (rows normalised, diagonal left out), breeds ordered so confusions cluster.

    Full size, every breed gets a tick label (120 classes: about 15 px a breed); ``fitted`` draws it at the page's
    width without breed names. The log colour scale keeps single confusions visible.
    """
    n = confusion.shape[0]
    order = breed_order(confusion) if order is None else order
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    errors = rates[np.ix_(order, order)].astype(float)
    np.fill_diagonal(errors, np.nan)
    errors[errors == 0] = np.nan
    side = 8.0 if fitted else float(np.clip(0.14 * n + 2.5, 6, 22))
    fig = new_figure(side + 1.4, side)
    ax = fig.add_subplot()
    finite = errors[np.isfinite(errors)]
    low = float(finite.min()) if finite.size else 0.01
    image = ax.imshow(errors, cmap="magma_r", norm=LogNorm(vmin=low, vmax=max(low * 1.01, 1.0)),
                      interpolation="nearest")
    if fitted:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"predicted breed ({n}, confused breeds side by side)")
        ax.set_ylabel(f"true breed ({n}, same order)")
    else:
        ticks = [names[i] for i in order]
        font = float(np.clip(700 / max(n, 1), 5.5, 10))
        ax.set_xticks(range(n), ticks, rotation=90, fontsize=font)
        ax.set_yticks(range(n), ticks, fontsize=font)
        ax.set_xlabel("predicted breed")
        ax.set_ylabel("true breed")
    ax.set_facecolor("#f7f7f7")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true breed's\ntest images (log scale)")
    ax.set_title(f"{key}: confusions\n(correct predictions left out)")
    return fig


def optimisation_history(numbers: np.ndarray, values: np.ndarray, states: Sequence[str], heads: Sequence[str],
                         key: str) -> Figure:
    """Validation top-1 per trial (pruned trials at their last epoch, hollow) and the best so far; trials on an
    integer axis, the legend beside the axes."""
    fig = new_figure(8.2, 3.8)
    ax = fig.add_subplot()
    head_colours = {h: HEAD_COLOURS[i % len(HEAD_COLOURS)] for i, h in enumerate(sorted(set(heads)))}
    complete = np.array([s == "COMPLETE" for s in states])
    has_value = np.isfinite(values)
    for head, colour in head_colours.items():
        is_head = np.array([h == head for h in heads])
        sel = complete & is_head & has_value
        if sel.any():
            ax.scatter(numbers[sel], values[sel] * 100, s=22, color=colour, label=f"{head} (complete)")
        sel = ~complete & is_head & has_value
        if sel.any():
            ax.scatter(numbers[sel], values[sel] * 100, s=18, facecolors="none", edgecolors=colour, alpha=0.6,
                       label=f"{head} (pruned)")
    done = complete & has_value
    if done.any():
        best = np.maximum.accumulate(np.where(done, values, -np.inf))
        ok = np.isfinite(best)
        ax.step(numbers[ok], best[ok] * 100, where="post", color="black", lw=1.2, label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{key}: optimisation history")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


def parameter_importance(importance: dict[str, float], key: str, n_complete: int) -> Figure:
    """Optuna's fANOVA importance of each hyper-parameter for validation top-1 (over the complete trials)."""
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig = new_figure(6.5, 1.2 + 0.35 * max(len(items), 1))
    ax = fig.add_subplot()
    ax.barh(range(len(items)), [v for _, v in items], color="#4c72b0")
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=9)
    ax.set_xlim(0, max([v for _, v in items] + [1e-3]) * 1.18)  # room for the values' labels
    for i, (_, v) in enumerate(items):
        ax.annotate(f"{v:.2f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title(f"{key}: hyper-parameter importance ({n_complete} complete trials)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def reliability_diagram(before: dict, after: dict, key: str, temperature: float) -> Figure:
    """Accuracy against confidence per equal-width bin (``evaluate.ReliabilityBins.to_dict``), before and after
    temperature scaling, over the diagonal of perfect calibration; bar heights are the bins' accuracies."""
    fig = new_figure(4.8, 4.8)
    ax = fig.add_subplot()
    edges = np.asarray(before["edges"], dtype=float)
    width = np.diff(edges)
    for bins, label, colour, alpha in ((before, "before", "#bbbbbb", 0.9), (after, f"after (T = {temperature:.2f})",
                                                                           "#1f77b4", 0.6)):
        acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        filled = ~np.isnan(acc)
        ax.bar(edges[:-1][filled], acc[filled], width=width[filled], align="edge", color=colour, alpha=alpha,
               edgecolor="white", label=label)
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"{key}: reliability")
    _legend_below(fig, ncols=2)
    return fig


def data_efficiency(curves: dict, colours: dict[str, str]) -> Figure:
    """Test top-1 against training images per class (log x): one line per model (solid: tuned head, dashed:
    the baseline), the band spanning the seeds' lowest and highest."""
    fig = new_figure(6.8, 4.8)
    ax = fig.add_subplot()
    for key, per_k in curves.items():
        ks = np.array([int(k) for k in per_k], dtype=float)
        for method, style in (("tuned", "-"), ("baseline", "--")):
            if not all(method in p for p in per_k.values()):
                continue
            mean = np.array([p[method]["mean"] for p in per_k.values()])
            lo = np.array([p[method]["min"] for p in per_k.values()])
            hi = np.array([p[method]["max"] for p in per_k.values()])
            colour = colours.get(key, "#333333")
            name = "tuned head" if method == "tuned" else "baseline"
            ax.plot(ks, mean, style, marker="o", color=colour, label=f"{key} ({name})")
            ax.fill_between(ks, lo, hi, color=colour, alpha=0.15 if method == "tuned" else 0.08, linewidth=0)
    ax.set_xscale("log")
    ticks = sorted({int(k) for per_k in curves.values() for k in per_k})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="training images per class", ylabel="test top-1", ylim=(0, 1))
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig, ncols=2)
    return fig


HEATMAP_CMAP = "jet"  # explain.figures.overlay's default: the colour bar below the explanation panels shows it
READING_GUIDE = ("Red: where the map is highest, blue: lowest. Each map is scaled to its own range: compare places "
                 "within a map, not colours across maps.")


def explanation_figure(panels: Sequence[tuple[str, np.ndarray, Sequence[tuple[str, float]]]], *,
                       heatmaps_from: int = 1) -> Figure:
    """Photos side by side, each with its title (wrapped to the panel) and top-3 breeds below; the panels from
    ``heatmaps_from`` on are heatmap overlays, and a colour bar with the reading guide spans the figure's foot."""
    fig = new_figure(3.0 * len(panels), 5.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, picture, top) in zip(axes, panels, strict=True):
        ax.imshow(picture)
        ax.set_title(textwrap.fill(title, 36), fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
        if top:
            lines = "\n".join(f"{textwrap.shorten(name.replace('_', ' '), 26, placeholder='...')}  {p:.0%}"
                              for name, p in top)
            ax.set_xlabel(lines, fontsize=8, loc="left")
    if heatmaps_from < len(panels):
        mappable = ScalarMappable(Normalize(0, 1), HEATMAP_CMAP)
        bar = fig.colorbar(mappable, ax=list(axes[heatmaps_from:]), orientation="horizontal", fraction=0.05,
                           aspect=40, ticks=[0, 1])
        bar.ax.set_xticklabels(["low", "high"], fontsize=7.5)
        bar.set_label(textwrap.fill(READING_GUIDE, 30 * (len(panels) - heatmaps_from)), fontsize=7.5)
    return fig
