"""Result records: the verdict sentence, the CSV rows and the summary table, stage timing."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from dogbench.names import model_name
from dogbench.results import DatasetInfo, ModelResult, RunResults, StageTimes, verdict
from dogbench.rundir import RunDir


def _comparison(delta: float, lo: float, hi: float, p: float) -> dict:
    return {"a": "vit", "b": "resnet", "delta_top1": delta, "delta_top1_ci95": [lo, hi], "mcnemar_p": p, "n": 8580}


def test_verdict_names_the_winner_and_whether_it_is_significant() -> None:
    assert verdict(_comparison(0.1006, 0.09, 0.11, 1e-40)).startswith("vit beats resnet by 10.06 points")
    assert "significantly: paired" in verdict(_comparison(0.1006, 0.09, 0.11, 1e-40))
    loser = verdict(_comparison(-0.02, -0.03, -0.01, 0.001))
    assert loser.startswith("resnet beats vit by 2.00 points") and "significantly" in loser
    unsure = verdict(_comparison(0.004, -0.002, 0.01, 0.3))
    assert "not significantly" in unsure and "p = 0.3" in unsure
    assert "same test top-1" in verdict(_comparison(0.0, -0.01, 0.01, 1.0))


def test_a_named_verdict_says_what_was_compared_and_keeps_the_labels() -> None:
    """Issue 27: the models by name, the interval of the winner minus the loser, tiny p-values as a bound."""
    names = {"vit": model_name({"label": "vit", "backbone": "vit_small_patch16_224.augreg_in21k_ft_in1k"}),
             "resnet": model_name({"label": "resnet", "backbone": "resnet50", "weights": "random"})}
    said = verdict(_comparison(-0.02, -0.03, -0.01, 1e-300), names)
    assert said.startswith("ResNet-50 with random weights (resnet) beats ViT-S/16 pretrained on ImageNet-21k, "
                           "ImageNet-1k (vit) by 2.00 points")
    assert "CI of resnet - vit [+1.00, +3.00] points" in said and "p < 1e-100" in said


def _model(label: str, top1: float, *, cached: bool) -> ModelResult:
    return ModelResult(
        label=label, backbone=f"{label}_tag", weights="random", weights_sha256="0" * 64, feature_dim=8,
        params=2_000_000,
        gflops=1.5, preprocess={}, feature_key="k", cache_hit=cached, device="cpu", precision="fp32",
        head={"kind": "linear", "params": {}, "epochs": 3}, val={"top1": top1},
        test={"top1": top1, "top1_ci95": [top1 - 0.01, top1 + 0.01], "top5": 0.99, "macro_f1": top1 - 0.02,
              "per_class": {"a": top1}, "n": 100},
        baseline={"C": 1.0, "val": {"top1": top1 - 0.01},
                  "test": {"top1": top1 - 0.005, "top1_ci95": [0.7, 0.9], "top5": 0.98, "macro_f1": 0.8, "n": 100}},
        timing_s={"extract": 12.0, "tune": 3.0, "fit": 1.0, "baseline": 2.0}, cpu_s={},
        throughput_img_s=None if cached else 42.0,
    )


@pytest.fixture
def results() -> RunResults:
    return RunResults(
        models={"vit": _model("vit", 0.85, cached=False), "resnet": _model("resnet", 0.75, cached=True)},
        comparison=_comparison(0.10, 0.08, 0.12, 1e-9),
        comparisons=[_comparison(0.10, 0.08, 0.12, 1e-9)],
        dataset=DatasetInfo(name="dogs", root="/d", layout="stanford-dogs", split_source="official-lists",
                            n_train=80, n_val=20, n_test=100, n_classes=4, skipped=1,
                            skipped_files=[{"id": "a/b.jpg", "reason": "bad"}]),
        environment={}, config={}, timing_s={"total": 99.0},
    )


def test_csv_has_a_tuned_and_a_baseline_row_per_model(results: RunResults) -> None:
    rows = list(csv.DictReader(io.StringIO(results.to_csv())))
    assert [(r["label"], r["method"]) for r in rows] == [
        ("vit", "tuned linear head"), ("vit", "logistic regression (C swept)"),
        ("resnet", "tuned linear head"), ("resnet", "logistic regression (C swept)"),
    ]
    assert float(rows[1]["test_top1"]) == pytest.approx(0.845)
    assert rows[2]["throughput_img_s"] == ""


def test_summary_table_holds_every_row_and_the_verdict(results: RunResults) -> None:
    table = results.summary_table()
    assert "dogs (80 train / 20 val / 100 test, 4 classes, 1 skipped)" in table
    assert "0.8500 [0.8400, 0.8600]" in table and "cached" in table and "42.0" in table
    assert "vit_tag with random weights (vit) beats resnet_tag with random weights (resnet) by 10.00 points" in table
    assert "skipped a/b.jpg: bad" in table
    lines = table.splitlines()
    assert len({len(line.rstrip()) <= len(lines[1]) + 1 for line in lines[1:7]}) == 1


def test_write_produces_json_csv_and_summary(results: RunResults, tmp_path: Path) -> None:
    RunDir(tmp_path).write_results(results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["vit"]["test"]["top1"] == 0.85
    assert saved["dataset"]["skipped_files"] == [{"id": "a/b.jpg", "reason": "bad"}]
    assert (tmp_path / "summary.txt").read_text().strip() == results.summary_table()
    assert (tmp_path / "results.csv").read_text() == results.to_csv()


def test_stage_times_accumulate_wall_and_cpu() -> None:
    times = StageTimes()
    with times.measure("tune"):
        time.sleep(0.05)
    with times.measure("tune"):
        sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU: os.times counts in 10 ms ticks
    assert times.wall["tune"] >= 0.05
    assert times.cpu["tune"] > 0.0
    assert set(times.wall) == set(times.cpu) == {"tune"}
