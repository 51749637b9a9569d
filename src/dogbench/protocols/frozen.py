"""The frozen protocol: features from the cache, a head tuned by Optuna on validation, refit on train+val,
scored on test once, compared pairwise. Each stage reads and writes the run folder through ``rundir``, so stages
can run in separate processes and give the same ``results.json`` as one ``dogbench run``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dogbench.architecture import describe_model
from dogbench.backbones import BackboneInfo, load_backbone, measure_gflops, pretraining_of
from dogbench.config import Precision, RunConfig, crops_to_box
from dogbench.data import Dataset, imagenet_overlap, open_dataset, relabel_to, stratified_split
from dogbench.device import Policy, resolve_device, train_precision
from dogbench.errors import DogbenchError
from dogbench.evaluate import (
    ECE_BINS,
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    full_proba,
    reliability_bins,
)
from dogbench.features import FeatureSet, extract_features, feature_settings
from dogbench.features.cache import cache_key
from dogbench.heads import Head, head_identity
from dogbench.protocols.scoring import compare_all, environment, headline, test_scores
from dogbench.protocols.tta import (
    check_tta,
    extract_views,
    probe_scores_over_views,
    score_views,
    tta_comparisons,
    view_proba,
)
from dogbench.results import DatasetInfo, ModelResult, RunResults, StageTimes
from dogbench.rundir import NO_BOX, Predictions, RunDir, RunFolderError
from dogbench.tune import (
    SEARCH_SPACE_VERSION,
    BaselineResult,
    TuneResult,
    build_head,
    fixed_params,
    make_logistic,
    sweep_logistic_C,
    tune_head,
)


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
    extra: dict[str, FeatureSet] = field(default_factory=dict)  # second test sets (data.extra_test) by name
    crop_to_box: bool = False  # whether its images were cropped to their boxes (config.crops_to_box)
    views: dict[str, FeatureSet] = field(default_factory=dict)  # the test split's other TTA views (protocols.tta)


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


def check_dataset(dataset: Dataset) -> None:
    """Fail before any model is loaded when the dataset cannot give train, validation and test sets."""
    n_train, n_test = len(dataset.split("train")), len(dataset.split("test"))
    if n_train < 2 or n_test < 1:
        raise DogbenchError(
            f"Dataset {dataset.root} has {n_train} training and {n_test} test images; dogbench needs at least 2 "
            "training images (train and validation are carved from them) and 1 test image"
        )


def extra_test_sets(cfg: RunConfig, dataset: Dataset) -> dict[str, Dataset]:
    """``data.extra_test`` opened and labelled with the dataset's classes, by a unique name (the folder's)."""
    sets: dict[str, Dataset] = {}
    for root in cfg.data.extra_test:
        name, n = Path(root).name, 2
        while name in sets:
            name, n = f"{Path(root).name}~{n}", n + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no official lists": every image of a second test set is a test image
            sets[name] = relabel_to(open_dataset(root, seed=cfg.data.split_seed), dataset.classes)
        trained_on = {s.path.resolve() for s in dataset.split("train")}
        seen = [s.sample_id for s in sets[name].samples if s.path.resolve() in trained_on]
        if seen:
            raise DogbenchError(f"Second test set {root} holds {len(seen)} of the dataset's training images (e.g. "
                                f"{seen[0]}): a test set must be photos the heads were not trained on")
    return sets


def extract_stage(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> dict[str, BackboneFeatures]:
    """Load each backbone and get its features from the cache (the dataset's and each second test set's),
    computing what is missing."""
    check_dataset(dataset)
    check_tta(cfg)
    if cfg.data.box_ablation and not any(s.box for s in dataset.samples):
        raise DogbenchError(f"data.box_ablation compares box-cropped and whole images, but {dataset.root} has no "
                            "annotated boxes (Stanford Dogs' Annotation/ folder); turn it off or add the annotations")
    extra_sets = extra_test_sets(cfg, dataset)  # before any model is loaded: a bad folder fails in a second
    policy = Policy.resolve(cfg.features.device, cfg.features.precision)
    out: dict[str, BackboneFeatures] = {}
    for bcfg in cfg.backbones:
        crop = crops_to_box(cfg, bcfg)
        times = StageTimes()
        with times.measure("load"):
            backbone = load_backbone(bcfg)
            gflops = measure_gflops(backbone)
        with times.measure("extract"):
            feats = extract_features(
                backbone, dataset, cfg=cfg.features, crop_to_box=crop, strict=cfg.data.strict, progress=progress,
                policy=policy,
            )
            views = extract_views(cfg, backbone, dataset, crop_to_box=crop, policy=policy, progress=progress)
        with times.measure("extra_test"):
            extra = {name: extract_features(backbone, ds, cfg=cfg.features, crop_to_box=crop,
                                            strict=cfg.data.strict, progress=progress, policy=policy)
                     for name, ds in extra_sets.items()}
        for name, ef in extra.items():
            if not ef.sample_ids:
                raise DogbenchError(f"Second test set {name} ({extra_sets[name].root}) has no readable image")
        splits = make_splits(feats, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
        arch = describe_model(backbone.model, name=bcfg.model, tag=backbone.tag).to_dict()
        out[bcfg.label] = BackboneFeatures(backbone.info(), feats, splits, gflops, times, arch, extra, crop, views)
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
        "pruner": t.pruner, "baseline": t.baseline,
        **fixed_params(balance=cfg.data.balance, metric=t.metric),  # only where not the default: older runs match
        # the AdamW heads' precision follows the device (device.train_precision): another may train them otherwise
        "head_precision": train_precision(torch_device(cfg)).value,
    })


def torch_device(cfg: RunConfig) -> Any:
    """Where heads train, as a torch device: ``tune.device``, or with "auto" the features' device."""
    return resolve_device(cfg.features.device if cfg.tune.device == "auto" else cfg.tune.device)


