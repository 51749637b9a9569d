"""The fine-tuning protocol: per backbone and method, train on the frozen protocol's split (the recipe tuned on
validation when asked), keep the best epoch, calibrate on validation and score test once through the predictor;
rows ``<label>/<method>`` join ``results.json`` (docs/guide/finetuning.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import safetensors.torch

from dogbench import distributed
from dogbench.atomic import atomic_write_bytes
from dogbench.backbones import load_backbone
from dogbench.config import FROZEN, BackboneConfig, RunConfig, crops_to_box
from dogbench.data import Dataset, Sample
from dogbench.device import Policy
from dogbench.errors import DogbenchError
from dogbench.evaluate import ECE_BINS, apply_temperature, calibration_metrics, reliability_bins
from dogbench.features import feature_settings
from dogbench.features.cache import cache_key
from dogbench.heads import fitted_linear_head, head_identity
from dogbench.predictor import Predictor
from dogbench.protocols.frozen import BackboneFeatures, Tuning, head_device, validation_temperature
from dogbench.protocols.recipe_search import RECIPE_SPACE_VERSION, search_record, start_params, suggest_recipe
from dogbench.protocols.scoring import compare_all, test_scores
from dogbench.protocols.tta import score_views, tta_comparisons
from dogbench.results import ModelResult, RunResults
from dogbench.rundir import (
    ADAPTER_FILE,
    BEST_EPOCH_FILE,
    FINETUNED_WEIGHTS,
    NO_BOX,
    TRAIN_PARAMS_FILE,
    TRAIN_STATE_FILE,
    Predictions,
    RunDir,
)
from dogbench.training import (
    TrainData,
    TrainFiles,
    TrainingError,
    TrainOutcome,
    TrainParams,
    build_trainable,
    export,
    load_best,
    load_for_training,
    load_last,
    load_state,
    resolve_params,
    train,
    validation_score,
    wise_mix,
)
from dogbench.tune import StudyPlan, make_logistic, make_pruner, run_study, sweep_logistic_C

PROBE_ABSENT_BIAS = -30.0  # lp-ft: a class the probe never saw (absent from the training split) starts impossible


def finetune_methods(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(m for m in cfg.finetune.methods if m != FROZEN)


def train_data(cfg: RunConfig, dataset: Dataset, bf: BackboneFeatures) -> tuple[TrainData, list[Sample], np.ndarray]:
    """The frozen protocol's split as images: train and validation samples (readable ones, the same rows its
    head was tuned on), and the test samples with their labels."""
    sample_of = {s.sample_id: s for s in dataset.samples}
    ids, labels = bf.features.sample_ids, bf.features.labels

    def rows(index: np.ndarray) -> tuple[tuple[Sample, ...], np.ndarray]:
        return tuple(sample_of[ids[i]] for i in index), labels[index].astype(np.int64)

    (train_s, train_y), (val_s, val_y), (test_s, test_y) = (rows(bf.splits.train), rows(bf.splits.val),
                                                            rows(bf.splits.test))
    data = TrainData(train_s, train_y, val_s, val_y, len(dataset.classes), crop_to_box=bf.crop_to_box,
                     reduced_decode=cfg.features.reduced_decode, decoder=cfg.features.decoder)
    return data, list(test_s), test_y


def probe_head(cfg: RunConfig, bf: BackboneFeatures, tuning: Tuning, n_classes: int, *, refit: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """LP-FT's start: the linear probe (the baseline's C, swept on validation) fitted on the training split's
    cached features (``refit``: on train + validation), as (weight (C, D), bias (C,)) on raw features (its
    standardisation folded in)."""
    X, y = bf.features.features, bf.features.labels
    train, val = bf.splits.train, bf.splits.val
    C = tuning.baseline.C if tuning.baseline is not None else sweep_logistic_C(
        X[train], y[train], X[val], y[val], device=head_device(cfg)).C
    fit = np.concatenate([train, val]) if refit else train
    probe = make_logistic(C, device=head_device(cfg)).fit(X[fit], y[fit])
    weight = probe.module_.weight.detach().cpu().double().numpy() / probe.scale_.astype(np.float64)
    bias = probe.module_.bias.detach().cpu().double().numpy() - weight @ probe.mean_.astype(np.float64)
    full_w = np.zeros((n_classes, X.shape[1]))
    full_b = np.full(n_classes, PROBE_ABSENT_BIAS)
    full_w[probe.classes_] = weight
    full_b[probe.classes_] = bias
    return full_w.astype(np.float32), full_b.astype(np.float32)


@dataclass(frozen=True)
class TrainJob:
    """One configuration to train: what every rank needs to build the same model and data (picklable: under
    torchrun rank 0 announces it and the other ranks train it with rank 0)."""

    backbone: BackboneConfig
    data: TrainData
    params: TrainParams
    probe: tuple[np.ndarray, np.ndarray] | None
    train_root: Path  # <label>/<method>/train/ of the run folder
    checkpoint_every: int
    policy: Policy  # rank 0's: every rank trains on its kind of device and validates at the test's precision


def train_files(folder: Path) -> TrainFiles:
    """The files of one trained configuration in ``folder``, by the run folder's names."""
    return TrainFiles(state=folder / TRAIN_STATE_FILE, params=folder / TRAIN_PARAMS_FILE,
                      best_template=folder / BEST_EPOCH_FILE)


