"""Imbalanced classes (issue 30): class-weighted and class-balanced heads, balanced top-1 and per-class recall in
the results, and ``tune.metric`` choosing heads, trials and epochs on validation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from conftest import class_image
from dogbench.cli import main
from dogbench.evaluate import classification_metrics
from dogbench.heads import LinearHead, LogisticHead, MLPHead
from dogbench.heads.fit import balanced_weights, val_scores
from dogbench.tune import fixed_params, sweep_logistic_C

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=5", "--set", "evaluate.n_bootstrap=50", "--set",
        "report.enabled=false", "--quiet"]


def _imbalanced(seed: int = 0, n: tuple[int, ...] = (120, 12, 6)) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes, the first far more frequent: an unweighted fit favours it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(len(n), 8))
    X = np.concatenate([centres[k] + rng.normal(0.0, 1.2, size=(m, 8)) for k, m in enumerate(n)]).astype(np.float32)
    y = np.concatenate([np.full(m, k) for k, m in enumerate(n)])
    return X, y


# ---------------------------------------------------------------- metrics


def test_balanced_top1_and_validation_scores_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.choice(5, size=200, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    proba = rng.dirichlet(np.ones(5), size=200)
    proba[np.arange(200), y] += rng.uniform(0, 0.6, size=200)  # better than chance, not perfect
    pred = proba.argmax(axis=1)
    metrics = classification_metrics(y, proba)
    assert metrics.balanced_top1 == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics.balanced_top1 == pytest.approx(np.mean(list(metrics.per_class.values())))
    assert metrics.to_dict()["balanced_top1"] == metrics.balanced_top1

    linear = torch.nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(5))  # logits = the features: predictions = argmax of proba
    scores = val_scores(linear, torch.from_numpy(proba).float(), torch.from_numpy(y))
    assert scores["top1"] == pytest.approx(np.mean(pred == y))
    assert scores["balanced_top1"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))


def test_balanced_weights_are_scikit_learns() -> None:
    y = np.array([0] * 10 + [1] * 3 + [2] * 1)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(balanced_weights(torch.from_numpy(y), 3).numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------- heads


def test_weighted_logistic_head_solves_scikit_learns_class_weighted_objective() -> None:
    X, y = _imbalanced()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000,
                                                                  tol=1e-8)).fit(X, y)
    head = LogisticHead(C=0.5, tol=1e-5, balance="weights").fit(X, y)
    assert np.abs(head.predict_proba(X) - reference.predict_proba(X)).max() < 0.02
    plain = LogisticHead(C=0.5, tol=1e-5).fit(X, y)
    assert balanced_accuracy_score(y, head.predict(X)) > balanced_accuracy_score(y, plain.predict(X))


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balanced_adamw_heads_recall_the_rare_classes_better(balance: str) -> None:
    X, y = _imbalanced()
    X_test, y_test = _imbalanced(seed=0, n=(100, 100, 100))  # the same classes, balanced
    params = {"lr": 1e-2, "max_epochs": 15, "batch_size": 32, "seed": 1}
    plain = LinearHead(**params).fit(X, y)
    balanced = LinearHead(**params, balance=balance).fit(X, y)
    rare = y_test > 0
    assert np.mean(balanced.predict(X_test)[rare] == y_test[rare]) > np.mean(plain.predict(X_test)[rare] ==
                                                                              y_test[rare])
    assert balanced.get_params()["balance"] == balance


def test_the_sampler_is_seeded() -> None:
    X, y = _imbalanced()
    fit = {"max_epochs": 3, "batch_size": 32, "dropout": 0.2, "hidden_size": 16, "balance": "sampler"}
    a, b, c = (MLPHead(**fit, seed=s).fit(X, y).predict_proba(X) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_balance_or_metric_is_refused_with_the_choices() -> None:
    X, y = _imbalanced()
    with pytest.raises(ValueError, match="Unknown balance 'weigths'. Did you mean 'weights'"):
        LogisticHead(balance="weigths").fit(X, y)
    with pytest.raises(ValueError, match="Known: top1, balanced_top1, macro_f1"):
        LinearHead(val_metric="accuracy").fit(X, y)


def test_the_metric_chooses_the_baselines_c_and_defaults_stay_out_of_the_parameters() -> None:
    X, y = _imbalanced()
    Xv, yv = _imbalanced(seed=1, n=(30, 30, 30))
    by_top1 = sweep_logistic_C(X, y, Xv, yv)
    by_balanced = sweep_logistic_C(X, y, Xv, yv, balance="weights", metric="balanced_top1")
    head = by_balanced.heads[(by_balanced.C, 0.0)]
    assert head.val_metric == "balanced_top1" and head.history_[-1]["val_balanced_top1"] == by_balanced.val_top1
    assert by_top1.curve != by_balanced.curve
    assert fixed_params() == {} and fixed_params(balance="sampler", metric="macro_f1") == {
        "balance": "sampler", "val_metric": "macro_f1"}


# ---------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`dogbench run` on an imbalanced class-folder set (12 / 4 / 4 training images) with data.balance=weights and
    tune.metric=balanced_top1."""
    base = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    for k, (cls, n_train) in enumerate([("cat", 12), ("dog", 4), ("fox", 4)]):
        for i in range(n_train + 3):
            folder = base / "data" / ("train" if i < n_train else "test") / cls
            folder.mkdir(parents=True, exist_ok=True)
            class_image(k, rng=rng).save(folder / f"{cls}_{i}.png")
    out = base / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["run", "--data", str(base / "data"), "--out", str(out), "--cache-dir", str(base / "cache"),
                     *TINY, *FAST, "--set", "data.balance=weights", "--set", "tune.metric=balanced_top1"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_a_balanced_run_records_its_metric_and_balanced_scores(balanced_run: tuple[Path, dict], capsys) -> None:
    out, results = balanced_run
    m = results["models"]["cnn"]
    assert m["head"]["params"]["balance"] == "weights" and m["head"]["params"]["val_metric"] == "balanced_top1"
    assert set(m["test"]["per_class"]) == {"cat", "dog", "fox"}
    assert m["test"]["balanced_top1"] == pytest.approx(np.mean(list(m["test"]["per_class"].values())))
    assert "balanced_top1" in m["baseline"]["test"]
    tuning = json.loads((out / "cnn" / "tuning.json").read_text())
    assert tuning["tune"]["metric"] == "balanced_top1"
    assert json.loads((out / "cnn" / "head" / "head.json").read_text())["params"]["balance"] == "weights"
    assert results["config"]["tune"]["metric"] == "balanced_top1" and results["config"]["data"]["balance"] == "weights"
    summary = (out / "summary.txt").read_text()
    assert "bal. top1" in summary
    assert "chosen on validation balanced top1 (tune.metric" in summary and "balanced by weights" in summary
    from dogbench.report import load_runs
    from dogbench.report.why import caveats

    said = " ".join(caveats(load_runs([out])))  # the report and the demo say it under the verdict
    assert "chosen on validation balanced top1" in said and "paired tests still compare per-image correctness" in said
