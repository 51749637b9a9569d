"""Seeds: does the verdict survive another split and another search? ``seeds = N`` repeats the validation split,
the head search, the refit and the test scoring with the run's seeds + 1..N-1 (offset 0 is the run itself)
on the cached features, and reports each model's mean and spread, and the paired difference of every two models
per seed and its spread, beside the single-seed verdict.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dogbench.config import RunConfig
from dogbench.evaluate import spread
from dogbench.protocols.frozen import BackboneFeatures, add_analysis, make_splits, refit_and_score
from dogbench.results import RunResults
from dogbench.rundir import RunDir, RunFolderError


def repeat_over_seeds(cfg: RunConfig, run: RunDir, results: RunResults, extracted: dict[str, BackboneFeatures],
                      *, progress: bool = True) -> dict[str, Any]:
    """``{n, models: {label: {tuned, baseline}: spread}, comparisons: [{a, b, delta: spread}]}``; a spread is
    ``{values (one per seed), mean, std, min, max}`` of test top-1 (of a - b for comparisons)."""
    n = cfg.evaluate.seeds
    top1: dict[str, dict[str, list[float]]] = {}
    correct: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(extracted) * (n - 1), desc="seeds", unit="seed", disable=not progress) as bar:
        for label, bf in extracted.items():
            m = results.models[label]
            top1[label] = {"tuned": [m.test["top1"]], "baseline": [m.baseline["test"]["top1"]] if m.baseline else []}
            X, y = bf.features.features, bf.features.labels
            saved = run.read_predictions(label)  # seed 0: the run's own evaluation (test rows are every seed's)
            test_ids = [bf.features.sample_ids[i] for i in bf.splits.test]
            if saved.sample_ids.tolist() != test_ids:
                raise RunFolderError(f"{run.predictions_path(label)} holds other test images than these features; "
                                     f"rebuild it with `{run.rebuild('predictions')}`")
            correct[label] = [saved.proba.argmax(axis=1) == saved.y_true]
            for offset in range(1, n):  # the run's own seeds are offset 0
                seed = cfg.tune.seed + offset
                splits = make_splits(bf.features, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed + offset)
                fit = np.concatenate([splits.train, splits.val])
                scored = refit_and_score(cfg, X, y, train=splits.train, val=splits.val, fit=fit, test=splits.test,
                                         seed=seed, trials=cfg.tune.trials, study_name=f"{label}-seed{seed}",
                                         n_classes=results.dataset.n_classes)
                for method, proba in scored.items():
                    hit = proba.argmax(axis=1) == y[splits.test]
                    top1[label][method].append(float(hit.mean()))
                    if method == "tuned":
                        correct[label].append(hit)
                bar.update(1)
    comparisons = []
    for a, b in combinations(top1, 2):
        deltas = [float(ca.mean() - cb.mean()) for ca, cb in zip(correct[a], correct[b], strict=True)]
        comparisons.append({"a": a, "b": b, "delta": spread(deltas),
                            "a_better_in": sum(d > 0 for d in deltas), "b_better_in": sum(d < 0 for d in deltas)})
    return {"n": n, "models": {label: {k: spread(v) for k, v in t.items() if v} for label, t in top1.items()},
            "comparisons": comparisons}


def add_seeds(cfg: RunConfig, run: RunDir, results: RunResults, extracted: dict[str, BackboneFeatures], *,
              progress: bool = True) -> RunResults:
    """``results`` with the seed repetition (and its cost in ``timing_s.seeds``), written to ``run``."""
    return add_analysis(run, results, stage="seeds", field_name="seeds",
                        compute=lambda: repeat_over_seeds(cfg, run, results, extracted, progress=progress))