def head_device(cfg: RunConfig) -> str:
    """Where heads train: ``tune.device``, or with "auto" the features' device."""
    return str(torch_device(cfg))


def tune_backbone(cfg: RunConfig, run: RunDir, label: str, bf: BackboneFeatures, *, progress: bool) -> Tuning:
    """Tune the head (resuming this folder's study) and sweep the baseline's C; write ``<label>/tuning.json``."""
    feats, splits = bf.features, bf.splits
    X, y = feats.features, feats.labels
    digest = tuning_digest(cfg, feats.key)
    try:
        saved = run.read_tuning(label, Tuning.from_dict)
    except RunFolderError as err:  # this stage writes the file anew: an unreadable one is only a lost cache
        warnings.warn(f"{err}; tuning again", stacklevel=2)
        saved = None
    saved = saved if saved and saved.digest == digest else None
    storage = cfg.tune.storage or run.default_storage()
    times = StageTimes()
    baseline = saved.baseline if saved else None
    if cfg.tune.baseline and baseline is None:  # first: the search starts from the baseline's solution
        with times.measure("baseline"):
            baseline = sweep_logistic_C(X[splits.train], y[splits.train], X[splits.val], y[splits.val],
                                        device=head_device(cfg), balance=cfg.data.balance, metric=cfg.tune.metric)
    with times.measure("tune"):  # the study's own lock (SQLite) is taken by the study runner
        tuned = tune_head(
            X[splits.train], y[splits.train], X[splits.val], y[splits.val], cfg=cfg.tune, storage=storage,
            study_name=f"{cfg.tune.study}-{label}" if cfg.tune.study else f"{label}-{digest[:16]}",
            device=head_device(cfg), progress=progress,
            baseline=baseline if cfg.tune.baseline else None, balance=cfg.data.balance,
        )
    tuning = Tuning(digest, tuned, baseline if cfg.tune.baseline else None, times.wall, times.cpu)
    run.write_tuning(label, tuning.to_dict())
    bf.times.wall.update(times.wall)
    bf.times.cpu.update(times.cpu)
    return tuning


def load_tuning(cfg: RunConfig, run: RunDir, label: str, bf: BackboneFeatures) -> Tuning:
    """The tune stage's output for ``label``, checked against these features and this config."""
    tuning = run.read_tuning(label, Tuning.from_dict)
    if tuning is None:
        raise DogbenchError(f"No tuning for '{label}' in {run.path}: run `{run.rebuild('tuning')}` first")
    if tuning.digest != tuning_digest(cfg, bf.features.key):
        raise DogbenchError(
            f"{run.tuning_path(label)} was tuned on other features, split or search space than this config; "
            f"run `{run.rebuild('tuning')}` again"
        )
    for stage in ("tune", "baseline"):  # the tune stage's cost, measured in its own process
        if stage in tuning.wall_s:
            bf.times.wall[stage] = tuning.wall_s[stage]
            bf.times.cpu[stage] = tuning.cpu_s.get(stage, 0.0)
    return tuning


