"""The recipe search's space: each part on or off becomes the training parameters it names, the configured recipe
is the first trial, and the record says what stopped the search."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

from dogbench.config import FinetuneConfig, Precision
from dogbench.device import Policy
from dogbench.protocols.recipe_search import (
    CUTMIX,
    MIXUP,
    RANDAUGMENT,
    ema_decay_for,
    search_record,
    start_params,
    suggest_recipe,
)
from dogbench.training import resolve_params

POLICY = Policy(torch.device("cpu"), Precision.FP32, Precision.FP32)


def _base(**changes: object):
    return resolve_params(FinetuneConfig(batch_size=4, precision=Precision.FP32, **changes), "full", is_vit=True,
                          policy=POLICY)


@pytest.mark.parametrize("on", [False, True])
def test_each_part_on_or_off_becomes_its_training_parameters(on: bool) -> None:
    base = _base()
    fixed = {"lr": 1e-4, "weight_decay": 0.01, "layer_decay": 0.7, "ema": on, "mixup": on, "randaugment": on,
             "re_prob": 0.25 if on else 0.0}
    got = dataclasses.replace(base, **suggest_recipe(optuna.trial.FixedTrial(fixed), "full", base, is_vit=True,
                                                     steps_per_epoch=50))
    assert got.ema_decay == (pytest.approx(0.98) if on else 0.0)  # about an epoch's average
    assert (got.mixup, got.cutmix) == ((MIXUP, CUTMIX) if on else (0.0, 0.0))
    assert got.randaugment == (RANDAUGMENT if on else None)
    assert got.re_prob == fixed["re_prob"] and got.layer_decay == 0.7


def test_a_part_the_config_sets_keeps_its_setting_and_the_configured_recipe_is_the_first_trial() -> None:
    base = _base(ema_decay=0.9, mixup=0.2, cutmix=0.0, randaugment="rand-m5", re_prob=0.1)
    start = start_params("full", base, is_vit=True)
    assert start == {"lr": base.lr, "weight_decay": base.weight_decay, "layer_decay": base.layer_decay,
                     "ema": True, "mixup": True, "randaugment": True, "re_prob": 0.1}
    got = suggest_recipe(optuna.trial.FixedTrial(start), "full", base, is_vit=True, steps_per_epoch=50)
    assert dataclasses.replace(base, **got) == base  # the first trial trains exactly the configured recipe


def test_an_odd_batch_never_searches_mixup_and_the_ema_horizon_is_bounded() -> None:
    base = dataclasses.replace(_base(), batch_size=5)
    assert "mixup" not in start_params("full", base, is_vit=True)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: float(bool(suggest_recipe(t, "full", base, is_vit=False, steps_per_epoch=3))),
                   n_trials=5)
    assert all("mixup" not in t.params and "layer_decay" not in t.params for t in study.trials)
    assert (ema_decay_for(1), ema_decay_for(10**7)) == (0.9, 0.9998)


def test_the_record_says_a_budget_stopped_the_search_only_when_trials_are_missing() -> None:
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    trials, best = study.trials, study.best_trial
    assert search_record("s", trials, best, wanted=5, budget_s=60.0)["stopped_by"] == "budget"
    assert search_record("s", trials, best, wanted=2, budget_s=60.0)["stopped_by"] == "trials"
    assert search_record("s", trials, best, wanted=5, budget_s=None)["stopped_by"] == "trials"