def run_job(job: TrainJob, *, progress: bool, on_epoch: Any = None) -> tuple[Any, TrainOutcome]:
    """Train (or resume, or find finished) ``job`` in ``<train_root>/<key>/``, on every rank at once under
    torchrun (only rank 0 writes)."""
    backbone = load_for_training(job.backbone, job.params)
    trainable = build_trainable(backbone, job.data.n_classes, job.params, head_init=job.probe)
    probe = job.probe
    key = cache_key({"params": job.params.to_dict(), "data": job.data.digest(), "tag": backbone.tag,
                     "weights": backbone.weights_sha256, "model_kwargs": dict(job.backbone.model_kwargs),
                     "preprocess": backbone.preprocess.to_dict(),
                     "probe": None if probe is None else hashlib.sha256(probe[0].tobytes() + probe[1].tobytes())
                     .hexdigest()})[:16]
    outcome = train(trainable, backbone, job.data, job.params, train_files(job.train_root / key),
                    policy=job.policy, checkpoint_every=job.checkpoint_every, progress=progress, on_epoch=on_epoch)
    return trainable, outcome


def _train_once(cfg: RunConfig, run: RunDir, bcfg: BackboneConfig, data: TrainData, params: TrainParams, *,
                probe: tuple[np.ndarray, np.ndarray] | None, policy: Policy, progress: bool,
                on_epoch: Any = None) -> tuple[Any, TrainOutcome]:
    """One configuration of the run (its folder ``<label>/<method>/train/<key>/``); under torchrun the other
    ranks are told to train it too."""
    job = TrainJob(bcfg, data, params, probe, run.train_dir(bcfg.label, params.method), cfg.finetune.checkpoint_every,
                   policy)
    distributed.announce("train", job)
    return run_job(job, progress=progress, on_epoch=on_epoch)


