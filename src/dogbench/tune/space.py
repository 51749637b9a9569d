"""The head search on cached features: the search space, the objective (suggest, fit on train, score on
validation, report per epoch, prune) and its warm starts, and ``tune_head``, which runs it as a study.

The search contains the baseline and starts from it: the baseline's configuration (a ``logistic`` head with its
C) is the study's first trial, scored by the very model the sweep fitted, so the best trial's validation top-1
is never below the baseline's. Other logistic trials warm-start L-BFGS from the nearest solved C. Features come
in through a closure and are prepared once per study; test data never enters this package.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from sklearn.exceptions import ConvergenceWarning

from dogbench.config import Balance, TuneConfig, TuneMetric
from dogbench.errors import DogbenchError
from dogbench.heads import FeatureData, Head, LogisticHead, head_class
from dogbench.tune.studies import StudyPlan, make_pruner, run_study

if TYPE_CHECKING:
    from dogbench.tune.baseline import BaselineResult

SEARCH_SPACE_VERSION = 3  # bump when suggest_head_params changes: studies and tunings are keyed on it
TRIAL_PATIENCE = 5  # epochs without a better validation top-1 before a trial stops
LOGISTIC_C_RANGE = (1e-5, 1e3)  # contains the baseline's grid and its refinement (1e-4.5 .. 1e2.5)
WARM_STARTS_KEPT = 32  # solved logistic heads kept to warm-start later trials (each is d x classes floats)


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    storage: str
    best_params: dict[str, Any]  # {"head": kind, hyper-parameters...; balance and val_metric when not the default}
    best_val_top1: float  # the best trial's validation score in ``metric``
    best_epoch: int  # epochs to train when refitting on train+val
    n_trials: int  # trials in the study (complete + pruned + failed), this run's and earlier ones
    n_complete: int
    n_pruned: int
    history: list[dict[str, Any]] = field(default_factory=list)  # per trial: number, value, state, params
    metric: str = TuneMetric.TOP1.value  # the validation score that chose heads, trials and epochs

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
            "metric": self.metric,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneResult:
        return cls(**d)


def suggest_head_params(trial: optuna.Trial, *, heads: Sequence[str]) -> dict[str, Any]:
    """The search space: head kind, then its hyper-parameters (the logistic head's C and label smoothing; the
    AdamW heads' optimiser settings, and the MLP's shape only for the MLP)."""
    params: dict[str, Any] = {"head": trial.suggest_categorical("head", list(heads))}
    if params["head"] == "logistic":
        params["C"] = trial.suggest_float("C", *LOGISTIC_C_RANGE, log=True)
        params["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.3)
        return params
    params.update({
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3),
        "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
    })
    if params["head"] == "mlp":
        params["hidden_size"] = trial.suggest_categorical("hidden_size", [128, 256, 512])
        params["n_layers"] = trial.suggest_int("n_layers", 1, 2)
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.7)
    return params


def baseline_params(C: float) -> dict[str, Any]:
    """The baseline probe as a point of the search space: a logistic head with the swept C, no smoothing."""
    return {"head": "logistic", "C": float(C), "label_smoothing": 0.0}


def build_head(params: dict[str, Any], *, max_epochs: int, seed: int, device: str = "cpu") -> Head:
    """A head from a parameter dict as produced by ``suggest_head_params`` (the "head" key picks the kind).

    ``max_epochs`` applies to the epoch-trained kinds; the logistic head always runs to convergence."""
    cls = head_class(params["head"])
    rest = {k: v for k, v in params.items() if k != "head"}
    if "max_epochs" in cls().get_params():
        rest["max_epochs"] = max_epochs
    return cls(seed=seed, device=device, **rest)


def logistic_key(params: Mapping[str, Any]) -> tuple[float, float]:
    """A logistic configuration's identity among solved heads: (C, label smoothing)."""
    return float(params["C"]), float(params["label_smoothing"])


