"""Time the head search on cache-sized features: Optuna trials on 12,000 x 768 features, 120 classes.

    .venv/bin/python benchmarks/bench_tune.py --out bench_tune.json

Issue 3's target, on the 2-core development machine: 100 trials of the default search (linear + MLP heads)
in under 180 s, a linear-only search in seconds. The features are a seeded synthetic stand-in for a backbone's
(a 120-class Gaussian mixture, two modes per class, in a 128-d subspace of 768 dimensions with power-law
nuisance variance, unequal scales and offsets), on which a linear head reaches about 0.85 validation top-1 and
an MLP a little more.
Train/validation are split 80/20 as ``dogbench.pipeline.make_splits`` does, the study lives in a fresh SQLite
file as in ``tune_backbone``, and the best head is refit on train+val for its ``best_epoch`` epochs and scored
on a held-out synthetic test set, as ``evaluate_backbone`` does. Each repeat runs the same seeded study afresh;
the table shows the median wall time (the accuracies do not change between repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from dogbench.config import TuneConfig
from dogbench.data import stratified_split
from dogbench.tune import build_head, tune_head

SEARCHES: dict[str, tuple[str, ...]] = {"default": TuneConfig().heads, "linear": ("linear",)}


@dataclass(frozen=True)
class Features:
    X_train: np.ndarray  # (n_train, d) float32
    y_train: np.ndarray  # (n_train,) int
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def synthetic_features(
    *, n_classes: int = 120, per_class: int = 100, test_per_class: int = 60, dim: int = 768, seed: int = 0
) -> Features:
    """Backbone-like features: two modes per class in a 128-d subspace, within-class and power-law nuisance noise.

    The modes lie on either side of their class's centre, a structure a linear head cannot fully use and an MLP
    can: on these features an untuned MLP edges out an untuned linear head (both about 0.84 validation top-1).
    """
    rng = np.random.default_rng(seed)
    k, separation, mode_spread = 128, 0.4, 1.0
    basis = np.linalg.qr(rng.normal(size=(dim, k)))[0]  # (dim, k) orthonormal
    centres = rng.normal(size=(n_classes, 1, k)) * separation
    offsets = rng.normal(size=(n_classes, 1, k)) * separation * mode_spread
    mode_means = np.concatenate([centres + offsets, centres - offsets], axis=1)  # (n_classes, 2, k)
    nuisance = np.linalg.qr(rng.normal(size=(dim, dim)))[0] * (3.0 / np.sqrt(np.arange(1, dim + 1)))
    n_rows = per_class + test_per_class
    labels = np.repeat(np.arange(n_classes), n_rows)
    latent = mode_means[labels, rng.integers(0, 2, size=labels.size)] + rng.normal(size=(labels.size, k))
    X = latent @ basis.T + rng.normal(size=(labels.size, dim)) @ nuisance.T + 0.3 * rng.normal(size=(labels.size, dim))
    X = (X * np.exp(rng.normal(0.0, 0.5, size=dim)) + rng.normal(0.0, 1.0, size=dim)).astype(np.float32)
    is_test = np.tile(np.arange(n_rows) >= per_class, n_classes)
    train_rows = np.flatnonzero(~is_test)
    keep, held = stratified_split(labels[train_rows], fraction=0.2, seed=0)  # DataConfig's val_fraction, split_seed
    train, val, test = train_rows[keep], train_rows[held], np.flatnonzero(is_test)
    return Features(X[train], labels[train], X[val], labels[val], X[test], labels[test])


def run_search(
    feats: Features, *, heads: tuple[str, ...], trials: int, max_epochs: int, seed: int, device: str = "cpu"
) -> dict[str, Any]:
    """One fresh study: wall time, trial counts, epochs trained, best validation top-1, refit and test top-1."""
    cfg = TuneConfig(trials=trials, timeout_s=24 * 3600.0, heads=heads, max_epochs=max_epochs, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'optuna.db'}"
        start = time.perf_counter()
        result = tune_head(
            feats.X_train, feats.y_train, feats.X_val, feats.y_val, cfg=cfg, storage=storage, study_name="bench",
            device=device, progress=False,
        )
        wall_s = time.perf_counter() - start
        study = optuna.load_study(study_name="bench", storage=storage)
        epochs = sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))
    start = time.perf_counter()
    head = build_head(result.best_params, max_epochs=result.best_epoch, seed=seed, device=device)
    head.fit(np.concatenate([feats.X_train, feats.X_val]), np.concatenate([feats.y_train, feats.y_val]))
    refit_s = time.perf_counter() - start
    return {
        "wall_s": wall_s, "n_trials": result.n_trials, "n_complete": result.n_complete, "n_pruned": result.n_pruned,
        "epochs": epochs, "best_val_top1": result.best_val_top1, "best_params": result.best_params,
        "best_epoch": result.best_epoch, "refit_s": refit_s,
        "test_top1": float(np.mean(head.predict(feats.X_test) == feats.y_test)),
    }


def summarise(name: str, runs: list[dict[str, Any]], loads: list[float]) -> dict[str, Any]:
    """The first run's outcome (all repeats find the same study) with the median and all wall times."""
    first = runs[0]
    return {
        "search": name, **{k: v for k, v in first.items() if k != "wall_s"},
        "wall_s": statistics.median(r["wall_s"] for r in runs), "wall_s_all": [r["wall_s"] for r in runs],
        "same_result_each_repeat": all(r["best_params"] == first["best_params"] for r in runs),
        "loadavg_1min_before": loads,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("search", "trials", "wall s", "complete", "pruned", "epochs", "best head", "best ep", "val top1",
            "refit s", "test top1")
    lines = [
        (r["search"], str(r["n_trials"]), f"{r['wall_s']:.1f}", str(r["n_complete"]), str(r["n_pruned"]),
         str(r["epochs"]), r["best_params"]["head"], str(r["best_epoch"]), f"{r['best_val_top1']:.4f}",
         f"{r['refit_s']:.1f}", f"{r['test_top1']:.4f}")
        for r in rows
    ]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    for line in (cols, tuple("-" * w for w in widths), *lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--searches", nargs="+", choices=sorted(SEARCHES), default=["default", "linear"])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="fresh studies per search; the median wall time")
    parser.add_argument("--max-epochs", type=int, default=TuneConfig().max_epochs)
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (TuneConfig.seed)")
    parser.add_argument("--device", default="cpu", help="where heads train (dogbench run: the features' device)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = synthetic_features()
    rows = []
    for name in args.searches:
        runs, loads = [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            runs.append(run_search(feats, heads=SEARCHES[name], trials=args.trials, max_epochs=args.max_epochs,
                                   seed=args.seed, device=args.device))
        rows.append(summarise(name, runs, loads))
    print_table(rows)
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "optuna": optuna.__version__,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    report = {"trials": args.trials, "max_epochs": args.max_epochs, "repeats": args.repeats, "device": args.device,
              "n_train": len(feats.y_train), "n_val": len(feats.y_val), "n_test": len(feats.y_test),
              "dim": feats.X_train.shape[1], "n_classes": len(np.unique(feats.y_train)), "environment": env,
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