def _head_proba(head: Any, X: np.ndarray, temperature: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A head's probabilities over every class, before and after its temperature (what predict gives; the
    argmax and every rank are the raw ones)."""
    raw = full_proba(head.predict_proba(X), head.classes_, n_classes)
    return raw, apply_temperature(raw, temperature)


def evaluate_backbone(
    cfg: RunConfig, run: RunDir, dataset: Dataset, label: str, bf: BackboneFeatures, tuning: Tuning
) -> tuple[ModelResult, dict[str, bool], dict[str, dict[str, bool]]]:
    """Refit the best head (and the baseline) on train+val, score the test split once; save head and predictions."""
    feats, splits, times, n_classes = bf.features, bf.splits, bf.times, len(dataset.classes)
    X, y = feats.features, feats.labels
    y_test = y[splits.test]
    test_ids = [feats.sample_ids[i] for i in splits.test]
    best = tuning.tune
    with times.measure("calibrate"):
        temperature, val_before, val_after = calibrate(cfg, best.best_params, best.best_epoch, X, y, splits, n_classes)
    with times.measure("fit"):
        head = _refit_head(cfg, run, dataset, label, bf, tuning, temperature)
    with times.measure("evaluate"):
        per_view = view_proba(head, X[splits.test], bf.views, test_ids, n_classes)
        scored = score_views(cfg, label, per_view, temperature, y_test, dataset, test_ids)
        raw, proba = scored.raw, scored.proba
        scores, metrics, correct = test_scores(y_test, proba, dataset, cfg)
        _write_test_predictions(run, label, dataset, test_ids, y_test, proba, raw, metrics.confusion)
        calibration = {
            "temperature": temperature, "bins": ECE_BINS,
            "fitted_on": "validation, by the tuned head trained on train only (the trial's model)",
            "val": {"before": val_before, "after": val_after},
            "test": {"before": calibration_metrics(y_test, raw), "after": calibration_metrics(y_test, proba)},
            "reliability": {"before": reliability_bins(y_test, raw).to_dict(),
                            "after": reliability_bins(y_test, proba).to_dict()},
        }
    probe, baseline = None, {}
    if tuning.baseline is not None:
        with times.measure("baseline"):
            fit_rows = np.concatenate([splits.train, splits.val])
            probe = make_logistic(tuning.baseline.C, device=head_device(cfg), balance=cfg.data.balance)
            probe.fit(X[fit_rows], y[fit_rows])
            probe_scores = probe_scores_over_views(probe, X[splits.test], bf.views, test_ids, y_test, dataset, cfg)
        baseline = {"C": tuning.baseline.C, "val": {"top1": tuning.baseline.val_top1},
                    "curve": tuning.baseline.curve, "test": probe_scores}
    with times.measure("extra_test"):
        extra_scores, extra_correct = _extra_test_scores(cfg, dataset, bf, head, temperature, probe)
    result = _model_result(label, dataset, bf, tuning, head, test=scores, baseline=baseline,
                           calibration=calibration, extra_test=extra_scores, tta=scored.record)
    return result, dict(zip(test_ids, correct.tolist(), strict=True)), extra_correct


def _refit_head(cfg: RunConfig, run: RunDir, dataset: Dataset, label: str, bf: BackboneFeatures, tuning: Tuning,
                temperature: float | None) -> Head:
    """The tuned head trained on train+val for the tuned number of epochs (no validation left), saved with the
    backbone's identity and its calibration."""
    feats, splits, best = bf.features, bf.splits, tuning.tune
    fit_rows = np.concatenate([splits.train, splits.val])
    head = build_head(best.best_params, max_epochs=best.best_epoch, seed=cfg.tune.seed, device=head_device(cfg))
    head.fit(feats.features[fit_rows], feats.labels[fit_rows])
    info = bf.info
    settings = feature_settings(cfg.features, crop_to_box=bf.crop_to_box,
                                precision=Precision(feats.precision), preprocess=info.preprocess)
    identity = head_identity(timm_tag=info.tag, weights_sha256=info.weights_sha256,
                             preprocess=info.preprocess.to_dict(), features=settings, feature_key=feats.key)
    head.save(run.head_dir(label), identity=identity, class_names=dataset.classes, temperature=temperature)
    return head


def _write_test_predictions(run: RunDir, label: str, dataset: Dataset, test_ids: list[str], y_test: np.ndarray,
                            proba: np.ndarray, raw: np.ndarray, confusion: np.ndarray) -> None:
    sample_of = {s.sample_id: s for s in dataset.samples}
    boxes = np.asarray([sample_of[i].box or NO_BOX for i in test_ids], dtype=np.int64).reshape(-1, 4)
    run.write_predictions(label, Predictions(
        sample_ids=np.asarray(test_ids), y_true=y_test, proba=proba.astype(np.float32), confusion=confusion,
        paths=np.asarray([str(sample_of[i].path) for i in test_ids]), boxes=boxes, classes=tuple(dataset.classes),
        proba_uncalibrated=raw.astype(np.float32),
    ))


