"""The main job as four stages over the library: data -> features -> tune -> evaluate.

Each stage is a function the CLI calls (``dogbench extract``, ``tune``, ``evaluate``; ``run`` calls them
all). What a stage hands to the next is written into the run folder (``config.json``,
``<label>/tuning.json``, ``<label>/head/``, ``<label>/predictions.npz``, ``results.json``), so stages can run
in separate processes and nothing computed is lost when a later one fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from dogbench.atomic import atomic_write_json, atomic_write_with
from dogbench.backbones import Backbone, load_backbone, measure_gflops
from dogbench.config import RunConfig
from dogbench.data import Dataset, stratified_split
from dogbench.download import prepare_dataset
from dogbench.evaluate import bootstrap_ci, classification_metrics, compare_paired
from dogbench.features import FeatureSet, extract_features
from dogbench.results import DatasetInfo, ModelResult, RunResults, StageTimes
from dogbench.tune import BaselineResult, TuneResult, build_head, make_logistic, sweep_logistic_C, tune_head


@dataclass
class BackboneFeatures:
    """One backbone, its cached features and what producing them cost."""

    backbone: Backbone
    features: FeatureSet
    gflops: float
    times: StageTimes


@dataclass(frozen=True)
class Splits:
    """Row indices into a FeatureSet: train/val carved from the training split (seeded, stratified), test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.out) if cfg.out else default_run_dir()


def extract_stage(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> dict[str, BackboneFeatures]:
    """Load each backbone and get its features from the cache, computing what is missing."""
    out: dict[str, BackboneFeatures] = {}
    for bcfg in cfg.backbones:
        times = StageTimes()
        with times.measure("load"):
            backbone = load_backbone(bcfg, seed=cfg.tune.seed)
            gflops = measure_gflops(backbone)
        with times.measure("extract"):
            feats = extract_features(
                backbone, dataset, cfg=cfg.features, crop_to_box=cfg.data.crop_to_box, strict=cfg.data.strict,
                progress=progress,
            )
        out[bcfg.label] = BackboneFeatures(backbone, feats, gflops, times)
    return out


def make_splits(feats: FeatureSet, *, val_fraction: float, seed: int) -> Splits:
    train_rows = np.flatnonzero(feats.splits == "train")
    test_rows = np.flatnonzero(feats.splits == "test")
    if len(train_rows) < 2 or len(test_rows) < 1:
        raise ValueError(f"Need training and test images; got {len(train_rows)} train and {len(test_rows)} test")
    keep, held = stratified_split(feats.labels[train_rows], fraction=val_fraction, seed=seed)
    return Splits(train=train_rows[keep], val=train_rows[held], test=test_rows)


def tune_stage(
    cfg: RunConfig, run_dir: Path, extracted: dict[str, BackboneFeatures], *, progress: bool = True
) -> dict[str, tuple[TuneResult, BaselineResult | None]]:
    """Tune each backbone's head on train/val (resuming a study in the run folder) and sweep the baseline's C."""
    out: dict[str, tuple[TuneResult, BaselineResult | None]] = {}
    storage = cfg.tune.storage or f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    for label, bf in extracted.items():
        feats = bf.features
        splits = make_splits(feats, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
        X, y = feats.features, feats.labels
        with bf.times.measure("tune"):
            tuned = tune_head(
                X[splits.train], y[splits.train], X[splits.val], y[splits.val], cfg=cfg.tune, storage=storage,
                study_name=f"{label}-{feats.key[:16]}", progress=progress,
            )
        baseline = None
        if cfg.tune.baseline:
            saved = _load_json(run_dir / label / "tuning.json").get("baseline")
            with bf.times.measure("baseline"):
                if saved and saved.get("feature_key") == feats.key:
                    baseline = BaselineResult(**{k: v for k, v in saved.items() if k != "feature_key"})
                else:
                    baseline = sweep_logistic_C(X[splits.train], y[splits.train], X[splits.val], y[splits.val])
        record = {"feature_key": feats.key, "tune": tuned.to_dict(),
                  "baseline": {**baseline.to_dict(), "feature_key": feats.key} if baseline else None}
        atomic_write_json(run_dir / label / "tuning.json", record)
        out[label] = (tuned, baseline)
    return out


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_tuning(run_dir: Path, label: str, feature_key: str) -> tuple[TuneResult, BaselineResult | None]:
    record = _load_json(run_dir / label / "tuning.json")
    if not record:
        raise FileNotFoundError(f"No tuning for '{label}' in {run_dir}: run `dogbench tune` first")
    if record["feature_key"] != feature_key:
        raise ValueError(f"{run_dir / label / 'tuning.json'} was tuned on other features; run `dogbench tune` again")
    baseline = record.get("baseline")
    return (
        TuneResult.from_dict(record["tune"]),
        BaselineResult(**{k: v for k, v in baseline.items() if k != "feature_key"}) if baseline else None,
    )


def _full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class of the dataset (classes absent from training get probability 0)."""
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full


def _test_scores(y: np.ndarray, proba: np.ndarray, dataset: Dataset, cfg: RunConfig) -> tuple[dict, Any, np.ndarray]:
    metrics = classification_metrics(y, proba, class_names=list(dataset.classes))
    correct = proba.argmax(axis=1) == y
    ci = bootstrap_ci(correct, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
    scores = {
        "top1": metrics.top1, "top1_ci95": list(ci), "top5": metrics.top5, "macro_f1": metrics.macro_f1,
        "per_class": metrics.per_class, "n": metrics.n,
    }
    return scores, metrics, correct


def evaluate_stage(
    cfg: RunConfig,
    run_dir: Path,
    dataset: Dataset,
    extracted: dict[str, BackboneFeatures],
    tuning: dict[str, tuple[TuneResult, BaselineResult | None]],
    *,
    data_s: float = 0.0,
    total_start: float | None = None,
) -> RunResults:
    """Refit the best head (and the baseline) on train+val, score the test split once, compare backbones."""
    n_classes = len(dataset.classes)
    models: dict[str, ModelResult] = {}
    correct_by_label: dict[str, dict[str, bool]] = {}
    for label, bf in extracted.items():
        feats, times = bf.features, bf.times
        tuned, baseline = tuning[label]
        splits = make_splits(feats, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
        fit_rows = np.concatenate([splits.train, splits.val])
        X, y = feats.features, feats.labels
        with times.measure("fit"):
            head = build_head(tuned.best_params, max_epochs=cfg.tune.max_epochs, seed=cfg.tune.seed)
            head.fit(X[fit_rows], y[fit_rows], max_epochs=tuned.best_epoch)
            head.save(run_dir / label / "head")
        with times.measure("evaluate"):
            proba = _full_proba(head.predict_proba(X[splits.test]), head.classes_, n_classes)
            y_test = y[splits.test]
            scores, metrics, correct = _test_scores(y_test, proba, dataset, cfg)
            test_ids = [feats.sample_ids[i] for i in splits.test]
            correct_by_label[label] = dict(zip(test_ids, correct.tolist(), strict=True))
            atomic_write_with(
                run_dir / label / "predictions.npz",
                lambda h, ids=test_ids, p=proba, t=y_test, c=metrics.confusion: np.savez_compressed(
                    h, sample_ids=np.asarray(ids), y_true=t, proba=p.astype(np.float32), confusion=c
                ),
            )
        baseline_record: dict[str, Any] = {}
        if baseline is not None:
            with times.measure("baseline"):
                probe = make_logistic(baseline.C).fit(X[fit_rows], y[fit_rows])
                probe_proba = _full_proba(probe.predict_proba(X[splits.test]), probe.classes_, n_classes)
                probe_scores, _, _ = _test_scores(y_test, probe_proba, dataset, cfg)
            probe_scores.pop("per_class")
            baseline_record = {"C": baseline.C, "val": {"top1": baseline.val_top1}, "curve": baseline.curve,
                               "test": probe_scores}
        models[label] = ModelResult(
            label=label,
            backbone=bf.backbone.tag,
            weights=bf.backbone.weights,
            weights_sha256=bf.backbone.weights_sha256,
            feature_dim=bf.backbone.feature_dim,
            params=bf.backbone.params,
            gflops=bf.gflops,
            preprocess=bf.backbone.preprocess.to_dict(),
            feature_key=feats.key,
            cache_hit=feats.cache_hit,
            device=feats.device,
            precision=feats.precision,
            head={"kind": tuned.best_params["head"], "params": tuned.best_params, "epochs": tuned.best_epoch,
                  "study": tuned.study_name, "n_trials": tuned.n_trials, "n_pruned": tuned.n_pruned},
            val={"top1": tuned.best_val_top1},
            test=scores,
            baseline=baseline_record,
            timing_s={k: round(v, 4) for k, v in times.wall.items()},
            cpu_s={k: round(v, 4) for k, v in times.cpu.items()},
            throughput_img_s=feats.throughput_img_s,
        )
    comparisons = _compare_all(correct_by_label, cfg)
    first = extracted[next(iter(extracted))]
    splits = make_splits(first.features, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    skipped = first.features.skipped
    device = first.features.device
    timing = {"data": round(data_s, 4)}
    for stage in ("load", "extract", "tune", "baseline", "fit", "evaluate"):
        timing[stage] = round(sum(bf.times.wall.get(stage, 0.0) for bf in extracted.values()), 4)
    if total_start is not None:
        timing["total"] = round(time.perf_counter() - total_start, 4)
    results = RunResults(
        models=models,
        comparison=comparisons[0] if comparisons else None,
        comparisons=comparisons,
        dataset=DatasetInfo(
            name=dataset.name, root=str(dataset.root), layout=dataset.layout, split_source=dataset.split_source,
            n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test), n_classes=n_classes,
            skipped=len(skipped), skipped_files=[{"id": sid, "reason": why} for sid, why in skipped],
        ),
        environment=environment(device),
        config=cfg.to_dict(),
        timing_s=timing,
    )
    results.write(run_dir)
    return results


def _compare_all(correct_by_label: dict[str, dict[str, bool]], cfg: RunConfig) -> list[dict[str, Any]]:
    """Paired comparison of every pair of backbones on the test images both have (normally all of them)."""
    out = []
    for a, b in combinations(correct_by_label, 2):
        shared = sorted(set(correct_by_label[a]) & set(correct_by_label[b]))
        ca = np.asarray([correct_by_label[a][s] for s in shared])
        cb = np.asarray([correct_by_label[b][s] for s in shared])
        comp = compare_paired(a, ca, b, cb, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
        out.append(comp.to_dict())
    return out


def environment(device: str) -> dict[str, Any]:
    import timm
    import torch

    from dogbench import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dogbench": __version__,
        "device": device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def run(
    cfg: RunConfig, *, dataset: Dataset | None = None, data_s: float = 0.0, start: float | None = None,
    progress: bool = True,
) -> tuple[RunResults, Path]:
    """The main job: data, features (cached), tuning, evaluation; everything lands in the run folder.

    A caller that opened the dataset already passes it with the seconds it took (``data_s``) and its own
    ``start`` time, so the total covers the whole command.
    """
    start = time.perf_counter() if start is None else start
    run_dir = run_dir_of(cfg)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    if dataset is None:
        dataset = prepare_dataset(cfg.data)
        data_s = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    extracted = extract_stage(cfg, dataset, progress=progress)
    tuning = tune_stage(cfg, run_dir, extracted, progress=progress)
    results = evaluate_stage(cfg, run_dir, dataset, extracted, tuning, data_s=data_s, total_start=start)
    return results, run_dir
