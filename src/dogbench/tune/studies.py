"""The one study runner, for head tuning and fine-tuning alike, on every storage: in memory, a SQLite file, or a
PostgreSQL server shared by workers on several machines.

The resume rule, the same everywhere: a study runs until it holds ``trials`` finished (complete or pruned)
trials; a rerun continues it; a trial left RUNNING by a dead worker is failed and queued again with its
parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``, at most ``FAILED_TRIAL_RETRIES`` times). Workers
that write to the study register in it and sample with seed + their number (the first: the seed itself).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from dogbench import track
from dogbench.config import PRUNERS
from dogbench.errors import DogbenchError
from dogbench.locks import locked
from dogbench.tune import optuna_adapter

FAILED_TRIAL_RETRIES = 3  # a trial whose worker died is queued again this many times
RECONNECTS = 5  # connection losses in a row a worker survives (waiting 1, 2, 4, 8, 16 s) before it stops
PRUNE_MIN_EPOCHS = 5  # the pruner's first rung: no trial is judged before this many epochs
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

Objective = Callable[[optuna.Trial], float]


class Heartbeats(Protocol):
    heartbeat_s: int
    grace_s: int


@dataclass(frozen=True)
class StudyPlan:
    """One study: where it is stored, how many finished trials it needs, and how this worker samples."""

    name: str
    storage: str | None  # an Optuna storage URL; None: in memory only
    trials: int
    seed: int
    pruner: optuna.pruners.BasePruner = field(default_factory=optuna.pruners.NopPruner)
    start: dict[str, Any] | None = None  # enqueued first (unless a trial with these parameters exists)
    timeout_s: float = math.inf  # no new trial is asked for after this many seconds
    heartbeat_s: int = 10  # on a server: a running trial beats this often...
    grace_s: int = 60  # ...and is taken for dead this long after its last beat
    in_memory: bool = False  # cheap trials on a local storage: searched on a copy, finished trials written back
    progress: bool = False


class StudyOutcome(NamedTuple):
    """A study after this worker's part in it."""

    trials: list[FrozenTrial]  # every trial of the stored study, in order
    best: FrozenTrial | None  # Optuna's best trial (None: no trial completed)


def search_in_memory(storage: str | None) -> bool:
    """Whether ``storage`` is local (in memory or a SQLite file: one process at a time) rather than a server."""
    return not storage or storage.startswith("sqlite")


def make_pruner(
    kind: str = "halving", *, max_epochs: int = 150, min_epochs: int = PRUNE_MIN_EPOCHS
) -> optuna.pruners.BasePruner:
    """The multi-fidelity schedule for epoch-trained trials (one of ``PRUNERS``): successive halving (rungs at
    5, 15, 45... epochs, the top third going on), Hyperband (brackets of successive halving from 5 epochs to
    ``max_epochs``), median pruning from the second epoch once five trials completed, or none."""
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


def retry_dead_trials() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """The callback that queues a dead worker's trial again with its parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=FAILED_TRIAL_RETRIES)


def open_storage(storage: str | None, cfg: Heartbeats) -> Any:
    """``storage`` as Optuna should use it: local ones as given; a server with heartbeats every
    ``cfg.heartbeat_s``, so a killed worker's trial is failed after ``cfg.grace_s`` and queued again."""
    if search_in_memory(storage):
        return storage
    try:
        with warnings.catch_warnings():  # Optuna marks heartbeats experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage, heartbeat_interval=cfg.heartbeat_s, grace_period=cfg.grace_s,
                                              heartbeat_stale_trial_callback=retry_dead_trials())
    except ImportError as err:
        raise DogbenchError(f"tune.storage {redact(storage)} needs a database driver ({err.name or err}): "
                            "pip install 'dogbench[postgres]'") from None
    except Exception as err:  # noqa: BLE001 - sqlalchemy's errors: a wrong URL, no server, refused login
        raise DogbenchError(f"tune.storage {redact(storage)} cannot be opened ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); give a URL such as "
                            "postgresql://USER:PASSWORD@HOST:5432/DB") from None


