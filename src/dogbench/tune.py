"""Hyper-parameter search for heads on cached features (Optuna TPE + median pruning), and the
logistic-regression baseline with C swept on validation (the CLIP linear-probe protocol).

The objective is small and pure: suggest, fit on train, score on validation, report per epoch, prune.
Features come in through a closure and are never reloaded per trial. Test data never enters this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from sklearn.pipeline import Pipeline, make_pipeline

from dogbench.config import TuneConfig
from dogbench.errors import DogbenchError
from dogbench.heads import LinearHead, MLPHead, TrainingData, make_head

BASELINE_CS: tuple[float, ...] = tuple(10.0**e for e in range(-4, 3))
SEARCH_SPACE_VERSION = 2  # bump when suggest_head_params changes: studies and tunings are keyed on it
TRIAL_PATIENCE = 5  # epochs without a better validation top-1 before a trial stops


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    storage: str
    best_params: dict[str, Any]  # {"head": kind, hyper-parameters...}
    best_val_top1: float
    best_epoch: int  # epochs to train when refitting on train+val
    n_trials: int  # trials in the study (complete + pruned + failed), this run's and earlier ones
    n_complete: int
    n_pruned: int
    history: list[dict[str, Any]] = field(default_factory=list)  # per trial: number, value, state, params

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "best_params": self.best_params,
            "best_val_top1": self.best_val_top1,
            "best_epoch": self.best_epoch,
            "n_trials": self.n_trials,
            "n_complete": self.n_complete,
            "n_pruned": self.n_pruned,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneResult:
        return cls(**d)


def suggest_head_params(trial: optuna.Trial, *, heads: Sequence[str]) -> dict[str, Any]:
    """The search space: head type, then its hyper-parameters (MLP ones only for the MLP)."""
    params: dict[str, Any] = {
        "head": trial.suggest_categorical("head", list(heads)),
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3),
        "batch_size": trial.suggest_categorical("batch_size", [128, 256, 512]),
    }
    if params["head"] == "mlp":
        params["hidden_size"] = trial.suggest_categorical("hidden_size", [256, 512, 1024])
        params["n_layers"] = trial.suggest_int("n_layers", 1, 2)
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.7)
    return params


def build_head(params: dict[str, Any], *, max_epochs: int, seed: int, device: str = "cpu") -> LinearHead | MLPHead:
    """A head from a parameter dict as produced by ``suggest_head_params`` (the "head" key picks the kind)."""
    rest = {k: v for k, v in params.items() if k != "head"}
    return make_head(params["head"], max_epochs=max_epochs, seed=seed, device=device, **rest)


def make_objective(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    heads: Sequence[str],
    max_epochs: int,
    seed: int,
    device: str = "cpu",
) -> Callable[[optuna.Trial], float]:
    """objective(trial) -> validation top-1 of the best epoch; reports every epoch so the pruner can stop it."""
    data = TrainingData.from_arrays(X_train, y_train, eval_set=(X_val, y_val), device=device)  # once per study

    def objective(trial: optuna.Trial) -> float:
        params = suggest_head_params(trial, heads=heads)
        head = build_head(params, max_epochs=max_epochs, seed=seed, device=device).set_params(patience=TRIAL_PATIENCE)

        def report(epoch: int, val_top1: float) -> None:
            trial.report(val_top1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val top-1 {val_top1:.4f})")

        head.fit_prepared(data, on_epoch=report)
        trial.set_user_attr("best_epoch", int(head.best_epoch_))
        return float(head.best_val_top1_)

    return objective


def search_in_memory(storage: str | None) -> bool:
    """Local storages (SQLite files) are searched on an in-memory copy; database servers directly."""
    return not storage or storage.startswith("sqlite")


def make_pruner() -> optuna.pruners.BasePruner:
    """Median pruning from the second epoch on, once five trials have completed."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def tune_head(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    cfg: TuneConfig,
    storage: str,
    study_name: str,
    device: str = "cpu",
    progress: bool = True,
) -> TuneResult:
    """Run (or resume) the study until it holds ``cfg.trials`` finished trials or ``cfg.timeout_s`` passes.

    The search runs on an in-memory copy of the stored study and writes each finished trial back to
    ``storage`` as it ends: a stored report and pruning check per epoch cost more than a linear head's
    epoch on SQLite. A resumed study starts from the stored trials; a trial cut off by a crash is lost.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = study.get_trials(deepcopy=False, states=finished)
    remaining = cfg.trials - len(done)
    if remaining > 0:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, max(1, cfg.trials // 3)))
        objective = make_objective(
            X_train, y_train, X_val, y_val, heads=cfg.heads, max_epochs=cfg.max_epochs, seed=cfg.seed, device=device
        )
        if not search_in_memory(storage):
            # A database server (PostgreSQL, MySQL) is shared by workers on several machines: search on it
            # directly, so each worker's sampler and pruner see the others' running and finished trials.
            shared = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=make_pruner())
            shared.optimize(objective, n_trials=remaining, timeout=cfg.timeout_s, show_progress_bar=progress)
        else:
            search = optuna.create_study(direction="maximize", sampler=sampler, pruner=make_pruner())
            search.add_trials(done)

            def store(_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if trial.state in finished:
                    study.add_trial(trial)

            search.optimize(
                objective, n_trials=remaining, timeout=cfg.timeout_s, callbacks=[store], show_progress_bar=progress
            )
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise DogbenchError(f"Study '{study_name}' has no completed trial; raise tune.trials or tune.timeout_s")
    best = study.best_trial
    history = [
        {"number": t.number, "value": t.value, "state": t.state.name, "params": t.params,
         "best_epoch": t.user_attrs.get("best_epoch"), "n_epochs": len(t.intermediate_values),
         "seconds": t.duration.total_seconds() if t.duration else None}
        for t in study.get_trials(deepcopy=False)
    ]
    return TuneResult(
        study_name=study_name,
        storage=storage,
        best_params=dict(best.params),
        best_val_top1=float(best.value),
        best_epoch=int(best.user_attrs["best_epoch"]),
        n_trials=len(history),
        n_complete=len(complete),
        n_pruned=sum(h["state"] == "PRUNED" for h in history),
        history=history,
    )


@dataclass(frozen=True)
class BaselineResult:
    C: float
    val_top1: float
    curve: dict[str, float]  # str(C) -> validation top-1
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.C, "val_top1": self.val_top1, "curve": self.curve, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineResult:
        return cls(C=d["C"], val_top1=d["val_top1"], curve=d["curve"], seconds=d["seconds"])


def make_logistic(C: float, *, max_iter: int = 1000) -> Pipeline:
    """Standardise, then multinomial L2 logistic regression (lbfgs): the baseline probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, tol=1e-4))


def sweep_logistic_C(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = BASELINE_CS,
) -> BaselineResult:
    """Coarse decade sweep of C, then one refinement step at half decades around the best."""
    start = time.perf_counter()
    curve: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in curve:
            model = make_logistic(C).fit(X_train, y_train)
            curve[C] = float(np.mean(model.predict(X_val) == y_val))
        return curve[C]

    for C in Cs:
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
    )
