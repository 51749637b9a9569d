"""Hyper-parameter search for heads on cached features (Optuna TPE, multi-fidelity pruning), and the
logistic-regression baseline with C swept on validation (the CLIP linear-probe protocol).

The search contains the baseline and starts from it: the baseline's configuration (a ``logistic`` head with
its C) is the study's first trial, scored by the very model the sweep fitted, so the best trial's validation
top-1 is never below the baseline's. Other logistic trials warm-start L-BFGS from the nearest solved C.
Epoch-trained heads (``linear``, ``mlp``) report validation top-1 per epoch to a successive-halving or
Hyperband pruner whose first rung is ``PRUNE_MIN_EPOCHS``, so slow starters are not judged on epoch one.

The objective is small and pure: suggest, fit on train, score on validation, report per epoch, prune.
Features come in through a closure and are never reloaded per trial. Test data never enters this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import torch
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from dogbench.config import PRUNERS, TuneConfig
from dogbench.errors import DogbenchError
from dogbench.heads import Head, LogisticHead, TrainingData, head_class

BASELINE_CS: tuple[float, ...] = tuple(10.0**e for e in range(-4, 3))
SEARCH_SPACE_VERSION = 3  # bump when suggest_head_params changes: studies and tunings are keyed on it
TRIAL_PATIENCE = 5  # epochs without a better validation top-1 before a trial stops
PRUNE_MIN_EPOCHS = 5  # the pruner's first rung: no trial is judged before this many epochs
LOGISTIC_C_RANGE = (1e-5, 1e3)  # contains the baseline's grid and its refinement (1e-4.5 .. 1e2.5)
FAILED_TRIAL_RETRIES = 3  # a trial whose worker died is queued again this many times
WARM_STARTS_KEPT = 32  # solved logistic heads kept to warm-start later trials (each is d x classes floats)


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
    if "max_epochs" in cls._get_param_names():
        rest["max_epochs"] = max_epochs
    return cls(seed=seed, device=device, **rest)


def _logistic_key(params: Mapping[str, Any]) -> tuple[float, float]:
    return float(params["C"]), float(params["label_smoothing"])


class _LogisticSolutions:
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
) -> Callable[[optuna.Trial], float]:
    """objective(trial) -> validation top-1 of the trial's head: the best epoch's for the epoch-trained kinds
    (reported every epoch so the pruner can stop them), the converged model's for the logistic kind.

    ``solved``: logistic heads already fitted on these rows (the baseline sweep's), reused for their own
    configuration and as warm starts."""
    data = TrainingData.from_arrays(X_train, y_train, eval_set=(X_val, y_val), device=device)  # once per study
    logistic = _LogisticSolutions(solved)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_head_params(trial, heads=heads)
        if params["head"] == "logistic":
            key = _logistic_key(params)
            head = logistic.get(key)
            if head is None:
                head = build_head(params, max_epochs=max_epochs, seed=seed, device=device)
                with warnings.catch_warnings():  # recorded per trial instead of a warning each
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    head.fit_prepared(data, init=logistic.nearest(key))
                logistic.add(key, head)
            trial.set_user_attr("best_epoch", int(head.best_epoch_))  # L-BFGS iterations, for the record
            trial.set_user_attr("converged", bool(head.history_[-1]["converged"]))
            return float(head.best_val_top1_)
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


def make_pruner(
    kind: str = "halving", *, max_epochs: int = 150, min_epochs: int = PRUNE_MIN_EPOCHS
) -> optuna.pruners.BasePruner:
    """The multi-fidelity schedule for epoch-trained trials (one of ``PRUNERS``): successive halving (rungs at
    5, 15, 45... epochs, the top third going on) or Hyperband (brackets of successive halving from 5 epochs
    to ``max_epochs``); median pruning from the second epoch once five trials completed (the earlier default,
    kept for comparison); or none."""
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs,
                                              reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"Unknown pruner {kind!r}; choose one of {', '.join(PRUNERS)}")


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
) -> TuneResult:
    """Run (or resume) the study until it holds ``cfg.trials`` finished trials or ``cfg.timeout_s`` passes.

    With ``baseline`` (and ``logistic`` among ``cfg.heads``) its configuration is the first trial, scored by
    the baseline's own fitted head when the sweep ran in this process; its other fitted heads warm-start the
    logistic trials. The search runs on an in-memory copy of the stored study and writes each finished trial
    back to ``storage`` as it ends: a stored report and pruning check per epoch cost more than a linear head's
    epoch on SQLite. A resumed study starts from the stored trials; a trial cut off by a crash is lost.
    ``storage=None`` searches in memory only. A database server (PostgreSQL) is searched directly, by as many
    workers as share the study (``search_shared``).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage, cfg)
    try:
        with storage_errors(storage):
            return _tune(X_train, y_train, X_val, y_val, cfg=cfg, storage=storage, store=store,
                         study_name=study_name, device=device, progress=progress, baseline=baseline)
    finally:
        if isinstance(store, optuna.storages.RDBStorage):
            store.engine.dispose()  # close the server connections now, not at interpreter exit