def _extra_test_scores(cfg: RunConfig, dataset: Dataset, bf: BackboneFeatures, head: Head,
                       temperature: float | None, probe: Head | None,
                       ) -> tuple[dict[str, Any], dict[str, dict[str, bool]]]:
    """The same head, calibration and baseline on each second test set: scores and per-image correctness."""
    n_classes = len(dataset.classes)
    extra_scores, extra_correct = {}, {}
    for name, ef in bf.extra.items():
        _, e_proba = _head_proba(head, ef.features, temperature, n_classes)
        e_scores, _, e_correct = test_scores(ef.labels, e_proba, dataset, cfg)
        e_scores["calibration"] = calibration_metrics(ef.labels, e_proba)
        e_scores["skipped"] = len(ef.skipped)
        if probe is not None:
            e_scores["baseline"] = probe_scores_over_views(probe, ef.features, {}, list(ef.sample_ids), ef.labels,
                                                           dataset, cfg)  # second test sets: the plain view only
        extra_scores[name] = e_scores
        extra_correct[name] = dict(zip(ef.sample_ids, e_correct.tolist(), strict=True))
    return extra_scores, extra_correct


def _model_result(label: str, dataset: Dataset, bf: BackboneFeatures, tuning: Tuning, head: Head, *,
                  test: dict[str, Any], baseline: dict[str, Any], calibration: dict[str, Any],
                  extra_test: dict[str, Any], tta: dict[str, Any]) -> ModelResult:
    feats, info, best, times = bf.features, bf.info, tuning.tune, bf.times
    pretraining = pretraining_of(info.tag, info.weights)
    return ModelResult(
        label=label, backbone=info.tag, weights=info.weights, weights_sha256=info.weights_sha256,
        feature_dim=info.feature_dim, params=info.params, gflops=bf.gflops, preprocess=info.preprocess.to_dict(),
        feature_key=feats.key, cache_hit=feats.cache_hit, device=feats.device, precision=feats.precision,
        head={"kind": best.best_params["head"], "params": best.best_params,
              **({"iterations": head.n_iter_, "epochs": None} if best.best_params["head"] == "logistic" else
                 {"epochs": best.best_epoch}),
              "study": best.study_name, "n_trials": best.n_trials, "n_pruned": best.n_pruned},
        val={"top1": best.best_val_top1},
        test=test,
        baseline=baseline,
        timing_s={k: round(v, 4) for k, v in times.wall.items()},
        cpu_s={k: round(v, 4) for k, v in times.cpu.items()},
        throughput_img_s=feats.throughput_img_s,
        pretraining=pretraining.describe(),
        leaky=pretraining.imagenet and imagenet_overlap(dataset),
        architecture=bf.architecture,
        calibration=calibration,
        extra_test=extra_test,
        description=info.description,
        tta=tta,
    )


TEMPERATURE_BOUNDS = (0.05, 20.0)


