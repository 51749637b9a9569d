from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from sklearn.datasets import make_blobs

from dogbench import tune
from dogbench.config import TuneConfig
from dogbench.errors import DogbenchError
from dogbench.heads import LinearHead, LogisticHead, MLPHead
from dogbench.tune import (
    BASELINE_CS,
    TRIAL_PATIENCE,
    TuneResult,
    build_head,
    make_logistic,
    make_objective,
    suggest_head_params,
    sweep_logistic_C,
    tune_head,
)

COMMON = {"lr": 3e-3, "weight_decay": 1e-4, "label_smoothing": 0.1, "batch_size": 256}
MLP_ONLY = {"hidden_size", "n_layers", "dropout"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(*, n: int = 360, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, ...]:
    """6 separable classes in 32-d, split 2:1 into train and validation."""
    X, y = make_blobs(n_samples=n, centers=6, n_features=32, cluster_std=spread, random_state=seed)
    X = X.astype(np.float32)
    cut = 2 * n // 3
    return X[:cut], y[:cut], X[cut:], y[cut:]


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, ...]:
    return _blobs()


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_suggest_linear_has_no_mlp_keys() -> None:
    params = suggest_head_params(optuna.trial.FixedTrial({"head": "linear", **COMMON}), heads=["linear", "mlp"])
    assert params == {"head": "linear", **COMMON}


def test_suggest_mlp_adds_its_keys() -> None:
    fixed = {"head": "mlp", **COMMON, "hidden_size": 256, "n_layers": 2, "dropout": 0.3}
    params = suggest_head_params(optuna.trial.FixedTrial(fixed), heads=["linear", "mlp"])
    assert params == fixed
    assert MLP_ONLY <= set(params)


def test_suggest_respects_the_allowed_heads() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = {suggest_head_params(study.ask(), heads=["linear"])["head"] for _ in range(5)}
    assert kinds == {"linear"}


@pytest.mark.parametrize(
    ("params", "cls"),
    [
        ({"head": "linear", **COMMON}, LinearHead),
        ({"head": "mlp", **COMMON, "hidden_size": 64, "n_layers": 2, "dropout": 0.2}, MLPHead),
    ],
)
def test_build_head_round_trips_params(params: dict, cls: type) -> None:
    head = build_head(params, max_epochs=17, seed=5)
    assert type(head) is cls
    got = head.get_params()
    assert {k: got[k] for k in params if k != "head"} == {k: v for k, v in params.items() if k != "head"}
    assert got["max_epochs"] == 17 and got["seed"] == 5 and got["device"] == "cpu"


def test_objective_scores_validation_and_records_best_epoch(blobs: tuple[np.ndarray, ...]) -> None:
    objective = make_objective(*blobs, heads=["linear"], max_epochs=10, seed=0)
    trial = optuna.trial.FixedTrial({"head": "linear", **COMMON})
    value = objective(trial)
    assert 0.9 <= value <= 1.0
    assert 1 <= trial.user_attrs["best_epoch"] <= 10


def test_tune_head_finds_a_good_head_and_resumes(tmp_path: Path, blobs: tuple[np.ndarray, ...]) -> None:
    storage = _storage(tmp_path)
    cfg = TuneConfig(trials=6, max_epochs=30, seed=0)

    result = tune_head(*blobs, cfg=cfg, storage=storage, study_name="cnn", progress=False)

    assert result.best_val_top1 >= 0.95
    assert 1 <= result.best_epoch <= 30
    assert result.n_trials == 6 == len(result.history)
    assert result.n_complete + result.n_pruned == 6
    assert result.best_params["head"] in ("linear", "mlp")
    assert (result.best_params["head"] == "mlp") == MLP_ONLY.issubset(result.best_params)
    best_value = max(h["value"] for h in result.history if h["state"] == "COMPLETE")
    assert result.best_val_top1 == best_value
    assert result.storage == storage and result.study_name == "cnn"
    assert TuneResult.from_dict(result.to_dict()) == result

    again = tune_head(*blobs, cfg=cfg, storage=storage, study_name="cnn", progress=False)
    assert again.n_trials == 6
    assert again.best_params == result.best_params and again.best_val_top1 == result.best_val_top1

    more = tune_head(
        *blobs, cfg=TuneConfig(trials=8, max_epochs=30, seed=0), storage=storage, study_name="cnn", progress=False
    )
    assert more.n_trials == 8
    assert [h["number"] for h in more.history] == list(range(8))
    assert more.best_val_top1 >= result.best_val_top1
    assert optuna.load_study(study_name="cnn", storage=storage).trials[-1].number == 7


