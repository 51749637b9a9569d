"""Hyper-parameter search for heads on cached features (Optuna TPE, multi-fidelity pruning), the logistic
baseline with C swept on validation, and the one study runner that head tuning and fine-tuning share.

``space``: the search space, the objective and ``tune_head``; ``baseline``: the C sweep; ``studies``: storages,
locks, heartbeats and ``run_study``; ``optuna_adapter``: the only code that touches Optuna's private API.
"""

from dogbench.tune.baseline import BASELINE_CS, BaselineResult, make_logistic, sweep_logistic_C
from dogbench.tune.space import (
    LOGISTIC_C_RANGE,
    SEARCH_SPACE_VERSION,
    TRIAL_PATIENCE,
    WARM_STARTS_KEPT,
    LogisticSolutions,
    TuneResult,
    baseline_params,
    build_head,
    fixed_params,
    logistic_key,
    make_objective,
    suggest_head_params,
    tune_head,
)
from dogbench.tune.studies import (
    FAILED_TRIAL_RETRIES,
    PRUNE_MIN_EPOCHS,
    RECONNECTS,
    StudyOutcome,
    StudyPlan,
    best_trial,
    make_pruner,
    open_storage,
    run_study,
    search_in_memory,
    storage_errors,
    study_lock,
    study_mutex,
)

__all__ = [
    "BASELINE_CS",
    "FAILED_TRIAL_RETRIES",
    "LOGISTIC_C_RANGE",
    "PRUNE_MIN_EPOCHS",
    "RECONNECTS",
    "SEARCH_SPACE_VERSION",
    "TRIAL_PATIENCE",
    "WARM_STARTS_KEPT",
    "BaselineResult",
    "LogisticSolutions",
    "StudyOutcome",
    "StudyPlan",
    "TuneResult",
    "baseline_params",
    "build_head", "fixed_params",
    "logistic_key",
    "make_logistic",
    "make_objective",
    "make_pruner",
    "open_storage",
    "best_trial",
    "run_study",
    "search_in_memory",
    "storage_errors",
    "study_lock",
    "study_mutex",
    "suggest_head_params",
    "sweep_logistic_C",
    "tune_head",
]
