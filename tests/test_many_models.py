"""Verdicts for three or more models: Holm's correction by hand, the sentences that name the best model by
validation and which of its test differences survive, and the report that shows them."""

from __future__ import annotations

import pytest

from dogbench.evaluate import holm
from dogbench.results import verdict_of_many, verdicts_many


def test_holm_adjusts_step_down_monotone_and_capped() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


def _pair(b: str, delta: float, p_holm: float) -> dict:
    return {"a": "lite2", "b": b, "delta_top1": delta, "delta_top1_ci95": [delta - 0.01, delta + 0.01],
            "mcnemar_p": p_holm / 2, "p_holm": p_holm, "survives": p_holm < 0.05, "n": 400}


def test_the_verdict_of_many_names_the_best_and_what_survives() -> None:
    best = {"best": "lite2", "chosen_by": "validation top1", "correction": "holm", "alpha": 0.05,
            "comparisons": [_pair("lite1", 0.02, 0.08), _pair("lite0", 0.04, 0.001), _pair("mnv2", 0.06, 1e-6)]}
    lines = verdicts_many(best)
    assert lines[0].startswith("lite2 is the best of 4 models on validation top1; on test, paired against each "
                               "other model (exact McNemar, Holm-corrected over 3 comparisons)")
    assert lines[1] == "  vs lite1: +2.00 points [+1.00, +3.00], Holm p = 0.08: not significant at 5%"
    assert lines[2].endswith("Holm p = 0.001: significant")
    assert lines[-1] == ("lite2 is significantly better than lite0, mnv2; it cannot be told apart from lite1 on "
                         "these test images.")


def test_a_best_by_validation_that_loses_on_test_is_said_to_lose() -> None:
    best = {"best": "lite2", "chosen_by": "validation top1", "correction": "holm", "alpha": 0.05,
            "comparisons": [_pair("lite1", -0.06, 0.001), _pair("lite0", 0.01, 0.4)]}
    assert verdicts_many(best)[-1] == ("lite2 is significantly better than none of them; significantly worse on "
                                       "test than lite1, although chosen by validation; it cannot be told apart "
                                       "from lite0 on these test images.")

    assert verdict_of_many(best).startswith("lite2 is the best of 3 models on validation top1; on test, paired "
                                            "against each other model (exact McNemar, Holm-corrected over 2 "
                                            "comparisons): vs lite1: -6.00 points")
    assert "; vs lite0: +1.00 points" in verdict_of_many(best)
