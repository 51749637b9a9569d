"""Heads: scikit-learn's estimator checks, accuracy against references, early stopping, seeding, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from dogbench import config
from dogbench.heads import (
    HEAD_KINDS,
    META_FILE,
    TENSORS_FILE,
    FeatureData,
    HeadKind,
    LinearHead,
    LogisticHead,
    MLPHead,
    load_head,
    make_head,
)
from dogbench.heads.fit import FastDropout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@parametrize_with_checks([LogisticHead(), LinearHead(), MLPHead(hidden_size=64)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _blobs(*, n: int = 600, d: int = 16, n_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_classification(
        n_samples=n,
        n_features=d,
        n_informative=d // 2,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=seed,
    )
    return X.astype(np.float32), y


def _small_heads() -> list[LogisticHead | LinearHead | MLPHead]:
    return [LogisticHead(C=100.0, tol=1e-6), LinearHead(max_epochs=20), MLPHead(hidden_size=32, max_epochs=20)]


def test_linear_head_matches_logistic_regression():
    X, y = make_classification(
        n_samples=4000,
        n_features=64,
        n_informative=32,
        n_redundant=8,
        n_classes=20,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=0,
    )
    X = X.astype(np.float32)
    train, val, test = slice(0, 2400), slice(2400, 3000), slice(3000, None)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[train], y[train])
    head = LinearHead().fit(X[train], y[train], eval_set=(X[val], y[val]))
    ref_acc = reference.score(X[test], y[test])
    head_acc = float(np.mean(head.predict(X[test]) == y[test]))
    assert ref_acc > 0.5  # the problem is learnable but not trivial
    assert head_acc >= ref_acc - 0.02, (head_acc, ref_acc)


def _probe_problem() -> tuple[np.ndarray, ...]:
    X, y = make_classification(n_samples=3000, n_features=48, n_informative=24, n_redundant=8, n_classes=12,
                               n_clusters_per_class=2, class_sep=1.0, random_state=3)
    X = (X * np.linspace(0.1, 10.0, 48) + 5.0).astype(np.float32)  # unequal scales and offsets: standardise
    return X[:2000], y[:2000], X[2000:], y[2000:]


@pytest.mark.parametrize("C", [1e-3, 1e-1, 10.0])
def test_logistic_head_solves_scikit_learns_objective(C):
    # Same model, same objective (mean cross-entropy + ||W||^2 / 2Cn, bias free): the same predictions and
    # nearly the same probabilities as scikit-learn's LogisticRegression fitted to tight tolerance.
    X, y, X_test, _ = _probe_problem()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-8)).fit(X, y)
    head = LogisticHead(C=C, tol=1e-5).fit(X, y)
    assert 1 <= head.n_iter_ < 1000
    assert np.mean(head.predict(X_test) == reference.predict(X_test)) >= 0.995
    assert np.abs(head.predict_proba(X_test) - reference.predict_proba(X_test)).max() < 0.02


def test_logistic_head_is_deterministic_and_seed_free():
    X, y, X_test, _ = _probe_problem()
    a = LogisticHead(C=0.1, seed=0).fit(X, y).predict_proba(X_test)
    b = LogisticHead(C=0.1, seed=7).fit(X, y).predict_proba(X_test)
    assert np.array_equal(a, b)


def test_logistic_warm_start_from_its_own_solution_takes_no_step():
    X, y, X_val, y_val = _probe_problem()
    data = FeatureData.from_arrays(X, y, eval_set=(X_val, y_val))
    cold = LogisticHead(C=0.1).fit_prepared(data)
    again = LogisticHead(C=0.1).fit_prepared(data, init=cold.module_.state_dict())
    assert again.n_iter_ == 0 and again.best_val_top1_ == cold.best_val_top1_
    assert np.array_equal(again.predict_proba(X_val), cold.predict_proba(X_val))
    # from a nearby C's solution it converges in fewer iterations than from zero, to the same model
    near = LogisticHead(C=0.15).fit_prepared(data, init=cold.module_.state_dict())
    far = LogisticHead(C=0.15).fit_prepared(data)
    assert near.n_iter_ < far.n_iter_
    assert np.mean(near.predict(X_val) == far.predict(X_val)) >= 0.995


def test_logistic_head_reports_its_solve_once_and_stops_at_max_iter():
    X, y, X_val, y_val = _probe_problem()
    seen: list[tuple[int, float]] = []
    head = LogisticHead(C=10.0, max_iter=5, tol=1e-9).fit(X, y, eval_set=(X_val, y_val),
                                                           on_epoch=lambda e, v: seen.append((e, v)))
    assert head.n_iter_ == 5 and head.n_epochs_ == 1 and [e for e, _ in seen] == [1]
    assert [h["iterations"] for h in head.history_] == [5]
    assert head.best_val_top1_ == seen[0][1] == pytest.approx(np.mean(head.predict(X_val) == y_val))

    def stop(epoch: int, value: float) -> None:
        raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        LogisticHead().fit(X, y, eval_set=(X_val, y_val), on_epoch=stop)


def test_logistic_head_records_its_final_loss_and_warns_when_it_stops_short():
    X, y, X_val, y_val = _probe_problem()
    head = LogisticHead(C=1.0).fit(X, y)
    record = head.history_[0]
    assert record["converged"] and record["train_loss"] < np.log(12)  # the solved loss, not the start's ln(12)
    with pytest.warns(ConvergenceWarning, match="stopped after 3 iterations"):
        short = LogisticHead(C=1.0, max_iter=3).fit(X, y)
    assert not short.history_[0]["converged"] and short.history_[0]["train_loss"] > record["train_loss"]


def test_epoch_heads_train_in_either_precision_and_record_it():
    X, y, X_val, y_val = _probe_problem()
    heads = {p: MLPHead(hidden_size=64, max_epochs=15, precision=p).fit(X, y, eval_set=(X_val, y_val))
             for p in ("fp32", "bf16")}
    for precision, head in heads.items():
        assert {h["precision"] for h in head.history_} == {precision}
        assert head.predict_proba(X_val).dtype == np.float64  # inference stays float64
    assert heads["fp32"].best_val_top1_ > 3 / 12  # three times chance
    assert abs(heads["bf16"].best_val_top1_ - heads["fp32"].best_val_top1_) <= 0.03


def test_auto_precision_follows_the_device():
    from dogbench.device import train_precision

    head = LinearHead(max_epochs=2).fit(*_blobs())
    expected = train_precision(torch.device("cpu")).value
    assert {h["precision"] for h in head.history_} == {expected}


def test_precision_takes_the_config_enum_or_its_strings():
    X, y = _blobs()
    by_enum = LinearHead(max_epochs=3, precision=config.Precision.BF16).fit(X, y)
    by_string = LinearHead(max_epochs=3, precision="bf16").fit(X, y)
    assert by_enum.precision is config.Precision.BF16  # stored as given (scikit-learn's contract)
    assert np.array_equal(by_enum.predict_proba(X), by_string.predict_proba(X))
    assert {h["precision"] for h in by_enum.history_} == {"bf16"}
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got <Precision.FP16"):
        LinearHead(precision=config.Precision.FP16).fit(X, y)


def test_mlp_learns_xor_that_a_linear_head_cannot():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(2000, 2)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    train, test = slice(0, 1500), slice(1500, None)
    linear = LinearHead(lr=1e-2, max_epochs=30).fit(X[train], y[train])
    mlp = MLPHead(hidden_size=64, dropout=0.0, lr=1e-2, max_epochs=30).fit(X[train], y[train])
    assert np.mean(linear.predict(X[test]) == y[test]) < 0.7
    assert np.mean(mlp.predict(X[test]) == y[test]) > 0.95


def test_early_stopping_stops_and_restores_best_epoch():
    # Few noisy samples, many features, a wide MLP: validation accuracy peaks early, then overfitting sets in.
    X, y = _blobs(n=400, d=64, n_classes=4)
    y = np.where(np.random.default_rng(0).random(len(y)) < 0.3, np.roll(y, 1), y)  # 30% label noise
    X_val, y_val = X[200:], y[200:]
    head = MLPHead(hidden_size=256, dropout=0.0, lr=3e-3, max_epochs=200, patience=5)
    head.fit(X[:200], y[:200], eval_set=(X_val, y_val))
    val_top1 = [h["val_top1"] for h in head.history_]
    assert head.n_epochs_ < 200
    assert head.best_epoch_ < head.n_epochs_
    assert head.n_epochs_ - head.best_epoch_ == 5
    assert len(head.history_) == head.n_epochs_
    assert head.best_val_top1_ == max(val_top1) == val_top1[head.best_epoch_ - 1]
    assert all(v < head.best_val_top1_ for v in val_top1[head.best_epoch_ :])
    # The restored weights are the best epoch's, not the last one's.
    assert np.mean(head.predict(X_val) == y_val) == pytest.approx(head.best_val_top1_, abs=1 / len(y_val))


@pytest.mark.parametrize("head", _small_heads()[1:], ids=HEAD_KINDS[1:])
def test_on_epoch_sees_each_epoch_and_its_exception_propagates(head):
    class Stop(Exception):
        pass

    X, y = _blobs()
    seen: list[tuple[int, float]] = []

    def on_epoch(epoch: int, val_top1: float) -> None:
        seen.append((epoch, val_top1))
        if epoch == 3:
            raise Stop("pruned")

    with pytest.raises(Stop, match="pruned"):
        head.fit(X[:400], y[:400], eval_set=(X[400:], y[400:]), on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for _, v in seen)


def test_on_epoch_values_match_history():
    X, y = _blobs()
    seen: list[tuple[int, float]] = []
    head = LinearHead(max_epochs=8).fit(
        X[:400], y[:400], eval_set=(X[400:], y[400:]), on_epoch=lambda e, v: seen.append((e, v))
    )
    assert seen == [(h["epoch"], h["val_top1"]) for h in head.history_]


@pytest.mark.parametrize("head", _small_heads()[1:], ids=HEAD_KINDS[1:])
def test_seed_determines_predictions(head):
    X, y = _blobs()
    a = head.set_params(seed=1).fit(X, y).predict_proba(X)
    b = head.set_params(seed=1).fit(X, y).predict_proba(X)
    c = head.set_params(seed=2).fit(X, y).predict_proba(X)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_leaves_global_torch_rng_alone():
    X, y = _blobs()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    MLPHead(hidden_size=32, max_epochs=3).fit(X, y)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("head", _small_heads(), ids=HEAD_KINDS)
def test_fit_prepared_equals_fit(head):
    X, y = _blobs()
    eval_set = (X[400:], y[400:])
    data = FeatureData.from_arrays(X[:400], y[:400], eval_set=eval_set)
    seen: list[tuple[int, float]] = []
    fitted = clone(head).fit(X[:400], y[:400], eval_set=eval_set)
    prepared = clone(head).fit_prepared(data, on_epoch=lambda e, v: seen.append((e, v)))
    assert np.array_equal(prepared.predict_proba(X), fitted.predict_proba(X))
    assert prepared.history_ == fitted.history_ and prepared.best_epoch_ == fitted.best_epoch_
    assert seen == [(h["epoch"], h["val_top1"]) for h in fitted.history_]
    assert prepared.n_features_in_ == X.shape[1]
    assert np.array_equal(prepared.mean_, fitted.mean_) and np.array_equal(prepared.classes_, fitted.classes_)
    # The data is shared, not consumed: a second head trains on the same tensors to the same result.
    again = clone(head).fit_prepared(data)
    assert np.array_equal(again.predict_proba(X), prepared.predict_proba(X))


def test_fit_prepared_checks_standardisation_and_data():
    X, y = _blobs()
    raw = FeatureData.from_arrays(X, y, standardize=False)
    assert np.array_equal(raw.X.numpy(), X) and not raw.mean.any() and (raw.scale == 1).all()
    with pytest.raises(ValueError, match="standardize=False, this head has True"):
        LinearHead(max_epochs=2).fit_prepared(raw)
    assert LinearHead(max_epochs=2, standardize=False).fit_prepared(raw).n_epochs_ == 2
    with pytest.raises(ValueError, match="eval_set has 8 features, X has 16"):
        FeatureData.from_arrays(X, y, eval_set=(X[:10, :8], y[:10]))
    with pytest.raises(ValueError, match="not seen in training"):
        FeatureData.from_arrays(X, y, eval_set=(X[:10], np.full(10, 99)))
    with pytest.raises(ValueError, match="Unknown label type"):
        FeatureData.from_arrays(X, X[:, 0])


def test_refit_for_fixed_epochs_via_set_params_without_eval_set():
    X, y = _blobs()
    tuned = LinearHead(max_epochs=50)
    head = clone(tuned).set_params(max_epochs=7).fit(X, y)
    assert head.n_epochs_ == head.best_epoch_ == 7
    assert head.best_val_top1_ is None
    assert [h["epoch"] for h in head.history_] == list(range(1, 8))
    assert all(set(h) == {"epoch", "train_loss", "precision"} for h in head.history_)
    assert head.history_[-1]["train_loss"] < head.history_[0]["train_loss"]
    assert tuned.max_epochs == 50


def test_fit_takes_no_hyper_parameters():
    X, y = _blobs()
    with pytest.raises(TypeError, match="max_epochs"):
        LinearHead(max_epochs=50).fit(X, y, max_epochs=7)


def test_proba_shape_and_string_labels():
    X, y = _blobs(n_classes=3)
    names = np.array(["collie", "beagle", "pug"])[y]
    head = LinearHead(max_epochs=30).fit(X, names)
    proba = head.predict_proba(X)
    assert head.classes_.tolist() == ["beagle", "collie", "pug"]
    assert proba.shape == (len(X), 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.array_equal(head.predict(X), head.classes_[proba.argmax(axis=1)])
    assert np.mean(head.predict(X) == names) > 0.8


def test_float16_and_memmap_features(tmp_path: Path):
    X, y = _blobs()
    X16 = X.astype(np.float16)
    np.save(tmp_path / "x.npy", X16)
    X_mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = LinearHead(max_epochs=5).fit(X16.astype(np.float32), y).predict_proba(X16.astype(np.float32))
    assert np.array_equal(LinearHead(max_epochs=5).fit(X16, y).predict_proba(X16), expected)
    assert np.array_equal(LinearHead(max_epochs=5).fit(X_mm, y).predict_proba(X_mm), expected)


def test_eval_set_with_unseen_label_is_rejected():
    X, y = _blobs()
    with pytest.raises(ValueError, match="not seen in training"):
        LinearHead(max_epochs=2).fit(X, y, eval_set=(X[:10], np.full(10, 99)))


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (LinearHead(lr=0), "lr must be > 0"),
        (MLPHead(precision="fp8"), "precision must be one of auto, fp32, bf16"),
        (LogisticHead(C=0), "C must be > 0"),
        (LogisticHead(tol=0), "tol must be > 0"),
        (LinearHead(label_smoothing=1.0), "label_smoothing"),
        (LinearHead().set_params(max_epochs=0), "max_epochs must be >= 1, got 0"),
        (MLPHead(n_layers=0, dropout=1.0), "n_layers.*dropout"),
        (MLPHead(activation="gleu"), "Did you mean 'gelu'.*Known: gelu, relu"),
    ],
)
def test_invalid_params_fail_at_fit(head, message):
    X, y = _blobs()
    with pytest.raises(ValueError, match=message):
        head.fit(X, y)


@pytest.mark.parametrize(
    ("head", "labels"),
    [(LinearHead(max_epochs=5), np.arange(5) * 10), (MLPHead(hidden_size=32, n_layers=2, max_epochs=5), None)],
    ids=["linear-int-labels", "mlp-str-labels"],
)
def test_save_load_round_trip(tmp_path: Path, head, labels):
    X, y = _blobs()
    y = labels[y] if labels is not None else np.array(["a", "b", "c", "d", "e"])[y]
    head.fit(X[:400], y[:400], eval_set=(X[400:], y[400:]))
    head.save(tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    assert type(loaded) is type(head)
    assert loaded.get_params() == head.get_params()
    assert np.array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert np.array_equal(loaded.predict(X), head.predict(X))
    assert (loaded.best_epoch_, loaded.best_val_top1_, loaded.history_) == (
        head.best_epoch_,
        head.best_val_top1_,
        head.history_,
    )
    meta = json.loads((tmp_path / "head" / META_FILE).read_text())
    assert meta["kind"] == head._kind.value
    assert meta["classes"] == head.classes_.tolist()
    assert type(loaded).load(tmp_path / "head").n_features_in_ == X.shape[1]


def test_load_checks_class_and_integrity(tmp_path: Path):
    X, y = _blobs()
    MLPHead(hidden_size=16, max_epochs=2).fit(X, y).save(tmp_path)
    with pytest.raises(TypeError, match="holds a MLPHead, not a LinearHead"):
        LinearHead.load(tmp_path)
    LinearHead(max_epochs=2).fit(X, y).save(tmp_path / "other")
    (tmp_path / TENSORS_FILE).write_bytes((tmp_path / "other" / TENSORS_FILE).read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        load_head(tmp_path)


def test_make_head():
    head = make_head("mlp", hidden_size=8, dropout=0.1)
    assert isinstance(head, MLPHead) and head.hidden_size == 8 and head.dropout == 0.1
    assert isinstance(make_head(HeadKind.LINEAR), LinearHead)
    assert isinstance(make_head("logistic", C=0.5), LogisticHead)
    assert HEAD_KINDS == ("logistic", "linear", "mlp")
    assert HeadKind is config.HeadKind and HEAD_KINDS is config.HEAD_KINDS  # re-exported, not redefined
    with pytest.raises(ValueError,
                       match=r"Unknown head kind 'lineaer'\. Did you mean 'linear'\? Known: logistic, linear, mlp"):
        make_head("lineaer")
    with pytest.raises(ValueError, match="Known: logistic, linear, mlp"):
        make_head("svm")


def test_dropout_keeps_the_expected_fraction_and_mean():
    torch.manual_seed(0)
    x = torch.ones(64, 4096)
    for p in (0.1, 0.5, 0.7):
        out = FastDropout(p).train()(x)
        assert (out == 0).float().mean().item() == pytest.approx(p, abs=0.01)
        assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    dropout = FastDropout(0.5).eval()
    assert dropout(x) is x
