"""A rung's score: the C-swept logistic probe, cross-validated on the rung's training images only (stratified
folds; one C for all folds, the best mean held-out top-1), with a bootstrap interval over the held-out images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from dogbench.evaluate import bootstrap_ci
from dogbench.heads import FeatureData
from dogbench.tune.baseline import BASELINE_CS, make_logistic

FOLDS = 3


@dataclass(frozen=True)
class ProbeScore:
    """Cross-validated top-1 of the probe at its best C, every image held out once."""

    top1: float
    ci95: tuple[float, float]
    C: float
    images: int
    folds: int
    correct: np.ndarray  # (n,) bool: each image right when held out, at the best C

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {"top1": self.top1, "ci95": list(self.ci95), "C": self.C, "images": self.images, "folds": self.folds}


def cv_probe(X: np.ndarray, y: np.ndarray, *, seed: int = 0, device: str = "cpu",
             Cs: tuple[float, ...] = BASELINE_CS) -> ProbeScore:
    """The probe's cross-validated top-1 on (X, y): ``FOLDS`` stratified folds (fewer when a class has fewer
    images), each C fitted on the other folds; ties go to the smaller C (the stronger regularisation)."""
    folds = max(2, min(FOLDS, int(np.bincount(y)[np.unique(y)].min())))
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    right = np.zeros((len(Cs), len(y)), bool)
    for train, held in splits:  # along the regularisation path, each C warm-started from the one before
        data, init = FeatureData.from_arrays(X[train], y[train], device=device), None
        for i, C in enumerate(Cs):
            head = make_logistic(C, device=device).fit_prepared(data, init=init)
            init = head.module_.state_dict()
            right[i, held] = head.predict(X[held]) == y[held]
    best = int(np.argmax(right.mean(axis=1)))  # argmax takes the first: Cs ascend
    correct = right[best]
    return ProbeScore(float(correct.mean()), bootstrap_ci(correct.astype(np.float64), seed=seed), float(Cs[best]),
                      len(y), folds, correct)
