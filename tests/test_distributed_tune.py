"""Tuning workers sharing one study on a real PostgreSQL server (``DOGBENCH_TEST_POSTGRES``, a URL; `.ci/run`
starts a server and sets it): exactly ``trials`` finished trials in total, no two alike, and a worker
SIGKILLed mid-trial has its trial failed and run again while the study still reaches its count.
Without a server these tests skip with the reason; under CI they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import postgres_url
from dogbench.config import TuneConfig

WORKER = """
import sys
import numpy as np
from dogbench.config import TuneConfig
from dogbench.errors import DogbenchError
from dogbench.tune import tune_head

url, name, trials, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
X = rng.normal(size=(900, 24)).astype(np.float32)
y = X[:, :4].argmax(axis=1).astype(np.int64)
cfg = TuneConfig(trials=trials, heads=("mlp",), max_epochs=epochs, pruner="none", heartbeat_s=1, grace_s=4,
                 timeout_s=150)
try:
    tune_head(X[:600], y[:600], X[600:], y[600:], cfg=cfg, storage=url, study_name=name, progress=False)
except DogbenchError as err:
    print("dogbench: error:", err, file=sys.stderr)
    sys.exit(2)
"""


def _workers(url: str, name: str, n: int, trials: int, epochs: int = 30) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(trials), str(epochs)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode in (0, -signal.SIGKILL), err[-2000:]


def _study(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def _finished(study) -> list:
    import optuna

    return [t for t in study.get_trials() if t.state in (optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED)]


def _create(url: str, name: str) -> None:
    import optuna

    optuna.create_study(study_name=name, storage=url, direction="maximize")


def test_three_workers_share_one_study_and_stop_at_exactly_its_trials() -> None:
    url = postgres_url()
    name = f"test-{uuid.uuid4().hex[:12]}"
    _create(url, name)
    procs = _workers(url, name, 3, 30)
    _finish(procs)
    assert all(p.returncode == 0 for p in procs)
    study = _study(url, name)
    done = _finished(study)
    assert len(done) == 30 and len(study.get_trials()) == 30
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == 30  # no two alike, start-up trials included (a seed per worker)
    assert {t.user_attrs["worker"]["number"] for t in done} == {0, 1, 2}
    assert study.user_attrs["dogbench_workers"] == 3


def test_a_worker_killed_mid_trial_has_its_trial_failed_and_run_again() -> None:
    import optuna

    url = postgres_url()
    name = f"test-{uuid.uuid4().hex[:12]}"
    _create(url, name)
    procs = _workers(url, name, 3, 30)
    victim = procs[1]
    deadline = time.monotonic() + 120
    killed = None
    while killed is None and time.monotonic() < deadline:
        for t in _study(url, name).get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("worker", {}).get("pid") == victim.pid:
                victim.send_signal(signal.SIGKILL)
                killed = t.number
                break
        time.sleep(0.05)
    assert killed is not None, "the victim never ran a trial"
    _finish(procs)
    assert victim.returncode == -signal.SIGKILL and procs[0].returncode == procs[2].returncode == 0
    study = _study(url, name)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state == optuna.trial.TrialState.FAIL  # marked by a survivor, from its heartbeat
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    # the retry repeats what the killed trial had sampled when it died (and samples the rest)
    assert len(retries) == 1 and retries[0].params.items() >= trials[killed].params.items()
    assert len(_finished(study)) == 30


def test_only_postgresql_is_a_shared_study(tmp_path) -> None:
    from dogbench.errors import DogbenchError
    from dogbench.tune import open_storage

    with pytest.raises(DogbenchError, match=r"cannot be opened .*postgresql://USER:PASSWORD@HOST:5432/DB"):
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none", TuneConfig())
    with pytest.raises(DogbenchError) as err:
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none", TuneConfig())
    assert "secret" not in str(err.value) and "nobody:***@" in str(err.value)
    import optuna

    from dogbench.tune import study_mutex

    with pytest.raises(DogbenchError, match="distributed tuning needs PostgreSQL .*, not sqlite"), \
            study_mutex(optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/t.db"), "s"):
        pass
    assert open_storage(f"sqlite:///{tmp_path}/s.db", TuneConfig()) == f"sqlite:///{tmp_path}/s.db"


def test_two_finetune_workers_share_one_study_of_fine_tuning_trials(tmp_path) -> None:
    """`dogbench finetune --storage postgresql://... --set finetune.trials=4` started twice (each its own run
    folder, one shared cache): the fine-tuning study ends with exactly 4 finished trials, no two alike, and both
    workers retrain the same best configuration."""
    import json

    from conftest import make_class_folder_layout

    url = postgres_url()
    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=2)
    tag = uuid.uuid4().hex[:8]
    seed = int(tag, 16) % 10**6  # the fine-tuning study's name derives from the recipe: a new study per test run

    def worker(i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "dogbench", "finetune", "--data", str(data), "--out", str(tmp_path / f"run{i}"),
               "--backbone", "vit=test_vit@random,img_size=32", "--cache-dir", str(tmp_path / "cache"),
               "--methods", "lora", "--storage", url, "--study", f"test-{tag}", "--trials", "2", "--epochs", "2",
               "--quiet", "--set", "tune.max_epochs=10", "--set", "evaluate.n_bootstrap=100",
               "--set", "finetune.batch_size=4", "--set", "finetune.trials=4", "--set", f"finetune.seed={seed}",
               "--set", "report.enabled=false"]
        return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = [worker(0), worker(1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads((tmp_path / f"run{i}" / "results.json").read_text())["models"]["vit/lora"] for i in (0, 1)]
    studies = {row["training"]["trials"]["study"] for row in rows}
    assert len(studies) == 1
    study = _study(url, studies.pop())
    done = _finished(study)
    assert len(done) == 4 and len(study.get_trials()) == 4
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4
    assert rows[0]["training"]["trials"]["best_params"] == rows[1]["training"]["trials"]["best_params"]
    assert rows[0]["training"]["trials"]["n_trials"] == rows[1]["training"]["trials"]["n_trials"] == 4
    assert study.user_attrs["dogbench_workers"] == 2  # both joined it (the 2-trial head study may be done first)


def test_a_dropped_database_connection_is_survived_or_named_and_the_study_stays_consistent() -> None:
    """Mid-trial, the server closes every connection of the worker (pg_terminate_backend, as a failover or a
    restarted server does): the worker says so, reconnects and finishes (after 5 losses in a row it would exit 2
    with a message); the study then holds exactly its trials once a worker has run after it, none left running."""
    import optuna
    import sqlalchemy

    url = postgres_url()
    name = f"test-{uuid.uuid4().hex[:12]}"
    _create(url, name)
    tagged = f"{url}{'&' if '?' in url else '?'}application_name={name}"  # only this worker's connections drop
    worker, = _workers(tagged, name, 1, 12, epochs=60)
    engine = sqlalchemy.create_engine(url)
    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    deadline, dropped = time.monotonic() + 120, 0
    while not dropped and time.monotonic() < deadline:
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if any(t.user_attrs.get("worker", {}).get("pid") == worker.pid for t in running):
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                dropped = len(conn.execute(sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": name}).all())
        time.sleep(0.05)
    engine.dispose()
    storage.engine.dispose()
    assert dropped, "the worker never ran a trial"
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "Traceback" not in err, err[-3000:]
    # it said so: in the search loop, or in the heartbeat thread when that was what the drop hit first
    assert ("lost the connection to the study's database" in err and "reconnecting" in err) or "not recorded" in err
    study = _study(url, name)
    cut = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    for t in cut:  # a trial cut off by the drop was queued again with its parameters, not lost
        again = [r for r in study.get_trials() if r.system_attrs.get("failed_trial") == t.number]
        assert again and again[0].params.items() >= t.params.items()
    _finish(_workers(url, name, 1, 12))
    study = _study(url, name)
    assert len(_finished(study)) == 12
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
