"""Metrics, bootstrap intervals and paired tests for classifier outputs (numpy and scipy only, no torch).

Labels are column indices ``0..C-1`` of a score matrix; "correct" vectors are per-sample booleans,
aligned across the models being compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)


def _check_scores(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n,) integer labels against (n, C) finite scores; return them as arrays."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] == 0:
        raise ValueError(f"proba must be 2-D (n_samples, n_classes), got shape {proba.shape}")
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y_true.shape}")
    if y_true.shape[0] != proba.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} labels but proba has {proba.shape[0]} rows")
    if y_true.shape[0] == 0:
        raise ValueError("cannot score an empty set")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    n_classes = proba.shape[1]
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true must lie in [0, {n_classes}), got range [{y_true.min()}, {y_true.max()}]")
    if not np.isfinite(proba).all():
        raise ValueError("proba contains NaN or infinite values")
    return y_true.astype(np.int64), proba


def _true_class_rank(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """0-based rank of the true class per row; ties go to the lower class index (as a stable sort)."""
    true_score = proba[np.arange(len(y_true)), y_true][:, None]
    higher = (proba > true_score).sum(axis=1)
    tied_before = ((proba == true_score) & (np.arange(proba.shape[1]) < y_true[:, None])).sum(axis=1)
    return higher + tied_before


def topk_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest scores (ties: lower index first).

    ``proba`` may be any finite scores (probabilities or logits); only their order matters.
    """
    y_true, proba = _check_scores(y_true, proba)
    if not 1 <= k <= proba.shape[1]:
        raise ValueError(f"k must be in [1, {proba.shape[1]}] for {proba.shape[1]} classes, got {k}")
    return float((_true_class_rank(y_true, proba) < k).mean())


@dataclass(frozen=True)
class ClassificationMetrics:
    """Headline and per-class metrics of one model on one labelled set."""

    top1: float
    top5: float  # top-min(5, C)
    macro_f1: float
    balanced_top1: float  # mean per-class recall over the classes that have samples (balanced accuracy)
    per_class: dict[str, float]  # recall per class, for the classes that have samples
    confusion: np.ndarray  # (C, C) int64, rows = true class, cols = predicted class
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (confusion as nested lists)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "macro_f1": self.macro_f1,
            "balanced_top1": self.balanced_top1,
            "per_class": dict(self.per_class),
            "confusion": self.confusion.tolist(),
            "n": self.n,
        }


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, *, class_names: Sequence[str] | None = None
) -> ClassificationMetrics:
    """Top-1, top-5, macro-F1, balanced top-1, per-class recall and the confusion matrix from (n, C) scores.

    Macro-F1 averages over the classes present in ``y_true`` or in the predictions, as
    ``sklearn.metrics.f1_score(average="macro")`` does; ``per_class`` leaves out classes without
    samples (their recall is undefined) so the result stays valid JSON. Balanced top-1 is the mean of those
    recalls, as ``sklearn.metrics.balanced_accuracy_score``: on imbalanced data it does not reward ignoring the
    rare classes.
    """
    y_true, proba = _check_scores(y_true, proba)
    n, n_classes = proba.shape
    if class_names is None:
        class_names = [str(i) for i in range(n_classes)]
    if len(class_names) != n_classes:
        raise ValueError(f"got {len(class_names)} class_names for {n_classes} classes")
    if len(set(class_names)) != n_classes:
        raise ValueError("class_names must be unique")
    rank = _true_class_rank(y_true, proba)
    y_pred = proba.argmax(axis=1)  # first maximum: the same tie rule as the rank
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    confusion = confusion.reshape(n_classes, n_classes).astype(np.int64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])  # = 2PR / (P + R)
    return ClassificationMetrics(
        top1=float((rank < 1).mean()),
        top5=float((rank < min(5, n_classes)).mean()),
        macro_f1=float(f1.mean()),
        balanced_top1=float((tp[support > 0] / support[support > 0]).mean()),
        per_class={name: float(tp[i] / support[i]) for i, name in enumerate(class_names) if support[i] > 0},
        confusion=confusion,
        n=n,
    )


def spread(values: Sequence[float]) -> dict[str, Any]:
    """{values, mean, std (sample), min, max} of a few repeated measurements (seeds)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": float(np.mean(values)), "std": std, "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- calibration

ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017)
_LOG_FLOOR = 1e-12  # probabilities are floored here before a log (a class the head never predicts)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin: how many predictions, their mean confidence and their accuracy."""

    edges: np.ndarray  # (n_bins + 1,) from 0 to 1
    count: np.ndarray  # (n_bins,) int64
    confidence: np.ndarray  # (n_bins,) mean max-probability in the bin (NaN where empty)
    accuracy: np.ndarray  # (n_bins,) fraction correct in the bin (NaN where empty)

    def to_dict(self) -> dict[str, Any]:
        def listed(a: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in a]

        return {"edges": self.edges.tolist(), "count": self.count.tolist(), "confidence": listed(self.confidence),
                "accuracy": listed(self.accuracy)}


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, *, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """The reliability diagram's data: the top-1 confidence of each row, in ``n_bins`` equal-width bins
    ``(0, 1/n], (1/n, 2/n], ... (1 - 1/n, 1]``."""
    y_true, proba = _check_scores(y_true, proba)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    which = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), count.astype(np.int64), conf, acc)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over confidence bins of (bin share) x |accuracy - mean confidence| (equal-width bins)."""
    bins = reliability_bins(y_true, proba, n_bins=n_bins)
    filled = bins.count > 0
    share = bins.count[filled] / bins.count.sum()
    return float(np.sum(share * np.abs(bins.accuracy[filled] - bins.confidence[filled])))


def negative_log_likelihood(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean -log p(true class) (probabilities floored at 1e-12)."""
    y_true, proba = _check_scores(y_true, proba)
    return float(-np.mean(np.log(np.maximum(proba[np.arange(len(y_true)), y_true], _LOG_FLOOR))))