def _tune(
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, *, cfg: TuneConfig,
    storage: str | None, store: Any, study_name: str, device: str, progress: bool, baseline: BaselineResult | None,
) -> TuneResult:
    study = optuna.create_study(study_name=study_name, storage=store, direction="maximize", load_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = study.get_trials(deepcopy=False, states=finished)
    remaining = cfg.trials - len(done)
    if remaining > 0:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, max(1, cfg.trials // 3)))
        solved = baseline.heads if baseline is not None else {}
        objective = make_objective(
            X_train, y_train, X_val, y_val, heads=cfg.heads, max_epochs=cfg.max_epochs, seed=cfg.seed, device=device,
            solved=solved,
        )
        pruner = make_pruner(cfg.pruner, max_epochs=cfg.max_epochs)
        start = baseline_params(baseline.C) if baseline is not None and "logistic" in cfg.heads else None
        if not search_in_memory(storage):
            # A database server (PostgreSQL) shared by workers on several machines: search on it directly, so
            # every worker's sampler and pruner see the others' running and finished trials.
            search_shared(study_name, store, objective, cfg=cfg, pruner=pruner, start=start, progress=progress)
        else:
            search = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
            search.add_trials(done)
            if start is not None:
                search.enqueue_trial(start, skip_if_exists=True)

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


def open_storage(storage: str | None, cfg: TuneConfig) -> Any:
    """``storage`` as Optuna should use it: SQLite (and None) as given; a database server with heartbeats, so a
    killed worker's trial is marked failed after ``cfg.grace_s`` and queued again
    (``RetryHeartbeatStaleTrialCallback``)."""
    if search_in_memory(storage):
        return storage
    try:
        with warnings.catch_warnings():  # Optuna marks heartbeats experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=cfg.heartbeat_s, grace_period=cfg.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=FAILED_TRIAL_RETRIES))
    except ImportError as err:
        raise DogbenchError(f"tune.storage {_redact(storage)} needs a database driver ({err.name or err}): "
                            "pip install 'dogbench[postgres]'") from None
    except Exception as err:  # noqa: BLE001 - sqlalchemy's errors: a wrong URL, no server, refused login
        raise DogbenchError(f"tune.storage {_redact(storage)} cannot be opened ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); give a URL such as "
                            "postgresql://USER:PASSWORD@HOST:5432/DB") from None


@contextlib.contextmanager
def storage_errors(storage: str | None) -> Iterator[None]:
    """The study database's own failures as dogbench's errors. A full disk (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full) is the OSError of every full disk, naming the SQLite file; any other failed statement names the
    database. Each trial is committed as it ends, so the finished ones are kept. Lost server connections are
    retried in ``search_shared``."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
        where = _redact(storage or "")
        if _disk_full(err):
            sqlite_file = storage.removeprefix("sqlite:///") if storage and storage.startswith("sqlite:///") else None
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), sqlite_file or where) from err
        driver = [e for e in _causes(err) if not isinstance(e, optuna.exceptions.StorageInternalError)]
        reason = next((str(e).splitlines()[0] for e in reversed(driver) if str(e)), type(err).__name__)
        transient = any(isinstance(e, sqlalchemy.exc.OperationalError) for e in driver)
        raise DogbenchError(f"the study's database {where} failed ({reason}); its finished trials are kept"
                            + (": run the same command again to continue" if transient else "")) from err


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it wraps (``__cause__``, ``__context__``, SQLAlchemy's driver error ``.orig``), outermost
    first, each once (a chain may loop)."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop(0)
        if isinstance(e, BaseException) and id(e) not in seen:
            seen.add(id(e))
            yield e
            todo += [getattr(e, "orig", None), e.__cause__, e.__context__]


def _disk_full(err: BaseException) -> bool:
    """Whether the database failed for a full disk: SQLite's SQLITE_FULL ("database or disk is full") or
    PostgreSQL's SQLSTATE 53100 (disk_full; psycopg2's ``pgcode``, psycopg 3's ``sqlstate``)."""
    return any(getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
               or "53100" in (getattr(e, "pgcode", None), getattr(e, "sqlstate", None)) for e in _causes(err))


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@contextlib.contextmanager
def study_mutex(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """One worker at a time, across machines: a PostgreSQL advisory lock keyed on the study's name."""
    import sqlalchemy

    engine = storage.engine
    if engine.dialect.name != "postgresql":
        raise DogbenchError(f"distributed tuning needs PostgreSQL (tune.storage), not {engine.dialect.name}; "
                            "SQLite stays the single-machine default")
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    # autocommit: the lock's session is not left idle in a transaction (a server timeout would drop it)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def _fail_orphans(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """RUNNING trials without a single heartbeat (their worker died between asking and its first beat, which
    happen under the study's lock, so nothing alive is in that state): failed and queued again, as stale
    trials are. Call under ``study_mutex``."""
    import sqlalchemy

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    with storage.engine.connect() as conn:
        beaten = {row[0] for row in conn.execute(
            sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id = ANY(:ids)"),
            {"ids": [t._trial_id for t in running]})}
    for t in running:
        if t._trial_id not in beaten and storage.set_trial_state_values(
                t._trial_id, state=optuna.trial.TrialState.FAIL):
            storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(t._trial_id))


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, every_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``every_s`` seconds while it runs (what ``study.optimize`` does)."""
    stop = threading.Event()  # the first beat is the caller's, under the study's lock

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as err:  # noqa: BLE001 - a lost beat is retried; too many and the trial is retried
                warnings.warn(f"heartbeat of trial {trial_id} not recorded ({type(err).__name__}); retrying",
                              stacklevel=1)

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def search_shared(
    study_name: str, storage: optuna.storages.RDBStorage, objective: Callable[[optuna.Trial], float], *,
    cfg: TuneConfig,
    pruner: optuna.pruners.BasePruner, start: dict[str, Any] | None, progress: bool,
) -> int:
    """This worker's part of a study shared on a database server; returns the trials it ran.

    Workers register under the study's lock and each samples with its own seed (``cfg.seed`` + its number), so
    their random start-up trials differ. A new trial is asked for only while finished + running trials are
    fewer than ``cfg.trials``, under the same lock, so the study ends with exactly ``cfg.trials`` finished
    trials however many workers share it (Optuna's ``MaxTrialsCallback`` only stops a worker after the count is
    passed). A worker killed mid-trial stops beating; after ``cfg.grace_s`` another worker marks the trial
    failed and ``RetryHeartbeatStaleTrialCallback`` queues it again, and a worker waits for such trials before it ends.
    """
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    plain = optuna.load_study(study_name=study_name, storage=storage)
    with study_mutex(storage, study_name):
        worker = int(plain.user_attrs.get("dogbench_workers", 0))
        plain.set_user_attr("dogbench_workers", worker + 1)
        if start is not None and not plain.get_trials(deepcopy=False):
            plain.enqueue_trial(start)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + worker, n_startup_trials=min(10, max(1, cfg.trials // 3)))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    deadline = time.monotonic() + cfg.timeout_s
    ran = 0
    with tqdm(total=cfg.trials, desc=f"tune {study_name} (worker {worker})", unit="trial",
              disable=not progress) as bar, warnings.catch_warnings():
        # this loop beats the heartbeats itself (``study.optimize`` cannot stop at an exact count across workers)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        lost = 0  # database connections lost in a row (a restarted server, a failover, a dropped network)
        while time.monotonic() < deadline:
            try:
                with study_mutex(storage, study_name):  # failing, counting and asking: one worker at a time
                    optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed, and queued again
                    _fail_orphans(study, storage)
                    states = [t.state for t in study.get_trials(deepcopy=False)]
                    done = sum(s in finished for s in states)
                    running = states.count(optuna.trial.TrialState.RUNNING)
                    trial = study.ask() if done + running < cfg.trials else None
                    if trial is not None:  # beaten before the lock is let go: a trial without a beat is an orphan
                        try:
                            storage.record_heartbeat(trial._trial_id)
                        except BaseException:
                            with contextlib.suppress(Exception):
                                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                            raise
            except Exception as err:
                if not _connection_lost(err):
                    raise
                lost = _reconnect(storage, study_name, err, lost)
                continue
            lost = 0
            bar.n = done
            bar.refresh()
            if trial is None:
                if done >= cfg.trials:
                    break
                time.sleep(min(1.0, cfg.heartbeat_s))  # others' trials are running, or a dead one awaits failing
                continue
            try:  # from here on the trial is told how it ended, whatever happens
                with _heartbeat(storage, trial._trial_id, cfg.heartbeat_s):
                    trial.set_user_attr("worker", {"number": worker, "host": socket.gethostname(),
                                                   "pid": os.getpid()})
                    value: float | None = objective(trial)
                state = optuna.trial.TrialState.COMPLETE
            except optuna.TrialPruned:
                value, state = None, optuna.trial.TrialState.PRUNED
            except optuna.exceptions.UpdateFinishedTrialError:
                # a stall longer than grace_s: another worker took this trial for dead and queued it again
                warnings.warn(f"trial {trial.number} was failed by another worker (no heartbeat for "
                              f"{cfg.grace_s} s); it runs again", stacklevel=2)
                continue
            except BaseException as err:
                if isinstance(err, Exception) and _connection_lost(err):
                    _fail_and_requeue(study, storage, trial)
                    lost = _reconnect(storage, study_name, err, lost, trial=trial.number)
                    continue
                with contextlib.suppress(Exception):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                raise
            try:
                study.tell(trial, value, state=state, skip_if_finished=True)
            except Exception as err:  # the result is lost with the connection: the trial runs again
                if not _connection_lost(err):
                    raise
                _fail_and_requeue(study, storage, trial)
                lost = _reconnect(storage, study_name, err, lost, trial=trial.number)
                continue
            ran += 1
    return ran


RECONNECTS = 5  # connection losses in a row a worker survives (waiting 1, 2, 4, 8, 16 s) before it stops


def _connection_lost(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps: Optuna's StorageInternalError wraps SQLAlchemy's errors) is a lost
    database connection, not a wrong query, a constraint, a permission or a full disk."""
    return not _disk_full(err) and any(
        isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
        or (isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated) for e in _causes(err))


def _fail_and_requeue(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> None:
    """A trial cut off by a lost connection: failed and queued again (as a stale trial would be); if the
    database is still away it stays RUNNING, and the stale-trial check does the same once it is back."""
    with contextlib.suppress(Exception):
        if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
            storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))


def _reconnect(storage: optuna.storages.RDBStorage, study_name: str, err: Exception, lost: int,
               trial: int | None = None) -> int:
    """After a lost database connection: drop the pool (the next use connects anew) and wait, or stop with a
    DogbenchError after ``RECONNECTS`` losses in a row. Finished trials are in the database; a trial this worker
    was running stays RUNNING without heartbeats, so a worker fails it and queues it again after ``grace_s``."""
    storage.engine.dispose()
    reason = str(getattr(err, "orig", err) or type(err).__name__).splitlines()[0]
    if lost >= RECONNECTS:
        raise DogbenchError(
            f"lost the connection to the study's database {lost + 1} times in a row ({reason}); study "
            f"'{study_name}' keeps every finished trial: start this worker again to continue it") from err
    during = f" during trial {trial} (it will be run again)" if trial is not None else ""
    warnings.warn(f"lost the connection to the study's database{during}: {reason}; reconnecting", stacklevel=3)
    time.sleep(2 ** lost)
    return lost + 1


@dataclass(frozen=True)
class BaselineResult:
    C: float
    val_top1: float
    curve: dict[str, float]  # str(C) -> validation top-1
    seconds: float
    # the sweep's fitted heads by (C, label smoothing 0): they seed the search in this process; not saved
    heads: dict[tuple[float, float], LogisticHead] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.C, "val_top1": self.val_top1, "curve": self.curve, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineResult:
        return cls(C=d["C"], val_top1=d["val_top1"], curve=d["curve"], seconds=d["seconds"])


def make_logistic(C: float, *, device: str = "cpu") -> LogisticHead:
    """The baseline probe: standardise, then multinomial L2 logistic regression (scikit-learn's objective),
    solved by full-batch L-BFGS."""
    return LogisticHead(C=C, device=device)


def sweep_logistic_C(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = BASELINE_CS,
    device: str = "cpu",
) -> BaselineResult:
    """Coarse decade sweep of C, then one refinement step at half decades around the best. Each fit
    warm-starts from the nearest C already solved (a regularisation path); the rows are prepared once."""
    start = time.perf_counter()
    data = TrainingData.from_arrays(X_train, y_train, eval_set=(X_val, y_val), device=device)
    solved = _LogisticSolutions()
    curve: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in curve:
            key = _logistic_key(baseline_params(C))
            head = make_logistic(C, device=device).fit_prepared(data, init=solved.nearest(key))
            solved.add(key, head)
            curve[C] = float(head.best_val_top1_)
        return curve[C]

    for C in sorted(Cs):
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
        heads=dict(solved.heads),
    )