def tune_and_train(cfg: RunConfig, run: RunDir, bcfg: BackboneConfig, method: str, data: TrainData, *,
                   is_vit: bool, probe: tuple[np.ndarray, np.ndarray] | None, policy: Policy, progress: bool
                   ) -> tuple[Any, TrainParams, TrainOutcome, dict[str, Any]]:
    """The method's model: its default recipe (``finetune.trials = 0``), or the best of an Optuna study over
    the recipe (``protocols.recipe_search``) on validation, pruned on per-epoch validation top-1, within
    ``finetune.budget_s`` wall seconds (no trial starts after it; the best finished trial wins). The study lives
    in the run folder's SQLite file (resumable: a trial killed mid-way is re-run with its parameters and continues
    from its training state) or on a database server (``tune.storage``), shared by as many workers as run it:
    ``finetune.trials`` finished trials in all, a seed per worker, a dead worker's trial run again (``run_study``)."""
    f = cfg.finetune
    base = resolve_params(f, method, is_vit=is_vit, policy=policy, balance=cfg.data.balance, metric=cfg.tune.metric)
    if f.trials == 0:
        trainable, outcome = _train_once(cfg, run, bcfg, data, base, probe=probe, policy=policy, progress=progress)
        return trainable, base, outcome, {}
    # trials are scored at the validation precision: a study of another precision (or before it counted) is another
    key = cache_key({"base": base.to_dict(), "data": data.digest(), "val_precision": policy.precision.value,
                     "space": RECIPE_SPACE_VERSION})
    name = f"finetune-{bcfg.label}-{method}-{key[:12]}"
    steps = max(1, len(data.train) // base.batch_size // base.grad_accum)

    def recipe(trial: optuna.Trial) -> TrainParams:
        return dataclasses.replace(base, **suggest_recipe(trial, method, base, is_vit=is_vit, steps_per_epoch=steps))

    def objective(trial: optuna.Trial) -> float:
        def report(epoch: int, val_top1: float) -> None:
            trial.report(val_top1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            _, outcome = _train_once(cfg, run, bcfg, data, recipe(trial), probe=probe, policy=policy,
                                     progress=progress, on_epoch=report)
        except TrainingError as err:
            if "loss became" not in str(err):
                raise
            raise optuna.TrialPruned(str(err)) from None  # a diverging lr is a bad configuration, not a failure
        return outcome.best_val_top1

    plan = StudyPlan(name=name, storage=cfg.tune.storage or run.default_storage(), trials=f.trials, seed=f.seed,
                     pruner=make_pruner(f.pruner, max_epochs=f.epochs, min_epochs=1),
                     start=start_params(method, base, is_vit=is_vit), timeout_s=f.budget_s or math.inf,
                     heartbeat_s=cfg.tune.heartbeat_s, grace_s=cfg.tune.grace_s, progress=progress)
    trials, best = run_study(plan, objective)  # resumable: a trial killed mid-way resumes its training state
    if best is None:
        raise DogbenchError(f"No fine-tuning trial of {bcfg.label}/{method} completed ({len(trials)} pruned or "
                            "failed): raise finetune.trials, finetune.epochs or finetune.budget_s, or use "
                            "finetune.pruner=none")
    params = recipe(optuna.trial.FixedTrial(best.params))
    trainable, outcome = _train_once(cfg, run, bcfg, data, params, probe=probe, policy=policy, progress=progress)
    return trainable, params, outcome, search_record(name, trials, best, wanted=f.trials, budget_s=f.budget_s)


def finetune_backbone(
    cfg: RunConfig, run: RunDir, dataset: Dataset, bcfg: BackboneConfig, method: str, bf: BackboneFeatures,
    tuning: Tuning, frozen: ModelResult, *, policy: Policy, progress: bool,
) -> tuple[ModelResult, dict[str, bool]]:
    """Fine-tune one backbone with one method under the stage's ``policy``, save the model into
    ``<label>/<method>/``, score test once."""
    label = f"{bcfg.label}/{method}"
    data, test_samples, y_test = train_data(cfg, dataset, bf)
    probe = probe_head(cfg, bf, tuning, len(dataset.classes)) if method == "lp-ft" else None
    wall0 = time.perf_counter()
    trainable, params, outcome, trials = tune_and_train(cfg, run, bcfg, method, data, is_vit=bf.info.is_vit,
                                                        probe=probe, policy=policy, progress=progress)
    load_best(trainable, outcome.best_path)
    wise = _wise(cfg, bcfg, trainable, data, params, probe, outcome, policy=policy) \
        if cfg.finetune.wise and method in WISE else {}
    exporter = _Exporter(cfg, run, dataset, bcfg, label, outcome, wise.get("val_top1", outcome.best_val_top1),
                         policy=policy)
    # the inference path: the model chosen on validation calibrates on it, then test is scored once
    model, head, adapter = exporter.as_model(trainable)
    eval0 = time.perf_counter()
    val_proba = _proba(model, data.val)
    refit: dict[str, Any] = {}
    if cfg.finetune.refit:  # then trains again on train + validation, and that model is tested
        trainable, refit = _refit(cfg, run, bcfg, bf, tuning, data, params, outcome, wise, method,
                                  policy=policy, progress=progress)
        model, head, adapter = exporter.as_model(trainable)
        eval0 = time.perf_counter()
    temperature = validation_temperature(data.val_labels, val_proba, label=label)
    exporter.save_head(model, head, temperature)
    test = _score_test(cfg, run, label, model, dataset, test_samples, y_test, temperature)
    evaluate_s = time.perf_counter() - eval0
    training = _training_record(run, bcfg, method, outcome, params, trainable, trials=trials, wise=wise,
                                refit=refit, weights_file=exporter.folder / FINETUNED_WEIGHTS)
    backbone = model.backbone
    run.write_finetuned(bcfg.label, method, {
        "method": method, "backbone": bcfg.label, "timm_tag": backbone.tag, "weights_sha256": backbone.weights_sha256,
        "adapter": ADAPTER_FILE if adapter is not None else None, "training": training,
    })
    info = bf.info
    result = ModelResult(
        label=label, backbone=backbone.tag, weights=info.weights, weights_sha256=backbone.weights_sha256,
        feature_dim=info.feature_dim, params=info.params, gflops=bf.gflops, preprocess=info.preprocess.to_dict(),
        feature_key="", cache_hit=False, device=str(policy.device), precision=policy.precision.value,
        head={"kind": "linear", "method": method, "epochs": outcome.best_epoch, "params": training["params"]},
        val={"top1": exporter.val_top1}, test=test.scores, baseline={},
        timing_s={"train": round(outcome.train_wall_s, 4), "export": round(eval0 - wall0 - outcome.train_wall_s, 4)
                  if not outcome.resumed else 0.0, "evaluate": round(evaluate_s, 4)},
        cpu_s={"train": round(outcome.train_cpu_s, 4)}, throughput_img_s=None,
        pretraining=frozen.pretraining, leaky=frozen.leaky, architecture=bf.architecture,
        calibration=_calibration(data.val_labels, val_proba, y_test, test, temperature, refit=bool(refit)),
        method=method, training=training, description=info.description, tta=test.tta,
    )
    return result, dict(zip(test.sample_ids, test.correct.tolist(), strict=True))


class _Exporter:
    """Writes a trained model into ``<label>/<method>/`` and loads it back through the inference path, at the
    precision that scored validation during training (``policy.precision``: ``features.precision`` resolved)."""

    def __init__(self, cfg: RunConfig, run: RunDir, dataset: Dataset, bcfg: BackboneConfig, label: str,
                 outcome: TrainOutcome, val_top1: float, *, policy: Policy) -> None:
        self.cfg, self.run, self.dataset, self.bcfg, self.label = cfg, run, dataset, bcfg, label
        self.outcome, self.val_top1, self.policy = outcome, val_top1, policy
        self.folder = run.finetuned_dir(bcfg.label, label.split("/")[1])

    def as_model(self, trained: Any) -> tuple[Predictor, Any, Any]:
        """``trained`` written to the run folder and loaded back as the predictor loads it."""
        backbone_state, layer, adapter = export(trained)
        atomic_write_bytes(self.folder / FINETUNED_WEIGHTS, safetensors.torch.save(backbone_state))
        if adapter is not None:
            atomic_write_bytes(self.folder / ADAPTER_FILE, safetensors.torch.save(adapter))
        loaded = load_backbone(dataclasses.replace(self.bcfg, label=self.label,
                                                   weights=str(self.folder / FINETUNED_WEIGHTS)))
        fitted = fitted_linear_head(layer, best_epoch=self.outcome.best_epoch, best_val_top1=self.val_top1,
                                    history=self.outcome.history)
        model = Predictor(self.label, loaded, fitted, classes=self.dataset.classes, features=self.cfg.features,
                          crop_to_box=crops_to_box(self.cfg, self.bcfg),
                          policy=self.policy, tta=self.cfg.evaluate.tta)
        return model, fitted, adapter

    def save_head(self, model: Predictor, head: Any, temperature: float | None) -> None:
        """The head with its backbone's identity and the validation temperature, as ``heads.load_head`` reads it."""
        backbone = model.backbone
        settings = feature_settings(self.cfg.features, crop_to_box=crops_to_box(self.cfg, self.bcfg),
                                    precision=self.policy.precision, preprocess=backbone.preprocess)
        identity = head_identity(timm_tag=backbone.tag, weights_sha256=backbone.weights_sha256,
                                 preprocess=backbone.preprocess.to_dict(), features=settings)
        head.save(self.run.head_dir(self.label), identity=identity, class_names=self.dataset.classes,
                  temperature=temperature)


@dataclass(frozen=True)
class _TestScores:
    """Test scored once through the inference path: probabilities before and after calibration, the scores."""

    sample_ids: list[str]
    raw: np.ndarray
    proba: np.ndarray
    scores: dict[str, Any]
    correct: np.ndarray
    tta: dict[str, Any]  # the row's test-time augmentation record (protocols.tta); {} without


def _score_test(cfg: RunConfig, run: RunDir, label: str, model: Predictor, dataset: Dataset,
                samples: list[Sample], y_test: np.ndarray, temperature: float | None) -> _TestScores:
    """Test's probabilities through ``model`` (the mean over its views of their calibrated probabilities), scored,
    and written to ``<label>/predictions.npz``."""
    test_ids = [s.sample_id for s in samples]
    scored = score_views(cfg, label, _proba(model, samples, plain=False), temperature, y_test, dataset, test_ids)
    raw, proba = scored.raw, scored.proba
    scores, metrics, correct = test_scores(y_test, proba, dataset, cfg)
    run.write_predictions(label, Predictions(
        sample_ids=np.asarray(test_ids), y_true=y_test, proba=proba.astype(np.float32), confusion=metrics.confusion,
        paths=np.asarray([str(s.path) for s in samples]),
        boxes=np.asarray([s.box or NO_BOX for s in samples], dtype=np.int64).reshape(-1, 4),
        classes=tuple(dataset.classes), proba_uncalibrated=raw.astype(np.float32),
    ))
    return _TestScores(test_ids, raw, proba, scores, np.asarray(correct), scored.record)


def _calibration(y_val: np.ndarray, val_proba: np.ndarray, y_test: np.ndarray, test: _TestScores,
                 temperature: float | None, *, refit: bool) -> dict[str, Any]:
    """The calibration record: the temperature, what it was fitted on, and ECE / reliability before and after."""
    return {
        "temperature": temperature, "bins": ECE_BINS,
        "fitted_on": "validation, by the best epoch's model (trained on train only)" + (
            "; applied to the model refit on train + validation" if refit else ""),
        "val": {"before": calibration_metrics(y_val, val_proba),
                "after": calibration_metrics(y_val, apply_temperature(val_proba, temperature))},
        "test": {"before": calibration_metrics(y_test, test.raw), "after": calibration_metrics(y_test, test.proba)},
        "reliability": {"before": reliability_bins(y_test, test.raw).to_dict(),
                        "after": reliability_bins(y_test, test.proba).to_dict()},
    }


def _training_record(run: RunDir, bcfg: BackboneConfig, method: str, outcome: TrainOutcome, params: TrainParams,
                     trainable: Any, *, trials: dict[str, Any], wise: dict[str, Any], refit: dict[str, Any],
                     weights_file: Path) -> dict[str, Any]:
    """The ``training`` record of a fine-tuned row: costs, epochs, precisions, recipe, search, WiSE-FT, refit."""
    return {
        "trainable_params": outcome.trainable_params, "total_params": outcome.total_params,
        "trainable_fraction": outcome.trainable_params / outcome.total_params,
        "train_wall_s": round(outcome.train_wall_s, 3), "train_cpu_s": round(outcome.train_cpu_s, 3),
        "train_img_s": round(outcome.images_per_s, 3), "train_images": outcome.train_images,
        "peak_memory_mb": round(outcome.peak_memory_mb, 1), "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch, "stopped_early": outcome.stopped_early, "history": outcome.history,
        "start_val_top1": outcome.start_val_top1, "wise": wise or None, "refit": refit or None,
        # torchrun: the batch (and the lr that goes with it) is global, split over the ranks
        "ranks": outcome.ranks, "global_batch": params.batch_size * params.grad_accum,
        "rank_batch": params.batch_size // outcome.ranks,
        "precision": outcome.precision, "val_precision": outcome.val_precision, "params": params.to_dict(),
        "trials": trials,
        # every configuration this method trained here (the search's trials included): the ladder's cost
        "search_wall_s": round(_search_wall_s(run, bcfg.label, method), 3),
        "lora_targets": len(trainable.lora_targets), "base": bcfg.label, "weights_file": str(weights_file),
    }


def _search_wall_s(run: RunDir, label: str, method: str) -> float:
    """Training wall seconds summed over every configuration trained for ``<label>/<method>`` in this folder."""
    total = 0.0
    for path in run.train_dir(label, method).glob(f"*/{TRAIN_STATE_FILE}"):
        try:
            total += float(load_state(path)["spent"]["wall"])
        except (TrainingError, KeyError, TypeError, ValueError):
            continue  # an unreadable state of another configuration: its cost is unknown, not an error here
    return total


WISE = ("full", "partial", "lp-ft")  # the methods whose start and end share every weight name (not LoRA)


def _wise(cfg: RunConfig, bcfg: BackboneConfig, trainable: Any, data: TrainData, params: TrainParams,
          probe: tuple[np.ndarray, np.ndarray] | None, outcome: TrainOutcome, *, policy: Policy) -> dict[str, Any]:
    """WiSE-FT: the best epoch's weights mixed with the start's (the pretrained backbone and the head training
    began from) for each ``finetune.wise`` weight, scored on validation; ``trainable`` ends as the best mix (ties:
    the more fine-tuned), at ``policy.precision`` as training validated and the predictor tests. Rank 0 alone
    (the evaluation stage), deterministic, so a rerun repeats it."""
    backbone = load_for_training(bcfg, params)
    start = build_trainable(backbone, data.n_classes, params, head_init=probe).model.state_dict()
    tuned = {k: v.detach().clone() for k, v in trainable.model.state_dict().items()}
    curve = {1.0: validation_score(trainable, backbone, data, params, policy=policy)}
    for alpha in sorted(set(cfg.finetune.wise) - {1.0}):
        trainable.model.load_state_dict(wise_mix(start, tuned, alpha))
        curve[alpha] = validation_score(trainable, backbone, data, params, policy=policy)
    best = max(curve, key=lambda a: (curve[a], a))
    trainable.model.load_state_dict(wise_mix(start, tuned, best))
    return {"alpha": best, "val_top1": curve[best], "curve": {str(a): v for a, v in sorted(curve.items())}}


def _refit(cfg: RunConfig, run: RunDir, bcfg: BackboneConfig, bf: BackboneFeatures, tuning: Tuning,
           data: TrainData, params: TrainParams, outcome: TrainOutcome, wise: dict[str, Any], method: str, *,
           policy: Policy, progress: bool) -> tuple[Any, dict[str, Any]]:
    """``finetune.refit``: the chosen recipe trained again from its start on train + validation for the chosen
    epoch count (lp-ft: from the probe refit on both splits), the last epoch kept and mixed with its own start
    at the chosen WiSE-FT weight. Validation is in the training data now: its figures during this training are
    training figures, and nothing is selected on them."""
    both = dataclasses.replace(data, train=data.train + data.val,
                               train_labels=np.concatenate([data.train_labels, data.val_labels]))
    again = dataclasses.replace(params, epochs=outcome.best_epoch, patience=outcome.best_epoch + 1)
    probe = probe_head(cfg, bf, tuning, data.n_classes, refit=True) if method == "lp-ft" else None
    trainable, out = _train_once(cfg, run, bcfg, both, again, probe=probe, policy=policy, progress=progress)
    load_last(trainable, out)
    if wise and wise["alpha"] < 1.0:
        start = build_trainable(load_for_training(bcfg, again), data.n_classes, again, head_init=probe).model
        tuned = {k: v.detach().clone() for k, v in trainable.model.state_dict().items()}
        trainable.model.load_state_dict(wise_mix(start.state_dict(), tuned, wise["alpha"]))
    return trainable, {"epochs": again.epochs, "train_images": len(both.train), "train_wall_s": round(
        out.train_wall_s, 3), "train_cpu_s": round(out.train_cpu_s, 3), "train_img_s": round(out.images_per_s, 3),
        "wise_alpha": wise.get("alpha"), "history": out.history}


def _proba(model: Predictor, samples: tuple[Sample, ...] | list[Sample], *, plain: bool = True) -> np.ndarray:
    """Uncalibrated probabilities of ``samples`` through the inference path (boxes when the run crops): the
    plain view's (N, C), or with ``plain = False`` every test-time view's (V, N, C)."""
    per_view, _ = model.predict_views([s.path for s in samples], strict=True,
                                      boxes=[s.box for s in samples] if model.crop_to_box else None, plain=plain)
    return per_view[0] if plain else per_view


def finetune_stage(
    cfg: RunConfig, run: RunDir, dataset: Dataset, extracted: dict[str, BackboneFeatures],
    tunings: dict[str, Tuning], results: RunResults, *, progress: bool = True,
) -> RunResults:
    """Every fine-tuning method for every backbone; the rows, comparisons and costs join ``results.json``."""
    methods = finetune_methods(cfg)
    if cfg.finetune.wise and not set(methods) & set(WISE):
        warnings.warn(f"finetune.wise applies to {', '.join(WISE)}, none of which runs here "
                      f"({', '.join(methods) or 'no fine-tuning'}): no weights are mixed", stacklevel=2)
    if not methods:
        return results
    policy = Policy.resolve(cfg.features.device, cfg.features.precision, cfg.finetune.precision)
    models = dict(results.models)
    correct: dict[str, dict[str, bool]] = {}
    for label in extracted:
        p = run.read_predictions(label)
        correct[label] = dict(zip(p.sample_ids.tolist(), (p.proba.argmax(1) == p.y_true).tolist(), strict=True))
    start = time.perf_counter()
    for method in methods:
        for bcfg in cfg.backbones:
            result, right = finetune_backbone(cfg, run, dataset, bcfg, method, extracted[bcfg.label],
                                              tunings[bcfg.label], results.models[bcfg.label], policy=policy,
                                              progress=progress)
            models[result.label] = result
            correct[result.label] = right
            # what is finished is saved: a later method's failure keeps this one's row
            results = dataclasses.replace(results, models=dict(models))
            run.write_results(results)
    comparisons = list(results.comparisons)
    labels = [b.label for b in cfg.backbones]
    for method in methods:  # each method against the frozen head of its backbone
        for label in labels:
            comparisons += compare_all({f"{label}/{method}": correct[f"{label}/{method}"], label: correct[label]}, cfg)
    for method in methods:  # the backbones against each other, method by method
        comparisons += compare_all({f"{label}/{method}": correct[f"{label}/{method}"] for label in labels}, cfg)
    comparisons += tta_comparisons(models[f"{label}/{method}"] for method in methods for label in labels)
    timing = {**results.timing_s, "finetune": round(time.perf_counter() - start, 4)}
    timing["total"] = round(timing.get("total", 0.0) + timing["finetune"], 4)
    results = dataclasses.replace(results, models=models, comparisons=comparisons, timing_s=timing)
    run.write_results(results)
    return results