def test_every_finished_trial_is_stored_with_its_epochs(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    X_train, y_train, X_val, y_val = _blobs(spread=4.0)  # overlapping classes: trials differ, some are pruned
    cfg = TuneConfig(trials=12, max_epochs=20, seed=0)
    result = tune_head(X_train, y_train, X_val, y_val, cfg=cfg, storage=storage, study_name="s", progress=False)

    stored = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.number for t in stored] == [h["number"] for h in result.history] == list(range(12))
    assert {t.state.name for t in stored} <= {"COMPLETE", "PRUNED"} and result.n_pruned > 0
    for t, h in zip(stored, result.history, strict=True):
        assert h["params"] == t.params and h["value"] == t.value
        if t.params["head"] == "logistic":  # a convex solve, scored once and never pruned
            assert t.state.name == "COMPLETE" and not t.intermediate_values and h["n_epochs"] == 0
            continue
        assert h["n_epochs"] == len(t.intermediate_values) == max(t.intermediate_values) >= 1
        if t.state.name == "COMPLETE":
            # Early stopping ends a completed trial TRIAL_PATIENCE epochs after its best, or at max_epochs.
            assert t.user_attrs["best_epoch"] == max(t.intermediate_values, key=t.intermediate_values.get)
            assert h["n_epochs"] in (t.user_attrs["best_epoch"] + TRIAL_PATIENCE, cfg.max_epochs)


def test_pruned_trials_are_counted(tmp_path: Path, blobs: tuple[np.ndarray, ...]) -> None:
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    distributions = {"head": optuna.distributions.CategoricalDistribution(["linear"])}
    for _ in range(2):
        study.add_trial(
            optuna.trial.create_trial(
                params={"head": "linear"},
                distributions=distributions,
                state=optuna.trial.TrialState.PRUNED,
                intermediate_values={1: 0.1},
            )
        )

    result = tune_head(
        *blobs,
        cfg=TuneConfig(trials=4, max_epochs=5, heads=("linear",), pruner="none"),
        storage=storage,
        study_name="s",
        progress=False,
    )

    assert result.n_pruned == 2
    assert result.n_complete == 2  # the pruned trials count towards the 4 asked for
    assert result.n_trials == 4
    assert [h["state"] for h in result.history].count("PRUNED") == 2


def test_a_study_without_completed_trials_is_an_error(tmp_path: Path, blobs: tuple[np.ndarray, ...]) -> None:
    with pytest.raises(DogbenchError, match="no completed trial"):
        tune_head(*blobs, cfg=TuneConfig(trials=0), storage=_storage(tmp_path), study_name="empty", progress=False)


def test_logistic_sweep_picks_from_the_grid_or_its_refinement() -> None:
    X_train, y_train, X_val, y_val = _blobs(n=240, spread=6.0, seed=1)  # overlapping classes: C matters
    Cs = (1e-3, 1e-1, 10.0)
    result = sweep_logistic_C(X_train, y_train, X_val, y_val, Cs=Cs)

    grid = {c * f for c in Cs for f in (1.0, 1 / math.sqrt(10.0), math.sqrt(10.0))}
    assert any(math.isclose(result.C, c) for c in grid)
    assert len(result.curve) == len(Cs) + 2
    assert {f"{c:.3g}" for c in Cs} <= set(result.curve)
    assert result.curve[f"{result.C:.3g}"] == result.val_top1 == max(result.curve.values())
    assert 0.0 < result.val_top1 <= 1.0 and result.seconds > 0
    assert result.to_dict()["C"] == result.C

    refit = make_logistic(result.C).fit(X_train, y_train)
    assert np.mean(refit.predict(X_val) == y_val) == result.val_top1


def test_default_baseline_grid_is_decades() -> None:
    assert [round(math.log10(c)) for c in BASELINE_CS] == list(range(-4, 3))