class LogisticSolutions:
    """Solved logistic heads of one study, by (C, label smoothing): an exact configuration is reused, any other
    warm-starts from the nearest one (in log10 C, then smoothing). The baseline's sweep seeds it."""

    def __init__(self, heads: Mapping[tuple[float, float], LogisticHead] = ()) -> None:
        self.heads: dict[tuple[float, float], LogisticHead] = dict(heads)

    def get(self, key: tuple[float, float]) -> LogisticHead | None:
        return self.heads.get(key)

    def nearest(self, key: tuple[float, float]) -> dict[str, torch.Tensor] | None:
        if not self.heads:
            return None
        C, smoothing = key
        best = min(self.heads, key=lambda k: abs(math.log10(k[0] / C)) + 10.0 * abs(k[1] - smoothing))
        return self.heads[best].module_.state_dict()

    def add(self, key: tuple[float, float], head: LogisticHead) -> None:
        self.heads[key] = head
        while len(self.heads) > WARM_STARTS_KEPT:
            del self.heads[next(iter(self.heads))]


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
    solved: Mapping[tuple[float, float], LogisticHead] = (),
    fixed: Mapping[str, Any] | None = None,
) -> Callable[[optuna.Trial], float]:
    """objective(trial) -> validation score of the trial's head (its ``val_metric``, top-1 unless ``fixed`` sets
    another): the best epoch's for the epoch-trained kinds (reported every epoch so the pruner can stop them), the
    converged model's for the logistic kind. ``fixed``: parameters every head gets (``fixed_params``).

    ``solved``: logistic heads already fitted on these rows (the baseline sweep's), reused for their own
    configuration and as warm starts. The rows are prepared at the first trial, once per study."""
    data = functools.cache(lambda: FeatureData.from_arrays(X_train, y_train, eval_set=(X_val, y_val), device=device))
    logistic = LogisticSolutions(solved)

    def objective(trial: optuna.Trial) -> float:
        params = {**suggest_head_params(trial, heads=heads), **(fixed or {})}
        if params["head"] == "logistic":
            key = logistic_key(params)
            head = logistic.get(key)
            if head is None:
                head = build_head(params, max_epochs=max_epochs, seed=seed, device=device)
                with warnings.catch_warnings():  # recorded per trial instead of a warning each
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    head.fit_prepared(data(), init=logistic.nearest(key))
                logistic.add(key, head)
            trial.set_user_attr("best_epoch", int(head.best_epoch_))  # L-BFGS iterations, for the record
            trial.set_user_attr("converged", bool(head.history_[-1]["converged"]))
            return float(head.best_val_top1_)
        head = build_head(params, max_epochs=max_epochs, seed=seed, device=device).set_params(patience=TRIAL_PATIENCE)

        def report(epoch: int, val_top1: float) -> None:
            trial.report(val_top1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val top-1 {val_top1:.4f})")

        head.fit_prepared(data(), on_epoch=report)
        trial.set_user_attr("best_epoch", int(head.best_epoch_))
        return float(head.best_val_top1_)

    return objective


def fixed_params(*, balance: str = Balance.NONE, metric: str = TuneMetric.TOP1) -> dict[str, Any]:
    """The head parameters a study does not search (``data.balance``, ``tune.metric``), where not the default: they
    join every trial's parameters and the best ones, so the refit, calibration and saved head use them too."""
    fixed = {"balance": Balance(balance).value, "val_metric": TuneMetric(metric).value}
    return {k: v for k, v in fixed.items() if v not in (Balance.NONE.value, TuneMetric.TOP1.value)}


def tune_head(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    cfg: TuneConfig,
    storage: str | None,
    study_name: str,
    device: str = "cpu",
    progress: bool = True,
    baseline: BaselineResult | None = None,
    balance: str = Balance.NONE,
) -> TuneResult:
    """Run (or resume) the head study until it holds ``cfg.trials`` finished trials or ``cfg.timeout_s`` passes.

    With ``baseline`` (and ``logistic`` among ``cfg.heads``) its configuration is the first trial, scored by the
    sweep's own fitted head when the sweep ran in this process; its other heads warm-start logistic trials. On a
    local storage the search runs on an in-memory copy, each finished trial written back as it ends (a stored
    report per epoch costs more than a linear head's epoch on SQLite); a server is searched directly, by as
    many workers as share the study. ``cfg.metric`` scores trials and epochs; ``balance``: ``data.balance``."""
    fixed = fixed_params(balance=balance, metric=cfg.metric)
    objective = make_objective(X_train, y_train, X_val, y_val, heads=cfg.heads, max_epochs=cfg.max_epochs,
                               seed=cfg.seed, device=device, solved=baseline.heads if baseline is not None else {},
                               fixed=fixed)
    start = baseline_params(baseline.C) if baseline is not None and "logistic" in cfg.heads else None
    plan = StudyPlan(name=study_name, storage=storage, trials=cfg.trials, seed=cfg.seed, start=start,
                     pruner=make_pruner(cfg.pruner, max_epochs=cfg.max_epochs), timeout_s=cfg.timeout_s,
                     heartbeat_s=cfg.heartbeat_s, grace_s=cfg.grace_s, in_memory=True, progress=progress)
    outcome = run_study(plan, objective)
    if outcome.best is None:
        raise DogbenchError(f"Study '{study_name}' has no completed trial; raise tune.trials or tune.timeout_s")
    history = [
        {"number": t.number, "value": t.value, "state": t.state.name, "params": t.params,
         "best_epoch": t.user_attrs.get("best_epoch"), "n_epochs": len(t.intermediate_values),
         "seconds": t.duration.total_seconds() if t.duration else None}
        for t in outcome.trials
    ]
    best = outcome.best
    return TuneResult(
        study_name=study_name,
        storage=storage,
        best_params={**best.params, **fixed},
        best_val_top1=float(best.value),
        best_epoch=int(best.user_attrs["best_epoch"]),
        n_trials=len(history),
        n_complete=sum(h["state"] == "COMPLETE" for h in history),
        n_pruned=sum(h["state"] == "PRUNED" for h in history),
        history=history,
        metric=TuneMetric(cfg.metric).value,
    )
