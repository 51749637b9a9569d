"""The report's figures: matplotlib (Agg) to PNG bytes, one function per figure, data in, no file or torch access.

Colours follow one rule across figures: each model keeps its colour from ``palette``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402

DPI = 110
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
HEAD_COLOURS = ("#444444", "#e69f00", "#56b4e9", "#009e73")  # head kinds in the search plots, not models


def palette(keys: Sequence[str]) -> dict[str, str]:
    return {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(keys)}


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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


def accuracy_intervals(points: Sequence[ModelPoint], colours: dict[str, str]) -> bytes:
    """Test top-1 with its 95% bootstrap interval per model; the logistic-regression baseline as a hollow marker."""
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.55 * len(points)))
    for i, p in enumerate(points):
        y = len(points) - 1 - i
        ax.errorbar(p.top1 * 100, y, xerr=[[(p.top1 - p.ci[0]) * 100], [(p.ci[1] - p.top1) * 100]], fmt="o",
                    color=colours[p.key], capsize=4, ms=7, label="tuned head" if i == 0 else None)
        ax.annotate(f"{p.top1 * 100:.1f}%", (p.ci[1] * 100, y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=9)
        if p.baseline_top1 is not None and p.baseline_ci is not None:
            lo, hi = p.baseline_top1 - p.baseline_ci[0], p.baseline_ci[1] - p.baseline_top1
            ax.errorbar(p.baseline_top1 * 100, y - 0.25, xerr=[[lo * 100], [hi * 100]],
                        fmt="o", mfc="white", color=colours[p.key], capsize=3, ms=6, alpha=0.8,
                        label="logistic-regression baseline" if i == 0 else None)
    ax.set_yticks(range(len(points)), [p.key for p in reversed(points)])
    ax.set_xlabel("test top-1 (%), 95% bootstrap interval")
    ax.set_ylim(-0.7, len(points) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_title("Accuracy with intervals")
    return _png(fig)


def accuracy_vs_compute(points: Sequence[ModelPoint], colours: dict[str, str]) -> bytes:
    """Top-1 against GFLOPs per image and against the run's wall time, one marker per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, attr, xlabel in ((axes[0], "gflops", "GFLOPs per image (forward pass)"),
                             (axes[1], "seconds", "wall time of the model's stages (s; extraction 0 when cached)")):
        for p in points:
            x = max(getattr(p, attr), 1e-3)
            ax.errorbar(x, p.top1 * 100, yerr=[[(p.top1 - p.ci[0]) * 100], [(p.ci[1] - p.top1) * 100]], fmt="o",
                        color=colours[p.key], capsize=3, ms=7)
            ax.annotate(p.key, (x, p.top1 * 100), xytext=(6, 4), textcoords="offset points", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test top-1 (%)")
    fig.suptitle("Accuracy against compute")
    return _png(fig)


def ladder(rungs: dict[str, Sequence[tuple[str, float, tuple[float, float], float]]]) -> bytes:
    """The fine-tuning ladder: per backbone, test top-1 (95% interval) of each method against its training cost
    (wall seconds; the frozen rung's are extraction + head search + refit), methods joined in cost order."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = palette(list(rungs))
    for backbone, points in rungs.items():
        points = sorted(points, key=lambda p: p[3])
        xs = [max(p[3], 1e-3) for p in points]
        ys = [p[1] * 100 for p in points]
        ax.plot(xs, ys, "-", color=colours[backbone], alpha=0.5)
        for (method, top1, ci, _), x in zip(points, xs, strict=True):
            ax.errorbar(x, top1 * 100, yerr=[[(top1 - ci[0]) * 100], [(ci[1] - top1) * 100]], fmt="o",
                        color=colours[backbone], capsize=3, ms=7)
            ax.annotate(f"{backbone}/{method}", (x, top1 * 100), xytext=(6, 4), textcoords="offset points",
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training cost (wall s on this machine)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Fine-tuning ladder: accuracy against training cost")
    return _png(fig)


def per_breed_scatter(
    names: Sequence[str], recall_a: np.ndarray, recall_b: np.ndarray, key_a: str, key_b: str, colours: dict[str, str],
    *, annotate: int = 8,
) -> bytes:
    """One point per breed: recall under ``a`` (x) against ``b`` (y), in the colour of the model that is better on
    it (grey: tied); the breeds that differ most are named."""
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.006, 0.006, size=(2, len(names)))  # recalls are multiples of 1/n_test: separate ties
    diff = recall_b - recall_a
    point_colours = [colours[key_b] if d > 0 else colours[key_a] if d < 0 else "grey" for d in diff]
    ax.scatter(recall_a * 100 + jitter[0] * 100, recall_b * 100 + jitter[1] * 100, s=18, alpha=0.65,
               c=point_colours, edgecolors="none")
    ax.plot([0, 100], [0, 100], color="grey", lw=1, ls="--")
    for i in np.argsort(-np.abs(diff), kind="stable")[:annotate]:
        ax.annotate(names[i], (recall_a[i] * 100, recall_b[i] * 100), xytext=(4, -3), textcoords="offset points",
                    fontsize=7)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel(f"{key_a}: per-breed accuracy (%)")
    ax.set_ylabel(f"{key_b}: per-breed accuracy (%)")
    above = int((diff > 0).sum())
    below = int((diff < 0).sum())
    tied = len(names) - above - below
    ax.set_title(f"Per-breed accuracy: {key_b} better on {above}, {key_a} on {below}, tied {tied}", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def breed_differences(
    names: Sequence[str], recall_a: np.ndarray, recall_b: np.ndarray, key_a: str, key_b: str, colours: dict[str, str],
    *, k: int = 10,
) -> bytes:
    """The ``k`` breeds where each model is furthest ahead of the other (accuracy points)."""
    diff = (recall_b - recall_a) * 100
    order = np.argsort(diff, kind="stable")
    picks = [i for i in order[:k] if diff[i] < 0] + [i for i in order[::-1][:k] if diff[i] > 0][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.22 * max(len(picks), 1)))
    ax.barh(range(len(picks)), [diff[i] for i in picks],
            color=[colours[key_b] if diff[i] > 0 else colours[key_a] for i in picks])
    ax.set_yticks(range(len(picks)), [names[i] for i in picks], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"accuracy difference (points): right = {key_b} better, left = {key_a} better")
    ax.set_title("Breeds where the models differ most")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


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


def confusion_figure(names: Sequence[str], confusion: np.ndarray, key: str, order: np.ndarray | None = None) -> bytes:
    """The errors of a confusion matrix (rows normalised, diagonal left out), breeds ordered so confusions cluster.

    At 120 classes every breed still gets a tick label; the log colour scale keeps single confusions visible.
    """
    n = confusion.shape[0]
    order = breed_order(confusion) if order is None else order
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    errors = rates[np.ix_(order, order)].astype(float)
    np.fill_diagonal(errors, np.nan)
    errors[errors == 0] = np.nan
    side = float(np.clip(0.14 * n + 2.5, 5, 22))  # 120 classes: 19.3 in, about 15 px per breed at DPI
    font = float(np.clip(700 / max(n, 1), 5.5, 10))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    finite = errors[np.isfinite(errors)]
    low = float(finite.min()) if finite.size else 0.01
    image = ax.imshow(errors, cmap="magma_r", norm=LogNorm(vmin=low, vmax=max(low * 1.01, 1.0)),
                      interpolation="nearest")
    ticks = [names[i] for i in order]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize=font)
    ax.set_yticks(range(n), ticks, fontsize=font)
    ax.set_xlabel("predicted breed")
    ax.set_ylabel("true breed")
    ax.set_facecolor("#f7f7f7")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, label="share of the true breed's test images (log scale)")
    ax.set_title(f"{key}: confusions (off-diagonal; correct predictions left out)")
    return _png(fig)


def optimisation_history(numbers: np.ndarray, values: np.ndarray, states: Sequence[str], heads: Sequence[str],
                         key: str) -> bytes:
    """Validation top-1 per trial (pruned trials at their last epoch, hollow) and the best so far."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    head_colours = {h: HEAD_COLOURS[i % len(HEAD_COLOURS)] for i, h in enumerate(sorted(set(heads)))}
    complete = np.array([s == "COMPLETE" for s in states])
    has_value = np.isfinite(values)
    for head, colour in head_colours.items():
        is_head = np.array([h == head for h in heads])
        sel = complete & is_head & has_value
        ax.scatter(numbers[sel], values[sel] * 100, s=22, color=colour, label=f"{head} (complete)")
        sel = ~complete & is_head & has_value
        ax.scatter(numbers[sel], values[sel] * 100, s=18, facecolors="none", edgecolors=colour, alpha=0.6,
                   label=f"{head} (pruned)")
    done = complete & has_value
    if done.any():
        best = np.maximum.accumulate(np.where(done, values, -np.inf))
        ok = np.isfinite(best)
        ax.step(numbers[ok], best[ok] * 100, where="post", color="black", lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{key}: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _png(fig)


def parameter_importance(importance: dict[str, float], key: str, n_complete: int) -> bytes:
    """Optuna's fANOVA importance of each hyper-parameter for validation top-1 (over the complete trials)."""
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.35 * max(len(items), 1)))
    ax.barh(range(len(items)), [v for _, v in items], color="#4c72b0")
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=9)
    for i, (_, v) in enumerate(items):
        ax.annotate(f"{v:.2f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title(f"{key}: hyper-parameter importance ({n_complete} complete trials)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def reliability_diagram(before: dict, after: dict, key: str, temperature: float) -> bytes:
    """Accuracy against confidence per equal-width bin (``evaluate.ReliabilityBins.to_dict``), before and after
    temperature scaling, over the diagonal of perfect calibration; bar heights are the bins' accuracies."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    edges = np.asarray(before["edges"], dtype=float)
    width = np.diff(edges)
    for bins, label, colour, alpha in ((before, "before", "#bbbbbb", 0.9), (after, f"after (T = {temperature:.2f})",
                                                                           "#1f77b4", 0.6)):
        acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        filled = ~np.isnan(acc)
        ax.bar(edges[:-1][filled], acc[filled], width=width[filled], align="edge", color=colour, alpha=alpha,
               edgecolor="white", label=label)
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy", title=key)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def data_efficiency(curves: dict, colours: dict[str, str]) -> bytes:
    """Test top-1 against training images per class (log x): one line per model (solid: tuned head, dashed:
    the baseline), the band spanning the seeds' lowest and highest."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
