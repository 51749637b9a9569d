"""Integration: the whole `dogbench run` on a few real breeds of ../shared/data/stanford-dogs-dev with the real
weights in ../shared/weights. Skipped when ../shared is absent; CI has it. Whole-dataset runs are benchmarks
(configs/shared-dev.toml, docs/results/frozen-features.md), not tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import BREEDS, HAVE_SHARED_RUN, ORIGINALS, VIT_SIZE, official_slice
from dogbench.cli import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not HAVE_SHARED_RUN, reason="../shared is absent"),
]


@pytest.fixture(scope="module")
def real_run(real_run_dir: Path) -> dict:
    return json.loads((real_run_dir / "results.json").read_text())


def test_real_features_separate_real_breeds(real_run: dict) -> None:
    cnn = real_run["models"]["cnn"]
    d = real_run["dataset"]
    assert (d["n_train"] + d["n_val"], d["n_test"], d["n_classes"]) == (40 * len(BREEDS), 20 * len(BREEDS),
                                                                        len(BREEDS))
    assert cnn["feature_dim"] == 1280 and cnn["weights_sha256"].startswith("2d3c8842")
    # ImageNet EfficientNet-Lite0 features separate six distinct breeds easily; chance is 1/6
    assert cnn["test"]["top1"] >= 0.85
    assert cnn["baseline"]["test"]["top1"] >= 0.85
    assert abs(cnn["test"]["top1"] - cnn["baseline"]["test"]["top1"]) <= 0.08
    assert real_run["models"]["vit"]["feature_dim"] == 384
    for m in real_run["models"].values():  # temperature scaling: fitted on validation, never worse there
        cal = m["calibration"]
        assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"] + 1e-9 and cal["temperature"] > 0
    assert real_run["models"]["vit"]["preprocess"]["input_size"] == [3, VIT_SIZE, VIT_SIZE]
    assert real_run["comparison"]["n"] == 20 * len(BREEDS)


def test_data_efficiency_grows_with_the_images_per_class(real_run: dict) -> None:
    curves = real_run["data_efficiency"]
    assert curves["shots"] == [1, 5, 32] and curves["seeds"] == 2
    cnn = curves["models"]["cnn"]
    # real ImageNet features: one photo per breed is far above chance (1/6), 32 beat 1
    assert cnn["1"]["baseline"]["mean"] > 0.4 and cnn["32"]["baseline"]["mean"] > cnn["1"]["baseline"]["mean"]


def test_the_originals_are_scored_as_a_second_test_set(real_run: dict) -> None:
    extra = real_run["extra_test"]["stanford-dogs-originals"]
    assert extra["n"] == 80 and extra["skipped"] == 0 and extra["comparisons"][0]["n"] == 80
    cnn = real_run["models"]["cnn"]["extra_test"]["stanford-dogs-originals"]
    assert cnn["top1"] >= 0.6 and set(cnn["per_class"]) == {"Maltese_dog", "golden_retriever", "German_shepherd",
                                                           "Saint_Bernard"}


def test_imagenet_pretraining_on_stanford_dogs_is_flagged_leaky(real_run: dict) -> None:
    cnn, vit = real_run["models"]["cnn"], real_run["models"]["vit"]
    assert cnn["leaky"] and "ImageNet-1k" in cnn["pretraining"]  # tf_efficientnet_lite0.in1k
    assert vit["leaky"] and "LVD-142M" in vit["pretraining"]  # DINOv2's data was curated around ImageNet
    assert (cnn["architecture"]["family"], vit["architecture"]["family"]) == ("cnn", "vit")
    assert (vit["architecture"]["layers"], vit["architecture"]["hidden_size"], vit["architecture"]["heads"]) == (
        12, 384, 6)
    assert vit["architecture"]["image_size"] == [VIT_SIZE, VIT_SIZE]  # the run's img_size, not timm's 518


def test_the_report_of_a_real_run_renders_in_headless_chromium(real_run_dir: Path, real_run: dict) -> None:
    from browser import check_page
    from dogbench.names import model_name
    from dogbench.results import verdict

    shot = Path(__file__).resolve().parents[1] / "test-artifacts" / "report-stanford-dogs-dev.png"
    page = check_page(real_run_dir / "report.html", shot)
    assert page.broken_images == [] and page.console_errors == [] and page.page_errors == []
    assert page.failed_requests == []
    assert page.images >= 30  # figures, thumbnails of the grid and the confused pairs, explanations
    assert verdict(real_run["comparison"], {k: model_name(m) for k, m in real_run["models"].items()}) in page.text
    for header in ("test top-1 [95% CI]", "top-5", "macro-F1", "GFLOPs", "img/s"):
        assert header in page.text
    assert "Stanford Dogs is a subset of ImageNet" in page.text  # the leak caveat
    assert "Where the models look" in page.text
    assert "Calibration" in page.text and "ECE before" in page.text  # the reliability diagrams' section
    assert "Second test sets" in page.text and "stanford-dogs-originals: 80 images" in page.text
    assert "Data efficiency" in page.text and "training images per class" in page.text
    assert "Does the verdict survive another seed?" in page.text  # the seed spread
    records = json.loads((real_run_dir / "explanations" / "explanations.json").read_text())
    assert {(r["label"], r["method"]) for r in records} == {("cnn", "grad-cam"), ("vit", "attention rollout")}


def test_official_lists_of_the_slice_are_read(tmp_path: Path) -> None:
    data = official_slice(tmp_path / "dogs", BREEDS[:2])
    from dogbench.data import open_dataset

    ds = open_dataset(data)
    assert ds.classes == ("Chihuahua", "Maltese_dog")
    assert len(ds.split("train")) == 80 and len(ds.split("test")) == 40


def test_predict_reproduces_the_runs_predictions_on_its_test_images(real_run_dir: Path) -> None:
    import numpy as np

    import dogbench
    from dogbench.rundir import RunDir

    run = dogbench.load_run(real_run_dir)  # CPU, fp32: what the run used here
    for label in ("cnn", "vit"):
        saved = RunDir(real_run_dir).read_predictions(label)
        every = slice(None, None, 4)  # 30 of the 120 test images, from every breed
        proba = run.predict_proba([Path(p) for p in saved.paths[every]])[label]
        assert len(proba) == 30
        assert np.array_equal(proba.argmax(axis=1), saved.proba[every].argmax(axis=1)), label
        np.testing.assert_allclose(proba, saved.proba[every], atol=1e-5, rtol=0)


def test_predict_names_every_original_photo_and_the_api_agrees(
    real_run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dogbench
    from dogbench.inference import collect_images

    images = ORIGINALS / "Images"
    assert main(["predict", str(real_run_dir), str(images), "--format", "json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    photos = collect_images([images])
    assert [p["image"] for p in doc["predictions"]] == [str(p) for p in photos] and len(photos) == 80
    assert all(p["error"] is None and len(p["models"]["cnn"]) == 5 for p in doc["predictions"])
    every = slice(None, None, 4)  # the API on 20 of the 80 photos, every breed: a quarter of its time
    api = dogbench.load_run(real_run_dir).predict(photos[every], top_k=5)
    for printed, answer in zip(doc["predictions"][every], api, strict=True):
        for label in ("cnn", "vit"):
            assert [t["breed"] for t in printed["models"][label]] == [b for b, _ in answer.top[label]]
            assert [t["p"] for t in printed["models"][label]] == pytest.approx([q for _, q in answer.top[label]],
                                                                                 abs=1e-9)
    # the originals are the dev set's breeds: the CNN's top-1 on these whole photos (6-way here)
    truth = [p.parent.name.split("-", 1)[1].replace("_", " ") for p in photos]
    top1 = sum(m["cnn"][0]["breed"] == t for m, t in zip((p["models"] for p in doc["predictions"]), truth,
                                                          strict=True)) / len(photos)
    assert top1 >= 0.6, top1