def test_search_on_a_database_server_uses_the_shared_study() -> None:
    import uuid

    from conftest import postgres_url

    assert tune.search_in_memory("sqlite:///x.db") and not tune.search_in_memory("postgresql://u@h/db")
    storage = postgres_url()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), 40)
    X[np.arange(120), y] += 3.0
    cfg = TuneConfig(trials=4, max_epochs=5, heads=("linear",))
    name = f"s-{uuid.uuid4().hex[:12]}"
    result = tune.tune_head(X[::2], y[::2], X[1::2], y[1::2], cfg=cfg, storage=storage, study_name=name,
                            progress=False)
    assert result.n_trials == 4 and result.best_val_top1 > 0.5
    stored = optuna.load_study(study_name=name, storage=storage)
    assert len(stored.trials) == 4 and all(t.intermediate_values for t in stored.trials)  # reported per epoch


def test_suggest_logistic_has_only_its_own_keys() -> None:
    params = suggest_head_params(optuna.trial.FixedTrial({"head": "logistic", "C": 0.1, "label_smoothing": 0.0}),
                                 heads=["logistic", "mlp"])
    assert params == {"head": "logistic", "C": 0.1, "label_smoothing": 0.0} == tune.baseline_params(0.1)
    head = build_head(params, max_epochs=7, seed=0)
    assert isinstance(head, LogisticHead) and head.C == 0.1  # no max_epochs: it runs to convergence


def test_the_search_starts_from_the_baseline_and_never_falls_below_it(tmp_path: Path) -> None:
    # Overlapping classes where the C-swept probe is hard to beat: the baseline's configuration is trial 0,
    # scored by the sweep's own head (its exact validation top-1), so the best trial is at least as good.
    X_train, y_train, X_val, y_val = _blobs(n=600, spread=5.0, seed=2)
    sweep = sweep_logistic_C(X_train, y_train, X_val, y_val)
    cfg = TuneConfig(trials=6, max_epochs=10, seed=0)
    result = tune_head(X_train, y_train, X_val, y_val, cfg=cfg, storage=_storage(tmp_path), study_name="s",
                       progress=False, baseline=sweep)
    first = result.history[0]
    assert first["params"] == tune.baseline_params(sweep.C) and first["value"] == sweep.val_top1
    assert result.best_val_top1 >= sweep.val_top1
    # without the sweep's heads (a resumed run reading tuning.json) the enqueued trial is fitted afresh, to the
    # same model: the same validation top-1
    again = tune_head(X_train, y_train, X_val, y_val, cfg=TuneConfig(trials=1, max_epochs=10, seed=0), storage=None,
                      study_name="t", progress=False, baseline=tune.BaselineResult.from_dict(sweep.to_dict()))
    assert again.history[0]["params"] == first["params"] and again.best_val_top1 == sweep.val_top1


def test_logistic_trials_reuse_and_warm_start_solved_heads(blobs: tuple[np.ndarray, ...]) -> None:
    sweep = sweep_logistic_C(*blobs, Cs=(0.01, 1.0))
    assert len(sweep.heads) == len(sweep.curve) and all(smoothing == 0.0 for _, smoothing in sweep.heads)
    solved = sweep.heads[(sweep.C, 0.0)]
    objective = make_objective(*blobs, heads=["logistic"], max_epochs=10, seed=0, solved=sweep.heads)
    same = optuna.trial.FixedTrial({"head": "logistic", "C": sweep.C, "label_smoothing": 0.0})
    assert objective(same) == solved.best_val_top1_ and same.user_attrs["best_epoch"] == solved.n_iter_
    near = optuna.trial.FixedTrial({"head": "logistic", "C": sweep.C * 1.2, "label_smoothing": 0.0})
    assert 0.0 < objective(near) <= 1.0 and near.user_attrs["best_epoch"] < solved.n_iter_


@pytest.mark.parametrize(("kind", "cls"), [("halving", optuna.pruners.SuccessiveHalvingPruner),
                                          ("hyperband", optuna.pruners.HyperbandPruner),
                                          ("median", optuna.pruners.MedianPruner), ("none", optuna.pruners.NopPruner)])
def test_pruners(kind: str, cls: type) -> None:
    assert isinstance(tune.make_pruner(kind, max_epochs=50), cls)


def test_an_unknown_pruner_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="halving, hyperband, median, none"):
        tune.make_pruner("asha")


