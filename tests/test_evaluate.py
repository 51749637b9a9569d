"""Metrics and statistics: known answers computed by hand, sklearn/scipy agreement, input validation."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from dogbench.evaluate import (
    ClassificationMetrics,
    PairedComparison,
    bootstrap_ci,
    classification_metrics,
    compare_paired,
    mcnemar_exact,
    paired_bootstrap_delta,
    topk_accuracy,
)

# 4 samples, 6 classes. Ranks of the true class: 0 (top-1), 2, 5 (last), 1.
Y = np.array([0, 1, 2, 3])
P = np.array(
    [
        [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
        [0.30, 0.20, 0.35, 0.05, 0.05, 0.05],
        [0.20, 0.20, 0.00, 0.20, 0.20, 0.20],  # argmax tie: predicted class 0
        [0.05, 0.25, 0.40, 0.30, 0.00, 0.00],
    ]
)


def test_topk_known_answers():
    assert topk_accuracy(Y, P, 1) == 0.25
    assert topk_accuracy(Y, P, 2) == 0.5
    assert topk_accuracy(Y, P, 3) == 0.75
    assert topk_accuracy(Y, P, 5) == 0.75
    assert topk_accuracy(Y, P, 6) == 1.0


def test_topk_ties_go_to_the_lower_class_index():
    proba = np.full((2, 4), 0.25)
    assert topk_accuracy(np.array([0, 3]), proba, 1) == 0.5  # class 0 wins the 4-way tie
    assert topk_accuracy(np.array([3, 3]), proba, 3) == 0.0  # class 3 is ranked last
    assert topk_accuracy(np.array([2, 1]), proba, 3) == 1.0


def test_topk_accepts_logits():
    logits = np.log(P + 1e-9) * 3 - 7
    assert topk_accuracy(Y, logits, 2) == topk_accuracy(Y, P, 2)


def test_classification_metrics_known_answers():
    m = classification_metrics(Y, P, class_names=["a", "b", "c", "d", "e", "f"])
    assert (m.top1, m.top5, m.n) == (0.25, 0.75, 4)
    y_pred = [0, 2, 0, 2]
    expected = np.zeros((6, 6), dtype=np.int64)
    for t, p in zip(Y, y_pred, strict=True):
        expected[t, p] += 1
    assert m.confusion.dtype == np.int64
    assert np.array_equal(m.confusion, expected)
    assert np.array_equal(m.confusion, confusion_matrix(Y, y_pred, labels=range(6)))
    assert m.per_class == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}  # e and f have no samples
    # classes present: a (F1 = 2/3), b, c, d (0 each) -> macro 1/6
    assert m.macro_f1 == pytest.approx(1 / 6)
    assert m.macro_f1 == pytest.approx(f1_score(Y, y_pred, average="macro"))


def test_classification_metrics_match_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, 500)
    proba = rng.dirichlet(np.ones(12), size=500)
    proba[np.arange(250), y[:250]] += 0.5  # half the samples are right
    m = classification_metrics(y, proba)
    y_pred = proba.argmax(axis=1)
    assert m.top1 == pytest.approx(np.mean(y_pred == y))
    assert m.macro_f1 == pytest.approx(f1_score(y, y_pred, average="macro"))
    assert np.array_equal(m.confusion, confusion_matrix(y, y_pred, labels=range(12)))
    assert list(m.per_class) == [str(i) for i in range(12)]
    assert m.per_class["3"] == pytest.approx(np.mean(y_pred[y == 3] == 3))


def test_top5_with_fewer_than_five_classes_is_top_c():
    proba = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    assert classification_metrics(np.array([2, 0]), proba).top5 == 1.0


def test_metrics_to_dict_is_json_able():
    d = classification_metrics(Y, P).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["confusion"][1][2] == 1


@pytest.mark.parametrize(
    ("y", "proba", "message"),
    [
        (Y[:3], P, "3 labels but proba has 4 rows"),
        (Y, P[0], "2-D"),
        (np.array([0, 1, 2, 6]), P, r"\[0, 6\)"),
        (np.array([0, -1, 2, 3]), P, r"\[0, 6\)"),
        (Y.astype(float), P, "integer"),
        (Y, np.where(P == 0.5, np.nan, P), "NaN"),
        (Y[:0], P[:0], "empty"),
    ],
)
def test_score_validation(y, proba, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, proba)


def test_topk_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        topk_accuracy(Y, P, 7)
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(Y, P, 0)


def test_class_names_validation():
    with pytest.raises(ValueError, match="2 class_names for 6 classes"):
        classification_metrics(Y, P, class_names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        classification_metrics(Y, P, class_names=["a"] * 6)


def test_mcnemar_known_answer():
    # b = 10 (a right, b wrong), c = 2: p = 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 5, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 5, dtype=bool)
    expected = 2 * sum(comb(12, i) for i in range(3)) / 2**12
    assert expected == pytest.approx(0.03857, abs=1e-5)
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)


def test_mcnemar_without_discordant_pairs_is_one():
    a = np.array([True, False, True])
    assert mcnemar_exact(a, a) == 1.0
    assert mcnemar_exact(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 1.0  # b = c = 1


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(100) < 0.7
    large = rng.random(10_000) < 0.7
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x narrower
    # Close to the normal approximation: half-width 1.96 * sqrt(p(1-p)/n).
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * np.sqrt(0.7 * 0.3 / 10_000), rel=0.1)


def test_bootstrap_ci_is_seeded():
    correct = np.random.default_rng(1).random(300) < 0.5
    assert bootstrap_ci(correct, seed=3) == bootstrap_ci(correct, seed=3)
    assert bootstrap_ci(correct, seed=3) != bootstrap_ci(correct, seed=4)


def test_bootstrap_ci_blocks_do_not_change_the_answer(monkeypatch: pytest.MonkeyPatch):
    import dogbench.evaluate as ev

    correct = np.random.default_rng(2).random(500) < 0.6
    one_block = bootstrap_ci(correct, n_resamples=300)
    monkeypatch.setattr(ev, "_BOOTSTRAP_BLOCK_ELEMENTS", 500 * 7)  # 7 resamples per block
    assert bootstrap_ci(correct, n_resamples=300) == one_block


def test_bootstrap_confidence_widens_the_interval():
    correct = np.random.default_rng(0).random(1000) < 0.5
    lo90, hi90 = bootstrap_ci(correct, confidence=0.90)
    lo99, hi99 = bootstrap_ci(correct, confidence=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_paired_bootstrap_identical_vectors():
    a = np.random.default_rng(0).random(200) < 0.5
    assert paired_bootstrap_delta(a, a) == (0.0, (0.0, 0.0))


def test_paired_bootstrap_delta_detects_a_real_difference():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.6
    a = b | (rng.random(2000) < 0.2)  # a is right wherever b is, and more
    delta, (lo, hi) = paired_bootstrap_delta(a, b)
    assert delta == pytest.approx(a.mean() - b.mean())
    assert 0 < lo <= delta <= hi


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_ci(np.array([], dtype=bool)), "non-empty"),
        (lambda: bootstrap_ci(np.array([0, 2, 1])), "boolean"),
        (lambda: bootstrap_ci(np.ones((2, 2), dtype=bool)), "1-D"),
        (lambda: bootstrap_ci(np.ones(3, dtype=bool), confidence=1.0), "confidence"),
        (lambda: bootstrap_ci(np.ones(3, dtype=bool), n_resamples=0), "n_resamples"),
        (lambda: paired_bootstrap_delta(np.ones(3, bool), np.ones(4, bool)), "same length, got 3 and 4"),
        (lambda: mcnemar_exact(np.ones(3, bool), np.ones(4, bool)), "same length"),
        (lambda: compare_paired("a", np.ones(3, bool), "b", np.ones(2, bool)), "same length"),
    ],
)
def test_statistics_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_compare_paired():
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    c = compare_paired("vit", a, "resnet", b, n_resamples=500, seed=1)
    assert isinstance(c, PairedComparison)
    assert (c.a, c.b, c.n) == ("vit", "resnet", 50)
    assert (c.top1_a, c.top1_b) == (40 / 50, 32 / 50)
    assert c.delta_top1 == pytest.approx(8 / 50)
    assert (c.a_only_correct, c.b_only_correct) == (10, 2)
    assert c.mcnemar_p == pytest.approx(mcnemar_exact(a, b))
    assert c.delta_top1_ci95 == paired_bootstrap_delta(a, b, n_resamples=500, seed=1)[1]
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["delta_top1_ci95"] == list(c.delta_top1_ci95)


def test_metrics_dataclasses_are_frozen():
    m = classification_metrics(Y, P)
    assert isinstance(m, ClassificationMetrics)
    with pytest.raises(AttributeError):
        m.top1 = 1.0  # type: ignore[misc]


def test_import_does_not_pull_in_torch():
    code = "import sys, dogbench.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- calibration: known answers


def _predictor(confidence: np.ndarray, correct: np.ndarray, n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities whose top class has ``confidence`` and is right where ``correct``; the rest of
    the mass is spread evenly over the other classes."""
    n = len(confidence)
    y_pred = np.zeros(n, dtype=np.int64)
    proba = np.repeat(((1 - confidence) / (n_classes - 1))[:, None], n_classes, axis=1)
    proba[:, 0] = confidence
    y_true = np.where(correct, y_pred, 1)
    return y_true, proba


