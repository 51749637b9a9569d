"""The one module that touches Optuna's private API, for the two things a shared ask/tell loop needs and Optuna
has no public call for: a trial's storage id (to record its heartbeat) and the heartbeat table (to find trials
that never beat). ``tests/test_tune.py`` checks these still exist whenever Optuna is upgraded."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
import sqlalchemy
from optuna.storages._rdb import models as rdb_models

KNOWN_MAJORS: tuple[int, ...] = (4, 5)  # the Optuna major versions this module was checked against


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The trial's id in its storage (``Study.tell`` takes numbers, ``record_heartbeat`` only ids)."""
    return trial._trial_id


def record_heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> None:
    """One heartbeat of ``trial``: what ``study.optimize`` records, for a loop that asks and tells itself."""
    storage.record_heartbeat(trial_id(trial))


def never_beaten(storage: optuna.storages.RDBStorage, running: Sequence[optuna.trial.FrozenTrial]
                 ) -> list[optuna.trial.FrozenTrial]:
    """The trials of ``running`` without a single heartbeat row (``fail_stale_trials`` only sees stale beats)."""
    if not running:
        return []
    table = rdb_models.TrialHeartbeatModel.__tablename__
    query = sqlalchemy.text(f"SELECT trial_id FROM {table} WHERE trial_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        beaten = {row[0] for row in conn.execute(query, {"ids": [trial_id(t) for t in running]})}
    return [t for t in running if trial_id(t) not in beaten]