def study_lock(storage: str | None) -> contextlib.AbstractContextManager[None]:
    """A lock beside a SQLite study file (two processes on one SQLite study take turns); none otherwise."""
    if not storage or not storage.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(storage.removeprefix("sqlite:///"))
    return locked(db.with_name(db.name + ".lock"), what=f"the Optuna study file {db}")


@contextlib.contextmanager
def study_mutex(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """One worker at a time, across machines: a PostgreSQL advisory lock keyed on the study's name."""
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


@contextlib.contextmanager
def storage_errors(storage: str | None) -> Iterator[None]:
    """The study database's own failures as dogbench's errors. A full disk (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full) is the OSError of every full disk, naming the SQLite file; any other failed statement names the
    database. Finished trials are committed as they end, so they are kept."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
        where = redact(storage or "")
        if disk_full(err):
            sqlite_file = storage.removeprefix("sqlite:///") if storage and storage.startswith("sqlite:///") else None
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), sqlite_file or where) from err
        driver = [e for e in causes(err) if not isinstance(e, optuna.exceptions.StorageInternalError)]
        reason = next((str(e).splitlines()[0] for e in reversed(driver) if str(e)), type(err).__name__)
        transient = any(isinstance(e, sqlalchemy.exc.OperationalError) for e in driver)
        raise DogbenchError(f"the study's database {where} failed ({reason}); its finished trials are kept"
                            + (": run the same command again to continue" if transient else "")) from err


def causes(err: BaseException) -> Iterator[BaseException]:
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


def disk_full(err: BaseException) -> bool:
    """Whether the database failed for a full disk: SQLite's SQLITE_FULL ("database or disk is full") or
    PostgreSQL's SQLSTATE 53100 (disk_full; psycopg2's ``pgcode``, psycopg 3's ``sqlstate``)."""
    return any(getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
               or "53100" in (getattr(e, "pgcode", None), getattr(e, "sqlstate", None)) for e in causes(err))


def connection_lost(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps: Optuna's StorageInternalError wraps SQLAlchemy's errors) is a lost
    database connection, not a wrong query, a constraint, a permission or a full disk."""
    return not disk_full(err) and any(
        isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
        or (isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated) for e in causes(err))


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def fail_and_retry(study: optuna.Study, number: int) -> None:
    """Fail a dead worker's trial and queue it again, unless another worker failed it first."""
    try:
        failed = study.tell(number, state=TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        return  # finished meanwhile (by another worker)
    retry_dead_trials()(study, failed)


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial, every_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``every_s`` seconds while it runs (what ``study.optimize`` does)."""
    stop = threading.Event()  # the first beat is the caller's, under the study's lock

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                optuna_adapter.record_heartbeat(storage, trial)
            except Exception as err:  # noqa: BLE001 - a lost beat is retried; too many and the trial is retried
                warnings.warn(f"heartbeat of trial {trial.number} not recorded ({type(err).__name__}); retrying",
                              stacklevel=1)

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Local:
    """A study run by one process at a time (in memory, or SQLite under its file lock): every RUNNING trial
    found before asking is a dead run's. ``write_back``: the stored study a search in memory copies into."""

    shared = False

    def __init__(self, write_back: optuna.Study | None = None) -> None:
        self.write_back = write_back

    def mutex(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def fail_dead(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            fail_and_retry(study, t.number)

    def first_beat(self, trial: optuna.Trial) -> None:
        pass

    def beating(self, trial: optuna.Trial) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def finished(self, trial: FrozenTrial) -> None:
        if self.write_back is not None and trial.state in FINISHED:
            self.write_back.add_trial(trial)


class _Shared:
    """A study on a database server, shared by workers: a RUNNING trial is dead once its heartbeat is older than
    the grace period, or when it never beat (its worker died between asking and beating, under the lock)."""

    shared = True

    def __init__(self, storage: optuna.storages.RDBStorage, name: str, every_s: float) -> None:
        self.storage, self.name, self.every_s = storage, name, every_s

    def mutex(self) -> contextlib.AbstractContextManager[None]:
        return study_mutex(self.storage, self.name)

    def fail_dead(self, study: optuna.Study) -> None:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in optuna_adapter.never_beaten(self.storage, running):
            fail_and_retry(study, t.number)

    def first_beat(self, trial: optuna.Trial) -> None:
        optuna_adapter.record_heartbeat(self.storage, trial)

    def beating(self, trial: optuna.Trial) -> contextlib.AbstractContextManager[None]:
        return _heartbeat(self.storage, trial, self.every_s)

    def finished(self, trial: FrozenTrial) -> None:
        pass


@dataclass
class _Worker:
    """This process's part of a study: the study it samples on, how it finds dead trials, its number."""

    plan: StudyPlan
    study: optuna.Study
    backend: _Local | _Shared
    number: int
    store: Any = None  # the storage a lost connection is reopened on


def _sampler(plan: StudyPlan, worker: int) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=plan.seed + worker, n_startup_trials=min(10, max(1, plan.trials // 3)))


def _join(plan: StudyPlan, store: Any, stored: optuna.Study) -> _Worker:
    """Register as the study's next worker and enqueue the start, under the study's lock."""
    backend = _Local() if search_in_memory(plan.storage) else _Shared(store, plan.name, plan.heartbeat_s)
    with backend.mutex():
        number = int(stored.user_attrs.get("dogbench_workers", 0))
        stored.set_user_attr("dogbench_workers", number + 1)
        if plan.start is not None:
            stored.enqueue_trial(plan.start, skip_if_exists=True)
    study = optuna.load_study(study_name=plan.name, storage=store, sampler=_sampler(plan, number),
                              pruner=plan.pruner)
    return _Worker(plan, study, backend, number, store)


def _copy(plan: StudyPlan, stored: optuna.Study) -> _Worker | None:
    """A search in memory from the stored study's finished trials (None: it has enough), sampled as its first
    worker, so a rerun after a kill draws what the uninterrupted run drew."""
    done = stored.get_trials(deepcopy=False, states=FINISHED)
    if len(done) >= plan.trials:
        return None
    # named as the stored study: Hyperband picks a trial's bracket from the study's name and the trial's number
    search = optuna.create_study(study_name=plan.name, direction="maximize", sampler=_sampler(plan, 0),
                                 pruner=plan.pruner)
    search.add_trials(done)
    if plan.start is not None:
        search.enqueue_trial(plan.start, skip_if_exists=True)
    return _Worker(plan, search, _Local(write_back=stored), 0)


def run_study(plan: StudyPlan, objective: Objective) -> StudyOutcome:
    """Run (or continue) ``plan``'s study until it holds ``plan.trials`` finished trials or ``plan.timeout_s``
    passes; this worker's trials join those of every other worker on the same study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(plan.storage, plan)
    try:
        with storage_errors(plan.storage), study_lock(plan.storage):
            stored = optuna.create_study(study_name=plan.name, storage=store, direction="maximize",
                                         load_if_exists=True)
            copied = plan.storage is None or (plan.in_memory and search_in_memory(plan.storage))
            worker = _copy(plan, stored) if copied else _join(plan, store, stored)
            if worker is not None:
                _search(worker, objective)
            trials = stored.get_trials()
            return StudyOutcome(trials, best_trial(trials))
    finally:
        if isinstance(store, optuna.storages.RDBStorage):
            store.engine.dispose()  # close the server connections now, not at interpreter exit


def best_trial(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The complete trial of highest value, the earliest of equals (a server's ``best_trial`` breaks ties by
    no rule; small validation sets tie often)."""
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    return max(complete, key=lambda t: t.value) if complete else None


def _search(worker: _Worker, objective: Objective) -> None:
    """Ask, run and tell trials until the study holds its finished trials (counting those running elsewhere,
    under the study's lock, so workers stop at exactly the count) or the time is up."""
    plan = worker.plan
    deadline = time.monotonic() + plan.timeout_s
    lost = 0  # database connections lost in a row (a restarted server, a failover, a dropped network)
    with tqdm(total=plan.trials, desc=f"tune {plan.name} (worker {worker.number})", unit="trial",
              disable=not plan.progress) as bar, warnings.catch_warnings():
        # the shared loop beats heartbeats itself (``study.optimize`` cannot stop at an exact count across workers)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while time.monotonic() < deadline:
            try:
                trial, done = _next_trial(worker)
            except Exception as err:
                lost = _reconnect(worker, err, lost)
                continue
            lost = 0
            bar.n = done
            bar.refresh()
            if trial is None:
                if done >= plan.trials:
                    break
                time.sleep(min(1.0, plan.heartbeat_s))  # others' trials are running, or a dead one awaits failing
                continue
            lost = _run_trial(worker, trial, objective, lost)


def _next_trial(worker: _Worker) -> tuple[optuna.Trial | None, int]:
    """Under the study's lock: fail dead trials, count, and ask for a trial if the study needs one (beaten
    before the lock is let go: a trial without a beat is an orphan). Returns it and the finished count."""
    study = worker.study
    with worker.backend.mutex():
        worker.backend.fail_dead(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = sum(s in FINISHED for s in states)
        if done + states.count(TrialState.RUNNING) >= worker.plan.trials:
            return None, done
        trial = study.ask()
        try:
            worker.backend.first_beat(trial)
        except BaseException:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
            raise
    return trial, done


def _run_trial(worker: _Worker, trial: optuna.Trial, objective: Objective, lost: int) -> int:
    """Run ``trial`` and tell how it ended, whatever happens; returns the connection losses in a row."""
    study = worker.study
    try:
        with worker.backend.beating(trial):
            trial.set_user_attr("worker", {"number": worker.number, "host": socket.gethostname(), "pid": os.getpid()})
            value: float | None = objective(trial)
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        value, state = None, TrialState.PRUNED
    except optuna.exceptions.UpdateFinishedTrialError:
        # a stall longer than grace_s: another worker took this trial for dead and queued it again
        warnings.warn(f"trial {trial.number} was failed by another worker (no heartbeat for "
                      f"{worker.plan.grace_s} s); it runs again", stacklevel=2)
        return lost
    except BaseException as err:
        if isinstance(err, Exception) and worker.backend.shared and connection_lost(err):
            return _requeue(worker, trial, err, lost)
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    try:
        told = study.tell(trial, value, state=state, skip_if_finished=True)
    except Exception as err:  # the result is lost with the connection: the trial runs again
        if not (worker.backend.shared and connection_lost(err)):
            raise
        return _requeue(worker, trial, err, lost)
    worker.backend.finished(told)
    track.active().trial(worker.plan.name, told.number, told.params, told.value)
    return lost


def _requeue(worker: _Worker, trial: optuna.Trial, err: Exception, lost: int) -> int:
    """A trial cut off by a lost connection: failed and queued again (as a stale trial would be); if the
    database is still away it stays RUNNING, and the stale-trial check does the same once it is back."""
    with contextlib.suppress(Exception):
        fail_and_retry(worker.study, trial.number)
    return _reconnect(worker, err, lost, trial=trial.number)


def _reconnect(worker: _Worker, err: Exception, lost: int, trial: int | None = None) -> int:
    """After a lost server connection: drop the pool (the next use connects anew) and wait, or stop with a
    DogbenchError after ``RECONNECTS`` losses in a row. Any other error is raised as it is."""
    if not (worker.backend.shared and connection_lost(err)):
        raise err
    worker.store.engine.dispose()
    reason = str(getattr(err, "orig", err) or type(err).__name__).splitlines()[0]
    if lost >= RECONNECTS:
        raise DogbenchError(
            f"lost the connection to the study's database {lost + 1} times in a row ({reason}); study "
            f"'{worker.plan.name}' keeps every finished trial: start this worker again to continue it") from err
    during = f" during trial {trial} (it will be run again)" if trial is not None else ""
    warnings.warn(f"lost the connection to the study's database{during}: {reason}; reconnecting", stacklevel=3)
    time.sleep(2**lost)
    return lost + 1
