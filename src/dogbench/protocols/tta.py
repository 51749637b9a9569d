"""Test-time augmentation in test scoring (``evaluate.tta``): the test split's features of every view, each
row's probabilities as ``evaluate.average_views`` gives them, its single-view scores kept beside, and the paired
comparison of each model with and without the views. Validation (tuning, calibration) stays on the plain view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dogbench.backbones import Backbone
from dogbench.config import RunConfig, Tta
from dogbench.data import Dataset
from dogbench.device import Policy
from dogbench.evaluate import average_views, full_proba
from dogbench.features import FeatureSet, extract_features, views_for
from dogbench.heads import Head
from dogbench.protocols.scoring import compare_all, test_scores
from dogbench.results import ModelResult


def extract_views(cfg: RunConfig, backbone: Backbone, dataset: Dataset, *, crop_to_box: bool, policy: Policy,
                  progress: bool) -> dict[str, FeatureSet]:
    """The test split's features of each view besides the plain one, through the feature cache (each view has
    its own key); none with ``evaluate.tta = none``."""
    test = dataclasses.replace(dataset, samples=tuple(dataset.split("test")))
    return {view.name: extract_features(backbone, test, cfg=cfg.features, crop_to_box=crop_to_box,
                                        strict=cfg.data.strict, progress=progress, policy=policy, view=view)
            for view in views_for(cfg.evaluate.tta)[1:]}


def view_proba(head: Head, plain: np.ndarray, views: dict[str, FeatureSet], test_ids: list[str],
               n_classes: int) -> np.ndarray:
    """(V, N, n_classes) uncalibrated probabilities of the test rows, the plain view's features ``plain`` first."""
    stacks = [plain]
    for name, feats in views.items():
        assert list(feats.sample_ids) == test_ids, f"the {name} view's test rows are not the plain view's"
        stacks.append(feats.features)
    return np.stack([full_proba(head.predict_proba(x), head.classes_, n_classes) for x in stacks])


@dataclass(frozen=True)
class ViewScores:
    """A row's test probabilities over its views: before and after calibration, and its TTA record."""

    raw: np.ndarray  # (N, C) mean over views of the uncalibrated probabilities
    proba: np.ndarray  # (N, C) mean over views of the calibrated probabilities: the row's test predictions
    record: dict[str, Any]  # {} without TTA; else views, n_views, single_view scores, comparison


def score_views(cfg: RunConfig, label: str, per_view: np.ndarray, temperature: float | None, y: np.ndarray,
                dataset: Dataset, test_ids: list[str]) -> ViewScores:
    """The row's probabilities by the one rule; with TTA, the plain view's scores and the paired comparison of
    the row with and without its views (``tta`` marks it among the comparisons)."""
    raw, proba = average_views(per_view, None), average_views(per_view, temperature)
    if len(per_view) == 1:
        return ViewScores(raw, proba, {})
    tta = Tta(cfg.evaluate.tta).value
    single, _, single_correct = test_scores(y, average_views(per_view[:1], temperature), dataset, cfg)
    single.pop("per_class")
    with_views = dict(zip(test_ids, (proba.argmax(axis=1) == y).tolist(), strict=True))
    without = dict(zip(test_ids, single_correct.tolist(), strict=True))
    comparison = compare_all({f"{label} with {tta} TTA": with_views, f"{label} single view": without}, cfg)[0]
    record = {"views": tta, "n_views": len(per_view), "single_view": single,
              "comparison": {**comparison, "tta": tta, "model": label}}
    return ViewScores(raw, proba, record)


def probe_scores_over_views(probe: Any, X: np.ndarray, views: dict[str, FeatureSet], ids: list[str], y: np.ndarray,
                            dataset: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """The baseline probe's headline test scores (no per-class recall) over the tuned head's views, so the
    tuned-against-probe picture compares like with like under TTA."""
    per_view = view_proba(probe, X, views, ids, len(dataset.classes))
    scores, _, _ = test_scores(y, average_views(per_view, None), dataset, cfg)
    scores.pop("per_class")
    return scores


def tta_comparisons(models: Iterable[ModelResult]) -> list[dict[str, Any]]:
    """Each row's paired comparison with and without test-time augmentation (none without it)."""
    return [m.tta["comparison"] for m in models if m.tta]


def check_tta(cfg: RunConfig) -> None:
    """Fail before any model is loaded when ``evaluate.tta`` names views that are not built."""
    views_for(cfg.evaluate.tta)