def brier_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - [y = k])^2 (0 is perfect, 2 the worst)."""
    y_true, proba = _check_scores(y_true, proba)
    onehot = np.zeros_like(proba, dtype=np.float64)
    onehot[np.arange(len(y_true)), y_true] = 1.0
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def calibration_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """{ece, nll, brier} of probabilities against labels."""
    return {"ece": expected_calibration_error(y_true, proba), "nll": negative_log_likelihood(y_true, proba),
            "brier": brier_score(y_true, proba)}


def average_views(per_view: np.ndarray, temperature: float | None) -> np.ndarray:
    """Test-time augmentation's one rule: an image's probabilities are the mean over its views (axis 0 of a
    (V, N, C) stack) of each view's probabilities, temperature-scaled first when ``temperature`` is given."""
    per_view = np.asarray(per_view, dtype=np.float64)
    assert per_view.ndim == 3, f"per-view probabilities are (V, N, C), got {per_view.shape}"
    if len(per_view) == 1:  # one view: its probabilities as they are, bit for bit
        return per_view[0] if temperature is None else apply_temperature(per_view[0], temperature)
    return np.mean([p if temperature is None else apply_temperature(p, temperature) for p in per_view], axis=0)


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): temperature scaling of probabilities (the log-probabilities are the logits up to a
    per-row constant, which softmax ignores). T > 1 softens, T < 1 sharpens; the argmax never changes."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    proba = np.asarray(proba, dtype=np.float64)
    with np.errstate(divide="ignore"):  # a class the head never predicts keeps probability 0
        logits = np.where(proba > 0, np.log(proba), -np.inf) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, proba: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimises the negative log-likelihood of ``apply_temperature(proba, T)`` on
    (y_true, proba), searched over log T within ``bounds`` (scipy's bounded scalar minimiser)."""
    from scipy.optimize import minimize_scalar

    y_true, proba = _check_scores(y_true, proba)
    log_p = np.log(np.maximum(proba.astype(np.float64), _LOG_FLOOR))
    rows = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z_max = z.max(axis=1)
        log_norm = z_max + np.log(np.exp(z - z_max[:, None]).sum(axis=1))
        return float(np.mean(log_norm - z[rows, y_true]))

    found = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-6})
    return float(np.exp(found.x))


def _check_correct(correct: np.ndarray, name: str = "correct") -> np.ndarray:
    """Validate a non-empty 1-D vector of booleans (or 0/1) and return it as float64."""
    correct = np.asarray(correct)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {correct.shape}")
    if correct.dtype != bool and not np.isin(correct, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got dtype {correct.dtype}")
    return correct.astype(np.float64)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _bootstrap_ci(values: np.ndarray, *, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over resamples with replacement.

    Indices are drawn in blocks of rows so memory stays bounded for large n.
    """
    _check_bootstrap_args(n_resamples, confidence)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(block, n_resamples - start), n))].mean(axis=1)
            for start in range(0, n_resamples, block)
        ]
    )
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    correct: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the accuracy (mean) of a boolean ``correct`` vector."""
    return _bootstrap_ci(_check_correct(correct), n_resamples=n_resamples, confidence=confidence, seed=seed)


def _check_pair(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_correct(correct_a, "correct_a"), _check_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must have the same length, got {a.shape[0]} and {b.shape[0]}")
    return a, b


def paired_bootstrap_delta(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """``(mean(a) - mean(b), CI)``, resampling the same samples for both models."""
    a, b = _check_pair(correct_a, correct_b)
    diff = a - b
    ci = _bootstrap_ci(diff, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return float(diff.mean()), ci


def _discordant(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(samples only ``a`` gets right, samples only ``b`` gets right)."""
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    a_only, b_only = _discordant(*_check_pair(correct_a, correct_b))
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Model ``a`` against model ``b`` on the same samples."""

    a: str
    b: str
    n: int
    top1_a: float
    top1_b: float
    delta_top1: float  # top1_a - top1_b
    delta_top1_ci95: tuple[float, float]
    mcnemar_p: float
    a_only_correct: int
    b_only_correct: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the interval as a two-element list)."""
        return {
            "a": self.a,
            "b": self.b,
            "n": self.n,
            "top1_a": self.top1_a,
            "top1_b": self.top1_b,
            "delta_top1": self.delta_top1,
            "delta_top1_ci95": list(self.delta_top1_ci95),
            "mcnemar_p": self.mcnemar_p,
            "a_only_correct": self.a_only_correct,
            "b_only_correct": self.b_only_correct,
        }


def compare_paired(
    label_a: str,
    correct_a: np.ndarray,
    label_b: str,
    correct_b: np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Top-1 of both, their difference with a 95% paired bootstrap interval, and McNemar's p."""
    a, b = _check_pair(correct_a, correct_b)
    delta, ci = paired_bootstrap_delta(a, b, n_resamples=n_resamples, confidence=0.95, seed=seed)
    a_only, b_only = _discordant(a, b)
    return PairedComparison(
        a=label_a,
        b=label_b,
        n=a.shape[0],
        top1_a=float(a.mean()),
        top1_b=float(b.mean()),
        delta_top1=delta,
        delta_top1_ci95=ci,
        mcnemar_p=mcnemar_exact(a, b),
        a_only_correct=a_only,
        b_only_correct=b_only,
    )


def full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class of the dataset (classes absent from training get probability 0)."""
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over the comparisons given), in their order: the
    i-th smallest p times (m - i + 1), made monotone and capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
