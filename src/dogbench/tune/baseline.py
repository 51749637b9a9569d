"""The logistic-regression baseline with C swept on validation (the CLIP linear-probe protocol): a coarse
decade sweep, then one refinement at half decades around the best, each fit warm-started from the nearest C."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dogbench.config import Balance, TuneMetric
from dogbench.heads import FeatureData, LogisticHead
from dogbench.tune.space import LogisticSolutions, baseline_params, fixed_params, logistic_key

BASELINE_CS: tuple[float, ...] = tuple(10.0**e for e in range(-4, 3))


@dataclass(frozen=True)
class BaselineResult:
    C: float
    val_top1: float  # in tune.metric (top-1 by default)
    curve: dict[str, float]  # str(C) -> validation score
    seconds: float
    # the sweep's fitted heads by (C, label smoothing 0): they seed the search in this process; not saved
    heads: dict[tuple[float, float], LogisticHead] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.C, "val_top1": self.val_top1, "curve": self.curve, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineResult:
        return cls(C=d["C"], val_top1=d["val_top1"], curve=d["curve"], seconds=d["seconds"])


def make_logistic(C: float, *, device: str = "cpu", balance: str = Balance.NONE,
                  metric: str = TuneMetric.TOP1) -> LogisticHead:
    """The baseline probe: standardise, then multinomial L2 logistic regression (scikit-learn's objective),
    solved by full-batch L-BFGS; class-weighted with ``balance``, scored on validation by ``metric``."""
    return LogisticHead(C=C, device=device, **fixed_params(balance=balance, metric=metric))


def sweep_logistic_C(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = BASELINE_CS,
    device: str = "cpu",
    balance: str = Balance.NONE,
    metric: str = TuneMetric.TOP1,
) -> BaselineResult:
    """Coarse decade sweep of C, then one refinement step at half decades around the best, by validation
    ``metric``. Each fit warm-starts from the nearest C already solved (a regularisation path); the rows are
    prepared once. ``balance``: weights or sampler = a class-weighted loss (``data.balance``)."""
    start = time.perf_counter()
    data = FeatureData.from_arrays(X_train, y_train, eval_set=(X_val, y_val), device=device)
    solved = LogisticSolutions()
    curve: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in curve:
            key = logistic_key(baseline_params(C))
            head = make_logistic(C, device=device, balance=balance, metric=metric)
            head.fit_prepared(data, init=solved.nearest(key))
            solved.add(key, head)
            curve[C] = float(head.best_val_top1_)
        return curve[C]

    for C in sorted(Cs):
        score(C)
    best = max(curve, key=lambda c: (curve[c], -c))
    for C in (best / math.sqrt(10.0), best * math.sqrt(10.0)):
        score(C)
    best = max(curve, key=lambda c: (curve[c], -c))
    return BaselineResult(
        C=best,
        val_top1=curve[best],
        curve={f"{c:.3g}": v for c, v in sorted(curve.items())},
        seconds=time.perf_counter() - start,
        heads=dict(solved.heads),
    )