def calibrate(
    cfg: RunConfig, params: dict[str, Any], epochs: int, X: np.ndarray, y: np.ndarray, splits: Splits, n_classes: int,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Temperature scaling on the validation split (Guo et al. 2017): the tuned head retrained on train only
    for its best epoch count (the trial's own model: validation is out of its sample) scores validation, and
    the temperature minimising its negative log-likelihood is returned with validation's {ece, nll, brier}
    before and after."""
    val_head = build_head(params, max_epochs=epochs, seed=cfg.tune.seed, device=head_device(cfg))
    val_head.fit(X[splits.train], y[splits.train])
    val_proba = full_proba(val_head.predict_proba(X[splits.val]), val_head.classes_, n_classes)
    temperature = validation_temperature(y[splits.val], val_proba)
    return (temperature, calibration_metrics(y[splits.val], val_proba),
            calibration_metrics(y[splits.val], apply_temperature(val_proba, temperature)))


def validation_temperature(y_val: np.ndarray, val_proba: np.ndarray, *, label: str = "") -> float:
    """The temperature minimising validation NLL (Guo et al. 2017); 1 (with a warning) when the fit ran to its
    bound or validation has no mistake: NLL then falls without end as T -> 0, so the model is kept as it is."""
    temperature = fit_temperature(y_val, val_proba, bounds=TEMPERATURE_BOUNDS)
    at_bound = not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] / 1.01
    if at_bound or bool(np.all(val_proba.argmax(axis=1) == y_val)):
        warnings.warn(f"{label + ': ' if label else ''}temperature scaling skipped: the validation fit ran to its "
                      f"bound ({temperature:.3g}) or validation has no mistake to calibrate against; T = 1",
                      stacklevel=3)
        return 1.0
    return temperature


def evaluate_stage(
    cfg: RunConfig,
    run: RunDir,
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
    extra_correct: dict[str, dict[str, dict[str, bool]]] = {}  # set -> label -> sample id -> correct
    for label, bf in extracted.items():
        models[label], correct_by_label[label], extra = evaluate_backbone(cfg, run, dataset, label, bf,
                                                                          tuning[label])
        for name, correct in extra.items():
            extra_correct.setdefault(name, {})[label] = correct
    comparisons = compare_all(correct_by_label, cfg)
    reference_extra = next(iter(extracted.values())).extra
    extra_test = {
        name: {"root": str(cfg.data.extra_test[i]), "n": len(reference_extra[name].sample_ids),
               "skipped": len(reference_extra[name].skipped), "comparisons": compare_all(extra_correct[name], cfg)}
        for i, name in enumerate(reference_extra)
    }
    reference = next(iter(extracted.values()))  # every backbone sees the same images and splits
    first, splits = reference.features, reference.splits
    timing = {"data": round(data_s, 4)}
    for stage in ("load", "extract", "tune", "baseline", "calibrate", "fit", "evaluate", "extra_test"):
        timing[stage] = round(sum(bf.times.wall.get(stage, 0.0) for bf in extracted.values()), 4)
    timing["total"] = round(time.perf_counter() - start, 4)
    results = RunResults(
        models=models,
        **headline({k: m.val["top1"] for k, m in models.items()}, correct_by_label, comparisons, cfg),
        comparisons=comparisons + tta_comparisons(models.values()),  # the headline compares backbones only
        dataset=DatasetInfo(
            name=dataset.name, root=str(dataset.root), layout=dataset.layout, split_source=dataset.split_source,
            n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test),
            n_classes=len(dataset.classes), skipped=len(first.skipped),
            skipped_files=[{"id": sid, "reason": why} for sid, why in first.skipped],
        ),
        environment=environment(first.device),
        config=cfg.to_dict(),
        timing_s=timing,
        extra_test=extra_test,
    )
    run.write_results(results)
    return results


def refit_and_score(
    cfg: RunConfig, X: np.ndarray, y: np.ndarray, *, train: np.ndarray, val: np.ndarray, fit: np.ndarray,
    test: np.ndarray, seed: int, trials: int, study_name: str, n_classes: int,
) -> dict[str, np.ndarray]:
    """Test probabilities (columns: every class) of a head tuned in memory with ``trials`` trials on (train, val)
    and refit on the ``fit`` rows, and with ``tune.baseline`` of the C-swept logistic probe fitted on them: the
    repeated analyses (seeds, data efficiency) on cached features."""
    out, sweep = {}, None
    if cfg.tune.baseline:
        sweep = sweep_logistic_C(X[train], y[train], X[val], y[val], device=head_device(cfg),
                                 balance=cfg.data.balance, metric=cfg.tune.metric)
        probe = make_logistic(sweep.C, device=head_device(cfg), balance=cfg.data.balance).fit(X[fit], y[fit])
        out["baseline"] = full_proba(probe.predict_proba(X[test]), probe.classes_, n_classes)
    tuned = tune_head(X[train], y[train], X[val], y[val], cfg=dataclasses.replace(cfg.tune, trials=trials, seed=seed),
                      storage=None, study_name=study_name, device=head_device(cfg), progress=False, baseline=sweep,
                      balance=cfg.data.balance)
    head = build_head(tuned.best_params, max_epochs=tuned.best_epoch, seed=seed, device=head_device(cfg))
    head.fit(X[fit], y[fit])
    out["tuned"] = full_proba(head.predict_proba(X[test]), head.classes_, n_classes)
    return out


def add_analysis(
    run: RunDir, results: RunResults, *, stage: str, field_name: str, compute: Callable[[], dict[str, Any]]
) -> RunResults:
    """``results`` with ``compute()`` stored under ``field_name`` and its wall time in ``timing_s[stage]`` (added
    to the total), written to the run folder."""
    times = StageTimes()
    with times.measure(stage):
        value = compute()
    timing = {**results.timing_s, stage: round(times.wall[stage], 4)}
    timing["total"] = round(timing.get("total", 0.0) + timing[stage], 4)
    results = dataclasses.replace(results, **{field_name: value}, timing_s=timing)
    run.write_results(results)
    return results