def test_successive_halving_judges_no_trial_before_its_first_rung(tmp_path: Path) -> None:
    X_train, y_train, X_val, y_val = _blobs(spread=4.0)
    cfg = TuneConfig(trials=12, max_epochs=20, seed=0, heads=("linear", "mlp"))
    result = tune_head(X_train, y_train, X_val, y_val, cfg=cfg, storage=_storage(tmp_path), study_name="s",
                       progress=False)
    pruned = [h for h in result.history if h["state"] == "PRUNED"]
    assert pruned and all(h["n_epochs"] >= tune.PRUNE_MIN_EPOCHS for h in pruned)


def test_a_resumed_study_does_not_run_the_baseline_trial_twice(tmp_path: Path) -> None:
    X_train, y_train, X_val, y_val = _blobs(n=300, spread=4.0, seed=3)
    sweep = sweep_logistic_C(X_train, y_train, X_val, y_val)
    storage = _storage(tmp_path)
    for trials in (3, 5):
        result = tune_head(X_train, y_train, X_val, y_val, cfg=TuneConfig(trials=trials, max_epochs=8), storage=storage,
                           study_name="s", progress=False, baseline=sweep)
    starts = [h for h in result.history if h["params"] == tune.baseline_params(sweep.C)]
    assert result.n_trials == 5 and [h["number"] for h in starts] == [0]


def test_without_logistic_heads_nothing_is_enqueued(tmp_path: Path, blobs: tuple[np.ndarray, ...]) -> None:
    sweep = sweep_logistic_C(*blobs, Cs=(0.1,))
    result = tune_head(*blobs, cfg=TuneConfig(trials=2, max_epochs=5, heads=("linear",)), storage=None,
                       study_name="s", progress=False, baseline=sweep)
    assert {h["params"]["head"] for h in result.history} == {"linear"}


def test_a_full_disk_under_the_sqlite_study_names_the_file_and_keeps_its_trials(
        small_disk: Path, blobs: tuple[np.ndarray, ...]) -> None:
    """The study's SQLite file on a real tmpfs that fills up between two runs: SQLite's "database or disk is full"
    (wrapped by Optuna in StorageInternalError) becomes the OSError of every full disk, naming the database; its
    finished trials are intact, and with the disk freed the same call continues the study."""
    import errno

    from conftest import fill

    storage = f"sqlite:///{small_disk / 'study.db'}"
    first = tune_head(*blobs, cfg=TuneConfig(trials=2, max_epochs=5, seed=0), storage=storage, study_name="cnn",
                      progress=False)
    filler = fill(small_disk, 0)
    with pytest.raises(OSError) as caught:
        tune_head(*blobs, cfg=TuneConfig(trials=6, max_epochs=5, seed=0), storage=storage, study_name="cnn",
                  progress=False)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(small_disk / "study.db")
    filler.unlink()
    kept = optuna.load_study(study_name="cnn", storage=storage).trials
    assert [t.params for t in kept[:2]] == [h["params"] for h in first.history]
    again = tune_head(*blobs, cfg=TuneConfig(trials=6, max_epochs=5, seed=0), storage=storage, study_name="cnn",
                      progress=False)
    assert again.n_complete + again.n_pruned == 6
    assert [h["params"] for h in again.history[:2]] == [h["params"] for h in first.history]


def test_storage_errors_map_a_full_disk_by_its_code_and_name_the_database_otherwise() -> None:
    """PostgreSQL's disk_full (SQLSTATE 53100) is a full disk, not a lost connection to retry; an integrity error
    names the database without "run again"; a lost connection says to run again; a looping chain ends."""
    import errno

    import sqlalchemy

    class DiskFull(Exception):
        pgcode = "53100"

    full = sqlalchemy.exc.OperationalError("INSERT", {}, DiskFull("could not extend file: No space left"))
    url = "postgresql://me:secret@db:5432/studies"
    with pytest.raises(OSError) as caught, tune.storage_errors(url):
        raise optuna.exceptions.StorageInternalError("commit failed") from full
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "postgresql://me:***@db:5432/studies"
    assert not tune.studies.connection_lost(full)
    lost = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
    assert tune.studies.connection_lost(lost)
    with pytest.raises(DogbenchError, match=r"studies failed \(server closed the connection unexpectedly\); its "
                       r"finished trials are kept: run the same command again"), tune.storage_errors(url):
        raise lost
    bad = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key value"))
    with pytest.raises(DogbenchError) as caught, tune.storage_errors(url):
        raise bad
    assert "duplicate key value" in str(caught.value) and "run the same command" not in str(caught.value)
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert [str(e) for e in tune.studies.causes(a)] == ["a", "b"]


