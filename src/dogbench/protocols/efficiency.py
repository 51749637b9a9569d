"""Data efficiency on the cached features: how many labelled photos per class each backbone needs.

For every k of ``shots.shots`` and every seed: k training images per class are drawn from the training split
(``data.sample_shots``; the validation split stays whole), the logistic-regression baseline sweeps C on
validation and is fitted on the k shots, a head is tuned with ``shots.trials`` Optuna trials (in memory) and
refit on the k shots, and both score the whole test split. Features come from the extraction already done:
every point costs seconds, not a pass over the images.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dogbench.config import RunConfig
from dogbench.data import sample_shots
from dogbench.evaluate import bootstrap_ci, spread
from dogbench.protocols.frozen import BackboneFeatures, add_analysis, refit_and_score
from dogbench.results import RunResults
from dogbench.rundir import RunDir


def shot_counts(shots: tuple[int | str, ...], n_per_class: int) -> list[int]:
    """The k values, "all" as the largest class's count, sorted, without duplicates."""
    return sorted({n_per_class if k == "all" else int(k) for k in shots})


def data_efficiency(
    cfg: RunConfig, extracted: dict[str, BackboneFeatures], *, n_classes: int, progress: bool = True
) -> dict:
    """``{shots, seeds, trials, models: {label: {k: {baseline, tuned}: {mean, std, min, max, runs}}}}``; each
    run is ``{seed, n_train, top1, top1_ci95}``."""
    sc = cfg.shots
    out: dict[str, Any] = {"shots": [], "seeds": sc.seeds, "trials": sc.trials, "models": {}}
    if not sc.shots:
        return out
    reference = next(iter(extracted.values()))
    train_labels = reference.features.labels[reference.splits.train]
    n_per_class = int(np.bincount(train_labels).max())
    ks = shot_counts(sc.shots, n_per_class)
    out["shots"] = ks
    total = len(extracted) * len(ks) * sc.seeds
    with tqdm(total=total, desc="data efficiency", unit="point", disable=not progress) as bar:
        for label, bf in extracted.items():
            X, y, splits = bf.features.features, bf.features.labels, bf.splits
            per_k: dict[str, Any] = {}
            for k in ks:
                runs: dict[str, list[dict[str, Any]]] = {"tuned": [], "baseline": []}
                for seed in range(sc.seeds):
                    rows = splits.train[sample_shots(y[splits.train], k=k, seed=seed)]
                    with warnings.catch_warnings():  # 1 image per class: sklearn suspects a regression target
                        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
                        scored = refit_and_score(cfg, X, y, train=rows, val=splits.val, fit=rows,
                                                 test=splits.test, seed=seed, trials=sc.trials,
                                                 study_name=f"shots-{len(rows)}-{seed}", n_classes=n_classes)
                    for method, proba in scored.items():
                        correct = proba.argmax(axis=1) == y[splits.test]
                        ci = bootstrap_ci(correct, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
                        runs[method].append({"seed": seed, "n_train": len(rows), "top1": float(correct.mean()),
                                             "top1_ci95": list(ci)})
                    bar.update(1)
                per_k[str(k)] = {m: {**spread([r["top1"] for r in rs]), "runs": rs} for m, rs in runs.items() if rs}
            out["models"][label] = per_k
    return out


def add_data_efficiency(cfg: RunConfig, run: RunDir, results: RunResults, extracted: dict[str, BackboneFeatures],
                        *, progress: bool = True) -> RunResults:
    """``results`` with the data-efficiency curves (and their cost in ``timing_s.shots``), written to ``run``."""
    return add_analysis(run, results, stage="shots", field_name="data_efficiency", compute=lambda: data_efficiency(
        cfg, extracted, n_classes=results.dataset.n_classes, progress=progress))
