"""`dogbench bench` on tiny random models and synthetic images: the figures are what the rounds measured."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

import pytest
import torch

from dogbench.bench.common import bench_images
from dogbench.bench.extract import DOGBENCH_COLUMNS, TIMM_COLUMNS, bench_backbone, matmul_gflops
from dogbench.cli import main
from dogbench.config import BackboneConfig, BenchConfig, ConfigError, FeatureConfig, Precision, RunConfig, resolve
from dogbench.data import Dataset, open_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = BackboneConfig(label="cnn", model="test_resnet", weights="random", input_size=32)


def _cfg(**bench_changes: object) -> RunConfig:
    return RunConfig(
        backbones=(TINY,),
        features=FeatureConfig(device="cpu", precision=Precision.FP32, batch_size=4, decoder="pil"),
        bench=dataclasses.replace(BenchConfig(images=6, repeats=2, model_batches=1, matmul_size=64), **bench_changes),
    )


@pytest.fixture
def dataset(class_folder_root: Path) -> Dataset:
    return open_dataset(class_folder_root)


def test_bench_row_is_the_median_of_its_rounds(dataset: Dataset) -> None:
    seen: list[dict[str, float]] = []
    row = bench_backbone(TINY, dataset, cfg=_cfg(), progress=False,
                         on_round=lambda _, got: seen.append(got))
    v, rounds = row.values, row.rounds
    assert len(seen) == 2 and all(len(r) == 2 for r in rounds.values())
    assert v["model"] == "test_resnet" and v["infer_img_size"] == 32 and v["infer_batch_size"] == 4
    assert v["images"] == 6 and v["workers"] == 0 and v["precision"] == "fp32"
    assert v["infer_samples_per_sec"] == round(statistics.median(rounds["model_samples_per_sec"]), 2)
    e2e_over_model = [e / m for e, m in zip(rounds["e2e_samples_per_sec"], rounds["model_samples_per_sec"],
                                            strict=True)]
    assert v["pipeline_efficiency"] == round(statistics.median(e2e_over_model), 3)
    achieved_over_peak = [m * v["gflop_per_image"] / p
                          for m, p in zip(rounds["model_samples_per_sec"], rounds["peak_gflops"], strict=True)]
    assert v["compute_efficiency"] == round(statistics.median(achieved_over_peak), 3)
    assert v["achieved_gflops"] == round(v["gflop_per_image"] * statistics.median(rounds["model_samples_per_sec"]), 1)
    # With PIL decoding the hand-written recipe computes the same features (same transform, same model).
    assert float(v["recipe_max_abs_diff"]) < 1e-4
    assert v["speedup_vs_recipe"] > 0 and v["decode_samples_per_sec"] > 0
    assert v["projected_s_per_1000"] == round(1000 / statistics.median(rounds["e2e_samples_per_sec"]), 1)


def test_bench_images_spread_over_the_dataset(dataset: Dataset) -> None:
    subset = bench_images(dataset, 5)
    assert len(subset.samples) == 5
    assert len({s.label for s in subset.samples}) > 1 and len({s.split for s in subset.samples}) == 2
    assert len(bench_images(dataset, 10_000).samples) == len(dataset.samples)


def test_matmul_peak_is_positive_and_finite() -> None:
    gflops = matmul_gflops(torch.device("cpu"), Precision.FP32, size=128, reps=3)
    assert 0 < gflops < 1e6


def test_compile_comparison_reports_its_columns(dataset: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)  # plumbing, not inductor
    row = bench_backbone(TINY, dataset, cfg=_cfg(compare_compile=True, recipe=False, repeats=1),
                         progress=False)
    assert len(compiled) == 1
    assert row.values["compiled_samples_per_sec"] > 0 and row.values["compile_s"] >= 0
    assert "speedup_vs_recipe" not in row.values


def test_cli_bench_writes_csv_with_timm_columns_first(class_folder_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main([
        "bench", "--data", str(class_folder_root), "--backbone", "cnn=test_resnet@random,input_size=32",
        "--backbone", "vit=test_vit@random,img_size=32", "--device", "cpu", "--images", "4", "--repeats", "1",
        "--batch-size", "2", "--set", "bench.model_batches=1", "--set", "bench.matmul_size=64", "--quiet",
        "--no-recipe", "--out", str(out),
    ])
    assert code == 0
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames[: len(TIMM_COLUMNS) + len(DOGBENCH_COLUMNS)]) == TIMM_COLUMNS + DOGBENCH_COLUMNS
    assert [r["label"] for r in rows] == ["cnn", "vit"]
    assert all(float(r["pipeline_efficiency"]) > 0 and float(r["compute_efficiency"]) > 0 for r in rows)
    assert all(r["infer_batch_size"] == "2" and r["images"] == "4" for r in rows)
    summary = (out / "summary.txt").read_text()
    assert "e2e/model" in summary and "vit (test_vit)" in summary
    assert (out / "config.json").is_file() and (out / "bench.json").is_file()


def test_bench_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="bench.images"):
        resolve({"bench": {"images": 0}})
    with pytest.raises(ConfigError, match="Unknown key 'repeat' in \\[bench\\]. Did you mean 'repeats'"):
        resolve({"bench": {"repeat": 3}})


def test_bench_train_times_the_step_end_to_end_and_the_recipe(class_folder_root: Path, tmp_path: Path) -> None:
    """`dogbench bench --train`: three rates per round, their medians and per-round ratios in train_bench.csv."""
    import json

    out = tmp_path / "tb"
    assert main(["bench", "--train", "--data", str(class_folder_root), "--backbone",
                 "cnn=test_resnet@random,input_size=32", "--set", "finetune.batch_size=2", "--set",
                 "bench.model_batches=2", "--repeats", "2", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "train_bench.csv").open()))
    doc = json.loads((out / "train_bench.json").read_text())
    assert len(rows) == 1 and rows[0]["label"] == "cnn" and rows[0]["batch_size"] == "2"
    rounds = doc["rounds"][0]
    assert {k: len(v) for k, v in rounds.items() if k != "e2e_fp32"} == {"step": 2, "e2e": 2, "recipe": 2}
    assert float(rows[0]["e2e_samples_per_sec"]) == pytest.approx(statistics.median(rounds["e2e"]), rel=1e-3)
    ratios = [a / b for a, b in zip(rounds["e2e"], rounds["step"], strict=True)]
    assert float(rows[0]["e2e_over_step"]) == pytest.approx(statistics.median(ratios), rel=1e-3)
    assert all(v > 0 for v in rounds["recipe"]) and float(rows[0]["e2e_over_recipe"]) > 0
    assert "e2e/recipe" in (out / "summary.txt").read_text()