def test_the_optuna_private_api_the_adapter_uses_is_still_there(tmp_path: Path) -> None:
    """Fails loudly on an Optuna the adapter was not checked against: a new major version may rename what
    ``dogbench.tune.optuna_adapter`` reaches into (a trial's storage id, the heartbeat table)."""
    from optuna.storages._rdb import models

    from dogbench.tune import optuna_adapter

    major = int(optuna.__version__.split(".")[0])
    assert major in optuna_adapter.KNOWN_MAJORS, (
        f"Optuna {optuna.__version__} is a major version dogbench.tune.optuna_adapter was not checked against "
        f"({optuna_adapter.KNOWN_MAJORS}): check Trial._trial_id, FrozenTrial._trial_id and "
        "optuna.storages._rdb.models.TrialHeartbeatModel still exist (or have public replacements), then add "
        "the major to KNOWN_MAJORS and raise the bound in pyproject.toml")
    for name in ("TrialHeartbeatModel",):
        assert hasattr(models, name), f"optuna.storages._rdb.models.{name} is gone: update optuna_adapter"
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beats.db'}")
    study = optuna.create_study(storage=storage)
    beaten, silent = study.ask(), study.ask()
    assert hasattr(beaten, "_trial_id"), "optuna.Trial._trial_id is gone: update optuna_adapter.trial_id"
    optuna_adapter.record_heartbeat(storage, beaten)
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert all(hasattr(t, "_trial_id") for t in running), "FrozenTrial._trial_id is gone: update optuna_adapter"
    assert [t.number for t in optuna_adapter.never_beaten(storage, running)] == [silent.number]
    storage.engine.dispose()


def test_a_trial_left_running_by_a_dead_process_is_failed_and_run_again(tmp_path: Path) -> None:
    """The one resume rule on a local study: a rerun continues until ``trials`` finished trials, and a RUNNING
    trial (its process was killed; the study's file lock says nobody else runs it) is failed and queued again
    with its parameters, at most FAILED_TRIAL_RETRIES times."""
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"x": 0.25})
    killed = study.ask()
    killed.suggest_float("x", 0.0, 1.0)  # then its process died: RUNNING forever
    seen: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(trial.suggest_float("x", 0.0, 1.0))
        return seen[-1]

    plan = tune.StudyPlan(name="s", storage=storage, trials=3, seed=0, start={"x": 0.5})
    trials, best = tune.run_study(plan, objective)
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == {"x": 0.25}
    assert seen[:2] == [0.5, 0.25]  # the queued trials (the start, the retry) before any sampled one
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3 and best.value == max(seen)
    again = tune.run_study(dataclasses.replace(plan, trials=4), objective)
    assert len(seen) == 4 and sum(t.state.is_finished() for t in again.trials) == 5  # 4 finished + the failed
    assert optuna.load_study(study_name="s", storage=storage).user_attrs["dogbench_workers"] == 2


def test_a_trial_that_keeps_dying_is_retried_only_so_often(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    check = tune.StudyPlan(name="s", storage=storage, trials=0, seed=0)  # fails dead trials, runs none
    study.ask().suggest_float("x", 0.0, 1.0)  # its process dies
    for _ in range(tune.FAILED_TRIAL_RETRIES):
        tune.run_study(check, lambda trial: 0.0)
        retry = study.ask()  # the queued retry, with its parameters; its process dies too
        assert retry.params == study.trials[0].params
    tune.run_study(check, lambda trial: 0.0)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL] * (tune.FAILED_TRIAL_RETRIES + 1)  # none queued after that


def test_the_best_trial_is_the_earliest_of_equal_values() -> None:
    """A server's ``best_trial`` breaks ties by no rule; the study runner takes the earliest complete trial."""
    done, failed = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    made = [optuna.trial.create_trial(value=v, state=s) for v, s in ((0.5, done), (0.9, done), (None, failed),
                                                                      (0.9, done))]
    for number, t in enumerate(made):
        t.number = number
    assert tune.best_trial(list(reversed(made))).number == 1
    assert tune.best_trial(made[2:3]) is None
