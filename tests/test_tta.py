"""Test-time augmentation (``evaluate.tta``): the views, the one averaging rule, and a tiny run with flip TTA whose
test predictions ``predict`` (CLI and API) reproduces, with both scores and the paired with/without comparison
recorded; without TTA nothing in ``results.json`` changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dogbench
from dogbench.cli import main
from dogbench.config import ConfigError, Tta
from dogbench.evaluate import apply_temperature, average_views
from dogbench.features import FLIP, PLAIN, views_for
from dogbench.report import load_runs
from dogbench.report.render import headline
from dogbench.results import RunResults
from dogbench.rundir import RunDir

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--trials", "2", "--set", "tune.max_epochs=8",
        "--set", "evaluate.n_bootstrap=100", "--set", "report.enabled=false", "--set", "tune.baseline=false", "--quiet"]
FINETUNE = ["--methods", "full", "--epochs", "1", "--set", "finetune.batch_size=4"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_flip_view_mirrors_each_image_left_to_right() -> None:
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.int64).reshape(2, 3, 4, 5).to(torch.uint8)  # known pixels
    flipped = FLIP.apply(image)
    assert torch.equal(flipped, torch.flip(image, dims=[3]))
    for column in range(5):  # column j of the mirror is column W - 1 - j of the image, every row and channel
        assert torch.equal(flipped[..., column], image[..., 4 - column])
    assert PLAIN.apply(image) is image
    assert views_for("none") == (PLAIN,) and views_for(Tta.FLIP) == (PLAIN, FLIP)
    with pytest.raises(ConfigError, match=r"flip\+crops.*valid choices: none, flip"):
        views_for("flip+crops")


def test_an_images_probabilities_are_the_mean_of_its_views_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    per_view = rng.dirichlet(np.ones(4), size=(2, 3))  # (V, N, C)
    want = (apply_temperature(per_view[0], 2.0) + apply_temperature(per_view[1], 2.0)) / 2
    np.testing.assert_allclose(average_views(per_view, 2.0), want, rtol=0, atol=1e-15)
    assert not np.allclose(average_views(per_view, 2.0), apply_temperature(average_views(per_view, None), 2.0))
    assert np.array_equal(average_views(per_view[:1], 2.0), apply_temperature(per_view[0], 2.0))  # one view: as is
    assert np.array_equal(average_views(per_view[:1], None), per_view[0])


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny finished run with flip TTA: a frozen head and a fine-tuned model of one random CNN."""
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("tta")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=6, n_test=3)
    out, threads = base / "run", torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread, for the module
    try:
        assert main(["finetune", "--data", str(data), "--out", str(out), "--cache-dir", str(base / "cache"), *TINY,
                     *FINETUNE, "--set", "evaluate.tta=flip"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_a_flip_run_records_both_scores_and_compares_them_paired(flip_run: tuple[Path, dict]) -> None:
    run_dir, results = flip_run
    run = dogbench.load_run(run_dir)
    tta_comparisons = [c for c in results["comparisons"] if c.get("tta")]
    assert [c["model"] for c in tta_comparisons] == ["cnn", "cnn/full"]
    for label, row in results["models"].items():
        saved = RunDir(run_dir).read_predictions(label)
        tta = row["tta"]
        assert (tta["views"], tta["n_views"]) == ("flip", 2)
        assert row["test"]["top1"] == pytest.approx(float(np.mean(saved.proba.argmax(1) == saved.y_true)))
        # the single-view score is the plain view's calibrated argmax, kept beside the row's TTA score
        model = run.models[label]
        per_view, _ = model.predict_views([Path(p) for p in saved.paths])
        single = apply_temperature(per_view[0], model.temperature)
        assert not np.allclose(single, saved.proba, atol=1e-6)  # the mirror changed the numbers
        assert tta["single_view"]["top1"] == pytest.approx(float(np.mean(single.argmax(1) == saved.y_true)))
        assert tta["comparison"] in tta_comparisons and tta["comparison"]["n"] == len(saved.y_true)
        assert tta["comparison"]["delta_top1"] == pytest.approx(row["test"]["top1"] - tta["single_view"]["top1"])
    summary = (run_dir / "summary.txt").read_text()
    assert "cnn with flip test-time augmentation" in summary and "cnn/full with flip" in summary
    verdicts, _ = headline(load_runs([run_dir]))  # the report's verdicts (and serve's page)
    assert [v.split(":")[0] for v in verdicts if "TTA" in v] == ["Test-time augmentation"] * 2


def test_predict_reproduces_the_runs_flip_predictions(flip_run: tuple[Path, dict],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = flip_run
    run = dogbench.load_run(run_dir)
    for label in ("cnn", "cnn/full"):
        saved = RunDir(run_dir).read_predictions(label)
        paths = [Path(p) for p in saved.paths]
        np.testing.assert_allclose(run.predict_proba(paths)[label], saved.proba, rtol=0, atol=1e-6)
    saved = RunDir(run_dir).read_predictions("cnn/full")
    assert main(["predict", str(run_dir), str(saved.paths[0]), "--top-k", "3", "--format", "json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"][0]["models"]
    for label in ("cnn", "cnn/full"):
        row = RunDir(run_dir).read_predictions(label).proba[0]
        for top in printed[label]:
            assert top["p"] == pytest.approx(float(row[list(saved.classes).index(top["breed"])]), abs=1e-6)


def test_without_tta_results_json_is_what_it_always_was(flip_run: tuple[Path, dict]) -> None:
    _, results = flip_run
    plain = json.loads(json.dumps(results))
    for row in plain["models"].values():
        del row["tta"]
    plain["comparisons"] = [c for c in plain["comparisons"] if not c.get("tta")]
    assert RunResults.from_dict(plain).to_dict() == plain  # no "tta" key written for rows without it
    assert RunResults.from_dict(results).to_dict() == results


def test_ten_crop_tta_is_refused_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog"), n_train=2, n_test=1)
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                 *TINY, "--set", "evaluate.tta=flip+crops"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.tta = 'flip+crops'" in err and "valid choices: none, flip" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # nothing was extracted


def test_seeds_with_tta_are_refused_before_anything_runs() -> None:
    from dogbench.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="evaluate.seeds = 3 repeats the run on single views"):
        resolve({"evaluate": {"seeds": 3, "tta": "flip"}})