def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero() -> None:
    from dogbench.evaluate import expected_calibration_error

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, size=200_000)
    y_true, proba = _predictor(confidence, rng.uniform(size=confidence.shape) < confidence)
    assert expected_calibration_error(y_true, proba) < 0.005


def test_ece_of_an_overconfident_predictor_is_the_analytic_gap() -> None:
    from dogbench.evaluate import brier_score, expected_calibration_error, negative_log_likelihood, reliability_bins

    # always 90% sure, right 6 times in 10: one bin, |0.6 - 0.9| = 0.3
    y_true, proba = _predictor(np.full(10, 0.9), np.arange(10) < 6)
    assert expected_calibration_error(y_true, proba) == pytest.approx(0.3, abs=1e-12)
    # two bins: 0.95 sure and always right (gap 0.05), 0.55 sure and right half the time (gap 0.05)
    y2, p2 = _predictor(np.r_[np.full(4, 0.95), np.full(4, 0.55)], np.array([1, 1, 1, 1, 1, 0, 1, 0], bool))
    assert expected_calibration_error(y2, p2) == pytest.approx(0.05, abs=1e-12)
    bins = reliability_bins(y2, p2)
    assert bins.count.sum() == 8 and bins.count[14] == 4 and bins.count[8] == 4  # (14/15, 1] and (8/15, 9/15]
    assert bins.accuracy[14] == 1.0 and bins.accuracy[8] == 0.5
    # NLL and Brier by hand: right rows -log 0.9, wrong rows -log(0.1 / 3)
    assert negative_log_likelihood(y_true, proba) == pytest.approx(-(6 * np.log(0.9) + 4 * np.log(0.1 / 3)) / 10)
    right = (0.9 - 1) ** 2 + 3 * (0.1 / 3) ** 2
    wrong = 0.9**2 + (0.1 / 3 - 1) ** 2 + 2 * (0.1 / 3) ** 2
    assert brier_score(y_true, proba) == pytest.approx((6 * right + 4 * wrong) / 10)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    from dogbench.evaluate import apply_temperature, expected_calibration_error, fit_temperature

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(20_000, 10))
    true_t = 2.5
    p_true = np.exp(logits / true_t)
    p_true /= p_true.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(10, p=row) for row in p_true])
    overconfident = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # softmax(z): T = 1 is too sharp
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(true_t, rel=0.03)
    scaled = apply_temperature(overconfident, t)
    np.testing.assert_allclose(scaled, p_true, atol=0.02)
    assert (scaled.argmax(axis=1) == overconfident.argmax(axis=1)).all()
    assert expected_calibration_error(y, scaled) < 0.3 * expected_calibration_error(y, overconfident)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(overconfident, 0.0)
    # a class the head never predicts stays impossible at any temperature
    assert apply_temperature(np.array([[0.5, 0.5, 0.0]]), 20.0)[0, 2] == 0.0
