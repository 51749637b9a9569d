"""A rung's score: the C-swept logistic probe, cross-validated on the rung's training images only (stratified
folds; one C for all folds, the best held-out ``tune.metric``), with the held-out top-1's bootstrap interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from dogbench.config import Balance, TuneMetric
from dogbench.evaluate import bootstrap_ci
from dogbench.heads import FeatureData
from dogbench.heads.fit import confusion_counts, confusion_scores
from dogbench.tune.baseline import BASELINE_CS, make_logistic

FOLDS = 3


@dataclass(frozen=True)
class ProbeScore:
    """Cross-validated scores of the probe at its best C, every image held out once: ``score`` is the held-out
    ``metric`` (what ranks the candidates), ``top1`` and its interval are beside it."""

    top1: float
    ci95: tuple[float, float]
    C: float
    images: int
    folds: int
    correct: np.ndarray  # (n,) bool: each image right when held out, at the best C
    metric: str  # the tune.metric that chose C and ranks the candidate
    score: float  # its held-out value at that C

    def to_dict(self) -> dict[str, float | int | str | list[float]]:
        return {"top1": self.top1, "ci95": list(self.ci95), "C": self.C, "images": self.images, "folds": self.folds,
                "metric": self.metric, "score": self.score}


def cv_probe(X: np.ndarray, y: np.ndarray, *, seed: int = 0, device: str = "cpu",
             Cs: tuple[float, ...] = BASELINE_CS, metric: TuneMetric = TuneMetric.TOP1,
             balance: Balance = Balance.NONE) -> ProbeScore:
    """The probe's cross-validated ``metric`` on (X, y): ``FOLDS`` stratified folds (fewer when a class has fewer
    images), each C fitted on the other folds (class-weighted with ``balance``); ties go to the smaller C (the
    stronger regularisation)."""
    folds = max(2, min(FOLDS, int(np.bincount(y)[np.unique(y)].min())))
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    pred = np.zeros((len(Cs), len(y)), np.int64)
    for train, held in splits:  # along the regularisation path, each C warm-started from the one before
        data, init = FeatureData.from_arrays(X[train], y[train], device=device), None
        for i, C in enumerate(Cs):
            head = make_logistic(C, device=device, balance=balance, metric=metric).fit_prepared(data, init=init)
            init = head.module_.state_dict()
            pred[i, held] = head.predict(X[held])
    n_classes = int(max(y.max(), pred.max())) + 1
    scores = [confusion_scores(confusion_counts(y, p, n_classes))[TuneMetric(metric).value] for p in pred]
    best = int(np.argmax(scores))  # argmax takes the first: Cs ascend
    correct = pred[best] == y
    return ProbeScore(float(correct.mean()), bootstrap_ci(correct.astype(np.float64), seed=seed), float(Cs[best]),
                      len(y), folds, correct, TuneMetric(metric).value, float(scores[best]))
