"""Scoring shared by every protocol (frozen heads now, fine-tuned models later): test metrics with their
bootstrap interval, full-width probabilities, paired comparisons, the environment record. No torch import.
"""

from __future__ import annotations

import os
import platform
import sys
from itertools import combinations
from typing import Any

import numpy as np

from dogbench.config import RunConfig
from dogbench.data import Dataset
from dogbench.evaluate import ClassificationMetrics, bootstrap_ci, classification_metrics, compare_paired, holm


def test_scores(
    y: np.ndarray, proba: np.ndarray, dataset: Dataset, cfg: RunConfig
) -> tuple[dict[str, Any], ClassificationMetrics, np.ndarray]:
    """Headline test scores with the bootstrap interval of top-1; the metrics; the per-image correctness."""
    metrics = classification_metrics(y, proba, class_names=list(dataset.classes))
    correct = proba.argmax(axis=1) == y
    ci = bootstrap_ci(correct, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
    scores = {
        "top1": metrics.top1, "top1_ci95": list(ci), "top5": metrics.top5, "macro_f1": metrics.macro_f1,
        "balanced_top1": metrics.balanced_top1, "per_class": metrics.per_class, "n": metrics.n,
    }
    return scores, metrics, correct


def compare_all(correct_by_label: dict[str, dict[str, bool]], cfg: RunConfig) -> list[dict[str, Any]]:
    """Paired comparison of every pair of backbones on the test images both have (normally all of them); with
    three or more pairs, each also gets its Holm-corrected p over all of them (``p_holm_all``): a table of every
    pair makes that many comparisons."""
    out = []
    for a, b in combinations(correct_by_label, 2):
        shared = sorted(set(correct_by_label[a]) & set(correct_by_label[b]))
        ca = np.asarray([correct_by_label[a][s] for s in shared])
        cb = np.asarray([correct_by_label[b][s] for s in shared])
        comp = compare_paired(a, ca, b, cb, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
        out.append(comp.to_dict())
    if len(out) >= 3:
        for pair, p in zip(out, holm([c["mcnemar_p"] for c in out]), strict=True):
            pair["p_holm_all"] = p
    return out


ALPHA = 0.05  # the family-wise error rate Holm's correction holds the best model's comparisons to


def headline(val_scores: dict[str, float], correct_by_label: dict[str, dict[str, bool]],
             comparisons: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """The run's verdict: with two models, their comparison; with more, the best by validation (``val_scores``,
    in tune.metric; ties to the first in config order) against each other model on test, Holm-corrected over
    those comparisons (``best_vs_rest``), and the best against the runner-up as the headline pair."""
    if len(val_scores) < 3:
        return {"comparison": comparisons[0] if comparisons else None}
    ranked = sorted(val_scores, key=lambda label: -val_scores[label])  # stable: config order breaks ties
    best = ranked[0]
    pairs = [compare_all({best: correct_by_label[best], other: correct_by_label[other]}, cfg)[0]
             for other in ranked[1:]]
    for pair, p_holm in zip(pairs, holm([c["mcnemar_p"] for c in pairs]), strict=True):
        pair["p_holm"] = p_holm
        pair["survives"] = p_holm < ALPHA  # significant after the correction, in either direction
    return {"comparison": pairs[0], "best_vs_rest": {
        "best": best, "chosen_by": f"validation {cfg.tune.metric.value}", "correction": "holm", "alpha": ALPHA,
        "comparisons": pairs}}


def environment(device: str) -> dict[str, Any]:
    import timm
    import torch

    from dogbench import __version__

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "dogbench": __version__, "device": device, "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }
