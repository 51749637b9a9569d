"""The main job as stages over the library: data -> features -> tune -> evaluate.

``extract``, ``tune``, ``evaluate`` and ``run`` (all of them) are what the CLI calls. What a stage hands to the
next is written into the run folder (``config.json``, ``<label>/tuning.json``, ``<label>/head/``,
``<label>/predictions.npz``, ``results.json``), so stages can run in separate processes, give the same
``results.json`` as one ``run``, and nothing computed is lost when a later stage fails.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from dogbench.architecture import describe_model
from dogbench.atomic import atomic_write_json, atomic_write_with
from dogbench.backbones import BackboneInfo, load_backbone, measure_gflops, pretraining_of
from dogbench.cache import cache_key
from dogbench.config import ReportConfig, RunConfig
from dogbench.data import STANFORD_DOGS, Dataset, display_names, stratified_split
from dogbench.errors import DogbenchError
from dogbench.evaluate import ClassificationMetrics, bootstrap_ci, classification_metrics, compare_paired
from dogbench.features import FeatureSet, extract_features, resolve_device
from dogbench.results import DatasetInfo, ModelResult, RunResults, StageTimes
from dogbench.tune import (
    SEARCH_SPACE_VERSION,
    BaselineResult,
    TuneResult,
    build_head,
    make_logistic,
    sweep_logistic_C,
    tune_head,
)

if TYPE_CHECKING:
    from dogbench.report import ReportFiles
    from dogbench.report.runs import ModelRun

TUNING_FILE = "tuning.json"
NO_BOX = (-1, -1, -1, -1)  # predictions.npz "boxes" row of an image without an annotated box


@dataclass(frozen=True)
class Splits:
    """Row indices into a FeatureSet: train/val carved from the training split (seeded, stratified), test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class BackboneFeatures:
    """One backbone (the model itself is dropped after extraction), its features, their splits, stage costs."""

    info: BackboneInfo
    features: FeatureSet
    splits: Splits
    gflops: float
    times: StageTimes
    architecture: dict[str, Any]  # architecture.describe_model of the loaded model (layers, D, MLP, heads...)


@dataclass(frozen=True)
class Tuning:
    """What the tune stage hands to evaluation: the study's best head, the baseline's C, and their cost."""

    digest: str  # identifies features + split + search space; a mismatch means the tuning is stale
    tune: TuneResult
    baseline: BaselineResult | None
    wall_s: dict[str, float]  # tune, baseline (the C sweep)
    cpu_s: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest, "tune": self.tune.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "timing_s": self.wall_s, "cpu_s": self.cpu_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tuning:
        return cls(
            digest=d["digest"], tune=TuneResult.from_dict(d["tune"]),
            baseline=BaselineResult.from_dict(d["baseline"]) if d.get("baseline") else None,
            wall_s=d.get("timing_s", {}), cpu_s=d.get("cpu_s", {}),
        )


def run_dir_of(cfg: RunConfig) -> Path:
    """The run folder: ``out`` or ``runs/<timestamp>``."""
    return Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def check_dataset(dataset: Dataset) -> None:
    """Fail before any model is loaded when the dataset cannot give train, validation and test sets."""
    n_train, n_test = len(dataset.split("train")), len(dataset.split("test"))
    if n_train < 2 or n_test < 1:
        raise DogbenchError(
            f"Dataset {dataset.root} has {n_train} training and {n_test} test images; dogbench needs at least 2 "
            "training images (train and validation are carved from them) and 1 test image"
        )


def extract_stage(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> dict[str, BackboneFeatures]:
    """Load each backbone and get its features from the cache, computing what is missing."""
    check_dataset(dataset)
    out: dict[str, BackboneFeatures] = {}
    for bcfg in cfg.backbones:
        times = StageTimes()
        with times.measure("load"):
            backbone = load_backbone(bcfg)
            gflops = measure_gflops(backbone)
        with times.measure("extract"):
            feats = extract_features(
                backbone, dataset, cfg=cfg.features, crop_to_box=cfg.data.crop_to_box, strict=cfg.data.strict,
                progress=progress,
            )
        splits = make_splits(feats, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
        arch = describe_model(backbone.model, name=bcfg.model, tag=backbone.tag).to_dict()
        out[bcfg.label] = BackboneFeatures(backbone.info(), feats, splits, gflops, times, arch)
        del backbone  # frees the model (and its device memory) before the next one is loaded
    return out


def make_splits(feats: FeatureSet, *, val_fraction: float, seed: int) -> Splits:
    """Stratified, seeded validation rows carved from the readable training images; test rows as they are."""
    train_rows = np.flatnonzero(feats.splits == "train")
    test_rows = np.flatnonzero(feats.splits == "test")
    if len(train_rows) < 2 or len(test_rows) < 1:
        raise DogbenchError(
            f"Only {len(train_rows)} readable training and {len(test_rows)} readable test images are left"
        )
    keep, held = stratified_split(feats.labels[train_rows], fraction=val_fraction, seed=seed)
    return Splits(train=train_rows[keep], val=train_rows[held], test=test_rows)


def tuning_digest(cfg: RunConfig, feature_key: str) -> str:
    """Everything the tuning result depends on: features, validation split, search space and its bounds."""
    t = cfg.tune
    return cache_key({
        "features": feature_key, "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed,
        "heads": list(t.heads), "max_epochs": t.max_epochs, "seed": t.seed, "search_space": SEARCH_SPACE_VERSION,
    })


def head_device(cfg: RunConfig) -> str:
    """Where heads train: ``tune.device``, or with "auto" the features' device."""
    return str(resolve_device(cfg.features.device if cfg.tune.device == "auto" else cfg.tune.device))


def _read_tuning(run_dir: Path, label: str) -> Tuning | None:
    path = run_dir / label / TUNING_FILE
    return Tuning.from_dict(json.loads(path.read_text())) if path.is_file() else None


def tune_backbone(cfg: RunConfig, run_dir: Path, label: str, bf: BackboneFeatures, *, progress: bool) -> Tuning:
    """Tune the head (resuming this folder's study) and sweep the baseline's C; write ``<label>/tuning.json``."""
    feats, splits = bf.features, bf.splits
    X, y = feats.features, feats.labels
    digest = tuning_digest(cfg, feats.key)
    saved = _read_tuning(run_dir, label)
    saved = saved if saved and saved.digest == digest else None
    storage = cfg.tune.storage or f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    times = StageTimes()
    with times.measure("tune"):
        tuned = tune_head(
            X[splits.train], y[splits.train], X[splits.val], y[splits.val], cfg=cfg.tune, storage=storage,
            study_name=f"{label}-{digest[:16]}", device=head_device(cfg), progress=progress,
        )
    baseline = saved.baseline if saved else None
    if cfg.tune.baseline and baseline is None:
        with times.measure("baseline"):
            baseline = sweep_logistic_C(X[splits.train], y[splits.train], X[splits.val], y[splits.val])
    tuning = Tuning(digest, tuned, baseline if cfg.tune.baseline else None, times.wall, times.cpu)
    atomic_write_json(run_dir / label / TUNING_FILE, tuning.to_dict())
    bf.times.wall.update(times.wall)
    bf.times.cpu.update(times.cpu)
    return tuning


def load_tuning(cfg: RunConfig, run_dir: Path, label: str, bf: BackboneFeatures) -> Tuning:
    """The tune stage's output for ``label``, checked against these features and this config."""
    tuning = _read_tuning(run_dir, label)
    if tuning is None:
        raise DogbenchError(f"No tuning for '{label}' in {run_dir}: run `dogbench tune --out {run_dir}` first")
    if tuning.digest != tuning_digest(cfg, bf.features.key):
        raise DogbenchError(
            f"{run_dir / label / TUNING_FILE} was tuned on other features, split or search space than this config; "
            f"run `dogbench tune --out {run_dir}` again"
        )
    for stage in ("tune", "baseline"):  # the tune stage's cost, measured in its own process
        if stage in tuning.wall_s:
            bf.times.wall[stage] = tuning.wall_s[stage]
            bf.times.cpu[stage] = tuning.cpu_s.get(stage, 0.0)
    return tuning


def _full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class of the dataset (classes absent from training get probability 0)."""
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full


def _test_scores(
    y: np.ndarray, proba: np.ndarray, dataset: Dataset, cfg: RunConfig
) -> tuple[dict[str, Any], ClassificationMetrics, np.ndarray]:
    """Headline test scores with the bootstrap interval of top-1; the metrics; the per-image correctness."""
    metrics = classification_metrics(y, proba, class_names=list(dataset.classes))
    correct = proba.argmax(axis=1) == y
    ci = bootstrap_ci(correct, n_resamples=cfg.evaluate.n_bootstrap, seed=cfg.evaluate.seed)
    scores = {
        "top1": metrics.top1, "top1_ci95": list(ci), "top5": metrics.top5, "macro_f1": metrics.macro_f1,
        "per_class": metrics.per_class, "n": metrics.n,
    }
    return scores, metrics, correct


def evaluate_backbone(
    cfg: RunConfig, run_dir: Path, dataset: Dataset, label: str, bf: BackboneFeatures, tuning: Tuning
) -> tuple[ModelResult, dict[str, bool]]:
    """Refit the best head (and the baseline) on train+val, score the test split once; save head and predictions."""
    feats, splits, times, n_classes = bf.features, bf.splits, bf.times, len(dataset.classes)
    fit_rows = np.concatenate([splits.train, splits.val])
    X, y = feats.features, feats.labels
    y_test = y[splits.test]
    test_ids = [feats.sample_ids[i] for i in splits.test]
    sample_of = {s.sample_id: s for s in dataset.samples}
    boxes = np.asarray([sample_of[i].box or NO_BOX for i in test_ids], dtype=np.int64).reshape(-1, 4)
    best = tuning.tune
    with times.measure("fit"):
        head = build_head(best.best_params, max_epochs=best.best_epoch, seed=cfg.tune.seed, device=head_device(cfg))
        head.fit(X[fit_rows], y[fit_rows])  # no validation left: train the tuned number of epochs
        head.save(run_dir / label / "head")
    with times.measure("evaluate"):
        proba = _full_proba(head.predict_proba(X[splits.test]), head.classes_, n_classes)
        scores, metrics, correct = _test_scores(y_test, proba, dataset, cfg)
        atomic_write_with(
            run_dir / label / "predictions.npz",
            lambda h: np.savez_compressed(h, sample_ids=np.asarray(test_ids), y_true=y_test,
                                          proba=proba.astype(np.float32), confusion=metrics.confusion,
                                          paths=np.asarray([str(sample_of[i].path) for i in test_ids]),
                                          boxes=boxes,
                                          classes=np.asarray(dataset.classes)),
        )
    baseline: dict[str, Any] = {}
    if tuning.baseline is not None:
        with times.measure("baseline"):
            probe = make_logistic(tuning.baseline.C).fit(X[fit_rows], y[fit_rows])
            probe_proba = _full_proba(probe.predict_proba(X[splits.test]), probe.classes_, n_classes)
            probe_scores, _, _ = _test_scores(y_test, probe_proba, dataset, cfg)
        probe_scores.pop("per_class")
        baseline = {"C": tuning.baseline.C, "val": {"top1": tuning.baseline.val_top1},
                    "curve": tuning.baseline.curve, "test": probe_scores}
    info = bf.info
    pretraining = pretraining_of(info.tag, info.weights)
    result = ModelResult(
        label=label, backbone=info.tag, weights=info.weights, weights_sha256=info.weights_sha256,
        feature_dim=info.feature_dim, params=info.params, gflops=bf.gflops, preprocess=info.preprocess.to_dict(),
        feature_key=feats.key, cache_hit=feats.cache_hit, device=feats.device, precision=feats.precision,
        head={"kind": best.best_params["head"], "params": best.best_params, "epochs": best.best_epoch,
              "study": best.study_name, "n_trials": best.n_trials, "n_pruned": best.n_pruned},
        val={"top1": best.best_val_top1},
        test=scores,
        baseline=baseline,
        timing_s={k: round(v, 4) for k, v in times.wall.items()},
        cpu_s={k: round(v, 4) for k, v in times.cpu.items()},
        throughput_img_s=feats.throughput_img_s,
        pretraining=pretraining.describe(),
        leaky=pretraining.imagenet and dataset.name == STANFORD_DOGS,
        architecture=bf.architecture,
    )
    return result, dict(zip(test_ids, correct.tolist(), strict=True))


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
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "dogbench": __version__, "device": device, "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }


def evaluate_stage(
    cfg: RunConfig,
    run_dir: Path,
    dataset: Dataset,
    extracted: dict[str, BackboneFeatures],
    tuning: dict[str, Tuning],
    *,
    data_s: float,
    start: float,
) -> RunResults:
    """Evaluate every backbone, compare them pairwise, write ``results.json``, ``results.csv``, ``summary.txt``."""
    models: dict[str, ModelResult] = {}
    correct_by_label: dict[str, dict[str, bool]] = {}
    for label, bf in extracted.items():
        models[label], correct_by_label[label] = evaluate_backbone(cfg, run_dir, dataset, label, bf, tuning[label])
    comparisons = _compare_all(correct_by_label, cfg)
    reference = next(iter(extracted.values()))  # every backbone sees the same images and splits
    first, splits = reference.features, reference.splits
    timing = {"data": round(data_s, 4)}
    for stage in ("load", "extract", "tune", "baseline", "fit", "evaluate"):
        timing[stage] = round(sum(bf.times.wall.get(stage, 0.0) for bf in extracted.values()), 4)
    timing["total"] = round(time.perf_counter() - start, 4)
    results = RunResults(
        models=models,
        comparison=comparisons[0] if comparisons else None,
        comparisons=comparisons,
        dataset=DatasetInfo(
            name=dataset.name, root=str(dataset.root), layout=dataset.layout, split_source=dataset.split_source,
            n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test),
            n_classes=len(dataset.classes), skipped=len(first.skipped),
            skipped_files=[{"id": sid, "reason": why} for sid, why in first.skipped],
        ),
        environment=environment(first.device),
        config=cfg.to_dict(),
        timing_s=timing,
    )
    results.write(run_dir)
    return results


def _start_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    run_dir = run_dir_of(cfg)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    return cfg, run_dir


def tune(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> tuple[dict[str, Tuning], Path]:
    """``dogbench tune``: features (cached) and tuning; the run folder gets config.json and the tunings."""
    cfg, run_dir = _start_run_dir(cfg)
    extracted = extract_stage(cfg, dataset, progress=progress)
    tunings = {label: tune_backbone(cfg, run_dir, label, bf, progress=progress) for label, bf in extracted.items()}
    return tunings, run_dir


def evaluate(
    cfg: RunConfig, dataset: Dataset, *, data_s: float = 0.0, start: float | None = None, progress: bool = True
) -> tuple[RunResults, Path]:
    """``dogbench evaluate``: the tunings of an existing run folder, evaluated on its features."""
    start = time.perf_counter() if start is None else start
    if not cfg.out:
        raise DogbenchError("dogbench evaluate needs --out: the run folder that `dogbench tune` wrote")
    run_dir = Path(cfg.out)
    missing = [b.label for b in cfg.backbones if not (run_dir / b.label / TUNING_FILE).is_file()]
    if missing:  # before any extraction, which can take hours
        raise DogbenchError(f"No tuning for {missing} in {run_dir}: run `dogbench tune --out {run_dir}` first")
    extracted = extract_stage(cfg, dataset, progress=progress)
    tuning = {label: load_tuning(cfg, run_dir, label, bf) for label, bf in extracted.items()}
    results = evaluate_stage(cfg, run_dir, dataset, extracted, tuning, data_s=data_s, start=start)
    _report_after(cfg, run_dir, progress=progress)
    return results, run_dir


def run(
    cfg: RunConfig, dataset: Dataset, *, data_s: float = 0.0, start: float | None = None, progress: bool = True
) -> tuple[RunResults, Path]:
    """The main job: features (cached), tuning, evaluation; everything lands in the run folder.

    ``data_s`` and ``start`` let a caller that opened the dataset itself count that in the timings.
    """
    start = time.perf_counter() if start is None else start
    cfg, run_dir = _start_run_dir(cfg)
    extracted = extract_stage(cfg, dataset, progress=progress)
    tuning = {label: tune_backbone(cfg, run_dir, label, bf, progress=progress) for label, bf in extracted.items()}
    results = evaluate_stage(cfg, run_dir, dataset, extracted, tuning, data_s=data_s, start=start)
    _report_after(cfg, run_dir, progress=progress)
    return results, run_dir


def _report_after(cfg: RunConfig, run_dir: Path, *, progress: bool) -> None:
    """The report at the end of ``run`` / ``evaluate``; a failure there keeps the results already written."""
    if not cfg.report.enabled:
        return
    try:
        report_stage([run_dir], run_dir, cfg.report, progress=progress)
    except DogbenchError as err:
        raise DogbenchError(f"{err}\nThe results are saved in {run_dir}; only the report is missing: fix the above "
                            f"and run `dogbench report {run_dir}` (`--explain 0` loads no model)") from err


def explain_examples(run_dir: Path, first: ModelRun, ids: list[str], *, device: str) -> list[dict[str, Any]]:
    """Attention rollout / Grad-CAM overlays of the test images ``ids`` (rows of ``first``, the run's first model)
    for every model of a run folder, into ``<run_dir>/explanations/`` with ``explanations.json``."""
    from dogbench.explain import explain_run
    from dogbench.report.runs import EXPLANATIONS_DIR

    row_of = {sid: i for i, sid in enumerate(first.sample_ids)}
    rows = [row_of[i] for i in ids if Path(first.paths[row_of[i]]).is_file()]
    if not rows:
        raise DogbenchError(f"none of the {len(ids)} test images to explain is where the run read it (first: "
                            f"{first.paths[row_of[ids[0]]] if ids else '-'})")
    images = [(Path(first.paths[r]), tuple(int(v) for v in first.boxes[r]) if first.boxes[r][0] >= 0 else None)
              for r in rows]
    names = display_names(first.classes)
    extra = [{"sample_id": str(first.sample_ids[r]),
              "caption": f"{Path(first.paths[r]).name}: true breed {names[first.y_true[r]]}"} for r in rows]
    return explain_run(run_dir, images, run_dir / EXPLANATIONS_DIR, device=device, class_names=names, extra=extra)


def report_stage(run_dirs: list[Path], out_dir: Path, cfg: ReportConfig, *, progress: bool = True) -> ReportFiles:
    """Explain the grid's first ``cfg.explain`` test images where a run has no explanations of them yet, then
    write the report (``report.html``, ``report.md``) into ``out_dir``. Explanations that cannot be made (a
    moved image or weights file) leave a note in the report instead of stopping it."""
    from dogbench.report import build_report, load_runs, select_examples, write_report

    runs = load_runs(list(run_dirs))
    notes: list[str] = []
    if cfg.explain > 0:
        for i, run in enumerate(runs):
            models = list(run.models.values())
            ids = select_examples(models, n=cfg.examples, seed=cfg.seed)[: cfg.explain]
            if [r.get("sample_id") for r in run.explanations[:: len(models)]] == ids:
                continue  # these very images are explained already
            try:
                config = json.loads((run.path / "config.json").read_text())
                device = str(resolve_device(config.get("features", {}).get("device", "auto")))
                if progress:
                    print(f"explaining {len(ids)} test images for {', '.join(run.models)} ({run.path})",
                          file=sys.stderr)
                runs[i] = dataclasses.replace(run, explanations=explain_examples(run.path, models[0], ids,
                                                                                 device=device))
            except (DogbenchError, OSError) as err:
                notes.append(f"{run.name}: no explanations ({err}).")
    report = build_report(runs, examples=cfg.examples, confused_pairs=cfg.confused_pairs, seed=cfg.seed, notes=notes)
    return write_report(report, out_dir)
