"""`dogbench finetune` end to end on a tiny dataset with small random timm models: fine-tuned rows join the
frozen ones in results.json with their costs and paired tests, go through the one inference path (predict and
explain give what evaluation saved), resume instead of retraining, and a corrupt file is one clear error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from dogbench.cli import main

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=10", "--set", "evaluate.n_bootstrap=200", "--quiet",
        "--epochs", "2", "--set", "finetune.batch_size=4", "--set", "report.explain=1", "--set", "report.examples=2"]


@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("ft")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    args = ["finetune", "--data", str(data), "--out", str(base / "run"), *TINY, "--cache-dir", str(base / "cache"),
            "--methods", "lora,lp-ft", *FAST]
    assert main(args) == 0
    return base, args, json.loads((base / "run" / "results.json").read_text())


def test_finetuned_rows_join_the_frozen_ones_with_their_costs(tiny_finetune: tuple[Path, list[str], dict]) -> None:
    base, _, results = tiny_finetune
    assert list(results["models"]) == ["cnn", "vit", "cnn/lora", "vit/lora", "cnn/lp-ft", "vit/lp-ft"]
    assert results["schema_version"] == 3
    for label, m in results["models"].items():
        if "/" not in label:
            assert m["method"] == "frozen" and m["training"] == {}
            continue
        t = m["training"]
        assert m["method"] == label.split("/")[1] and t["base"] == label.split("/")[0]
        assert 0 < t["trainable_params"] <= t["total_params"] and t["train_wall_s"] > 0 and t["train_cpu_s"] > 0
        assert t["train_img_s"] > 0 and t["peak_memory_mb"] > 0 and t["epochs_run"] == 2
        assert len(t["history"]) == 2 and 1 <= t["best_epoch"] <= 2
        assert 0 <= m["test"]["top1"] <= 1 and m["test"]["n"] == 12 and "ece" in m["calibration"]["test"]["after"]
        assert (base / "run" / label / "predictions.npz").is_file()
        assert (base / "run" / label / "backbone.safetensors").is_file()
    assert results["models"]["cnn/lora"]["training"]["trainable_params"] < \
        results["models"]["cnn/lp-ft"]["training"]["trainable_params"]
    assert (base / "run" / "vit" / "lora" / "adapter.safetensors").is_file()
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert {("cnn/lora", "cnn"), ("vit/lp-ft", "vit"), ("cnn/lora", "vit/lora"), ("cnn/lp-ft", "vit/lp-ft"),
            ("cnn", "vit")} <= pairs
    summary = (base / "run" / "summary.txt").read_text()
    assert "lora fine-tuning" in summary and "lp-ft fine-tuning" in summary
    config = json.loads((base / "run" / "config.json").read_text())
    assert config["finetune"]["methods"] == ["frozen", "lora", "lp-ft"]


def test_predict_on_finetuned_models_gives_the_saved_test_probabilities(
    tiny_finetune: tuple[Path, list[str], dict]
) -> None:
    from dogbench.inference import load_run
    from dogbench.rundir import RunDir

    base, _, _ = tiny_finetune
    loaded = load_run(base / "run")
    assert set(loaded.models) == {"cnn", "vit", "cnn/lora", "vit/lora", "cnn/lp-ft", "vit/lp-ft"}
    for label in ("cnn/lora", "vit/lp-ft"):
        saved = RunDir(base / "run").read_predictions(label)
        proba = loaded.models[label].predict_proba(list(saved.paths))[0]
        np.testing.assert_allclose(proba, saved.proba, atol=1e-5)


def test_the_recorded_best_validation_top1_is_the_predictors_top1_on_the_validation_images(
    tiny_finetune: tuple[Path, list[str], dict]
) -> None:
    """One numeric path: training picked its best epoch on exactly the top-1 that the saved model gives through
    the inference path (load_run's Predictor) on the validation split (carved as the frozen protocol carves it)."""
    from dogbench.data import open_dataset, stratified_split
    from dogbench.inference import load_run
    from dogbench.rundir import RunDir

    base, _, results = tiny_finetune
    cfg = RunDir(base / "run").read_config()
    dataset = open_dataset(base / "data", seed=cfg.data.split_seed)
    train_rows = [s for s in dataset.samples if s.split == "train"]
    _, held = stratified_split(np.array([s.label for s in train_rows]), fraction=cfg.data.val_fraction,
                               seed=cfg.data.split_seed)
    val = [train_rows[i] for i in held]
    labels = np.array([s.label for s in val])
    loaded = load_run(base / "run")
    for label in ("cnn/lora", "vit/lora", "cnn/lp-ft", "vit/lp-ft"):
        row = results["models"][label]
        proba = loaded.models[label].predict_proba([s.path for s in val])[0]
        predicted = float((proba.argmax(1) == labels).mean())
        best = row["training"]["history"][row["training"]["best_epoch"] - 1]["val_top1"]
        assert best == row["val"]["top1"] == predicted, label
        assert row["training"]["val_precision"] == row["precision"] == "fp32"


def test_predict_and_explain_commands_work_on_a_finetuned_run(
    tiny_finetune: tuple[Path, list[str], dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, _, _ = tiny_finetune
    photo = next((base / "data" / "test" / "dog").glob("*.jpg"))
    assert main(["predict", str(base / "run"), str(photo), "--format", "json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["predictions"][0]["models"]) >= {"cnn/lora", "vit/lp-ft"}
    assert main(["explain", str(base / "run"), str(photo), "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{photo.stem}__vit-lora.png").is_file()
    assert (tmp_path / f"{photo.stem}__cnn-lp-ft.png").is_file()
    html = (base / "run" / "report.html").read_text()
    assert "Fine-tuning ladder" in html and "cnn/lp-ft" in html


def test_the_same_command_again_resumes_instead_of_retraining(tiny_finetune: tuple[Path, list[str], dict]) -> None:
    base, args, results = tiny_finetune
    states = sorted((base / "run").glob("*/*/train/*/state.pt"))
    assert len(states) == 4
    mtimes = [p.stat().st_mtime_ns for p in states]
    t0 = time.perf_counter()
    assert main(args) == 0
    again = json.loads((base / "run" / "results.json").read_text())
    assert [p.stat().st_mtime_ns for p in states] == mtimes  # nothing trained again
    for label in ("cnn/lora", "vit/lp-ft"):
        assert again["models"][label]["test"]["top1"] == results["models"][label]["test"]["top1"]
        assert again["models"][label]["training"]["history"] == results["models"][label]["training"]["history"]
    assert time.perf_counter() - t0 < 60


def test_a_corrupt_finetuned_weights_file_is_one_clear_error(
    tiny_finetune: tuple[Path, list[str], dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    base, _, _ = tiny_finetune
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    (run / "vit" / "lora" / "backbone.safetensors").write_bytes(b"garbage")
    photo = next((base / "data" / "test" / "cat").glob("*.jpg"))
    assert main(["predict", str(run), str(photo), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "backbone.safetensors" in err and "Traceback" not in err
    assert (run / "results.json").is_file() and (run / "cnn" / "lp-ft" / "backbone.safetensors").is_file()


@pytest.mark.parametrize("foreign", ["another architecture", "a torch pickle under the safetensors name"])
def test_a_finetuned_checkpoint_from_elsewhere_goes_through_the_weights_checks(
    tiny_finetune: tuple[Path, list[str], dict], tmp_path: Path, capsys: pytest.CaptureFixture, foreign: str
) -> None:
    """A fine-tuned model's weights swapped for a stranger's: the ViT's weights in the CNN's folder have their
    missing and unexpected keys named; a torch pickle (one whose unpickling would run code) saved under the
    ``.safetensors`` name is refused as not a safetensors file, and its payload never runs. Exit 2, the file
    named, the rest of the run folder untouched."""
    import shutil

    import torch

    from test_backbones import Payload

    base, _, _ = tiny_finetune
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    weights = run / "cnn" / "lp-ft" / "backbone.safetensors"
    marker = tmp_path / "pwned"
    if foreign == "another architecture":
        shutil.copyfile(run / "vit" / "lp-ft" / "backbone.safetensors", weights)
    else:
        torch.save({"conv1.0.weight": Payload(marker)}, weights)
    photo = next((base / "data" / "test" / "cat").glob("*.jpg"))
    assert main(["predict", str(run), str(photo), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "Traceback" not in err and err.startswith("dogbench: error:"), err
    if foreign == "another architecture":
        assert "missing keys (" in err and "unexpected keys (" in err
    assert not marker.exists(), "the payload ran"
    assert (run / "results.json").is_file() and (run / "vit" / "lp-ft" / "backbone.safetensors").is_file()


def test_unknown_method_names_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--data", str(tmp_path), "--methods", "lora,adapterz", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "adapterz" in err and "lora, partial, full, lp-ft" in err


def _lora_search(tmp_path: Path, backbone: str, *settings: str) -> dict:
    """`dogbench finetune --methods lora` of a tiny model on 3 tiny classes in ``tmp_path/run`` with ``settings``
    (--set); the LoRA row of results.json."""
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=2)
    args = ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", backbone, "--cache-dir",
            str(tmp_path / "cache"), "--methods", "lora", *FAST, "--set", "report.enabled=false",
            *[x for setting in settings for x in ("--set", setting)]]
    assert main(args) == 0
    return json.loads((tmp_path / "run" / "results.json").read_text())["models"][f"{backbone.split('=')[0]}/lora"]


def test_finetune_trials_tune_the_recipe_on_validation_with_a_pruner(tmp_path: Path) -> None:
    import optuna


    out = tmp_path / "run"
    row = _lora_search(tmp_path, "vit=test_vit@random,img_size=32", "finetune.trials=3", "finetune.pruner=halving")
    trials = row["training"]["trials"]
    parts = {"ema", "mixup", "randaugment", "re_prob"}  # the recipe's parts, on or off (issue 29)
    assert trials["n_trials"] == 3 and set(trials["best_params"]) == {"lr", "weight_decay", "lora_rank", *parts}
    assert trials["stopped_by"] == "trials" and trials["budget_s"] is None
    study = optuna.load_study(study_name=trials["study"], storage=f"sqlite:///{out / 'optuna.db'}")
    first = study.trials[0]
    assert first.params["lr"] == pytest.approx(1e-3) and first.params["lora_rank"] == 8  # the defaults first
    assert first.params["re_prob"] == 0 and not any(first.params[p] for p in ("ema", "mixup", "randaugment"))
    assert trials["n_pruned"] == sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    best, trained = trials["best_params"], row["training"]["params"]  # the best trial's parts are what trained
    assert (trained["ema_decay"] > 0, trained["mixup"] > 0, trained["randaugment"] is not None) == (
        best["ema"], best["mixup"], best["randaugment"])
    assert trained.get("re_prob", 0.0) == pytest.approx(best["re_prob"])
    assert all(t.intermediate_values for t in study.trials)  # per-epoch validation top-1, for the pruner
    assert row["val"]["top1"] == pytest.approx(trials["best_val_top1"])
    assert row["training"]["params"]["lr"] == pytest.approx(trials["best_params"]["lr"])
    assert len(list((out / "vit" / "lora" / "train").iterdir())) == len({tuple(sorted(t.params.items()))
                                                                          for t in study.trials})


def test_a_wall_time_budget_stops_the_recipe_search_and_the_best_finished_trial_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune.budget_s=1 against trials made to take over a second (on any machine): the first trial (the
    configured recipe) finishes, no other starts, and the row says the budget stopped the search."""
    import time

    import optuna

    from dogbench.protocols import finetune

    real = finetune._train_once

    def slow(*args, **kwargs):  # a trial that outlasts the budget whatever the hardware
        time.sleep(1.1)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "_train_once", slow)

    out = tmp_path / "run"
    row = _lora_search(tmp_path, "cnn=test_resnet@random,input_size=32", "finetune.trials=5", "finetune.budget_s=1")
    trials = row["training"]["trials"]
    assert (trials["n_trials"], trials["stopped_by"], trials["budget_s"]) == (1, "budget", 1)
    study = optuna.load_study(study_name=trials["study"], storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert study.trials[0].duration.total_seconds() > 1  # what makes the budget bind
    assert row["val"]["top1"] == pytest.approx(trials["best_val_top1"])


def _tiny_cnn_finetune(tmp_path: Path, *settings: str) -> dict:
    """`dogbench finetune` of a tiny random CNN (lp-ft and lora) with ``settings`` (--set); the result rows."""
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=2)
    out = tmp_path / "run"
    args = ["finetune", "--data", str(data), "--out", str(out), "--backbone", "cnn=test_resnet@random,input_size=32",
            "--cache-dir", str(tmp_path / "cache"), "--methods", "lp-ft,lora", *FAST,
            *(a for setting in settings for a in ("--set", setting)), "--set", "report.enabled=false"]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())["models"]


def test_wise_ft_picks_the_best_mix_of_start_and_fine_tuned_weights_on_validation(tmp_path: Path) -> None:
    models = _tiny_cnn_finetune(tmp_path, "finetune.wise=0,0.5")
    t = models["cnn/lp-ft"]["training"]
    wise = t["wise"]
    assert set(wise["curve"]) == {"0.0", "0.5", "1.0"}
    assert wise["curve"]["0.0"] == t["start_val_top1"]  # a = 0 rebuilt the start that training scored first
    assert wise["curve"]["1.0"] == max(h["val_top1"] for h in t["history"])
    assert wise["val_top1"] == max(wise["curve"].values()) == wise["curve"][str(float(wise["alpha"]))]
    assert models["cnn/lp-ft"]["val"]["top1"] == wise["val_top1"]
    assert models["cnn/lora"]["training"]["wise"] is None  # LoRA's start has no adapter weights to mix


def test_refit_trains_the_chosen_recipe_again_on_train_and_validation(tmp_path: Path) -> None:
    models = _tiny_cnn_finetune(tmp_path, "finetune.wise=0.5", "finetune.refit=true")
    out = tmp_path / "run"
    for method in ("lp-ft", "lora"):
        t = models[f"cnn/{method}"]["training"]
        refit = t["refit"]
        assert refit["epochs"] == t["best_epoch"] == len(refit["history"])
        assert refit["train_images"] == 24  # all 3 x 8 training images: the split's train and validation parts
        assert t["train_images"] < 24 * t["epochs_run"]  # the first training saw the train part alone
        assert refit["wise_alpha"] == (t["wise"]["alpha"] if method == "lp-ft" else None)
        assert "refit on train + validation" in models[f"cnn/{method}"]["calibration"]["fitted_on"]
    assert len(list((out / "cnn" / "lp-ft" / "train").iterdir())) == 2  # the chosen recipe's training and its refit


def test_finetune_settings_are_checked_with_the_valid_choices() -> None:
    from dogbench.config import ConfigError, resolve

    for override, message in (("finetune.pruner=fast", "Valid pruners"), ("finetune.crop_scale=[0.5]", "crop_scale"),
                              ("finetune.precision=fp64", "finetune.precision"), ("finetune.epochs=0", "epochs"),
                              ("finetune.wise=0.5,2", r"finetune.wise .*\[0, 1\]"),
                              ("finetune.wise=half", "finetune.wise must be numbers")):
        with pytest.raises(ConfigError, match=message):
            resolve({}, overrides=[override])


def test_finetune_adds_methods_to_a_folder_and_keeps_the_earlier_rows(tmp_path: Path) -> None:
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog"), n_train=6, n_test=2)
    common = ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone",
              "cnn=test_resnet@random,input_size=32", "--cache-dir", str(tmp_path / "cache"), *FAST,
              "--set", "report.enabled=false"]
    assert main([*common, "--methods", "partial"]) == 0
    assert main([*common, "--methods", "full"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["models"]) == ["cnn", "cnn/partial", "cnn/full"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finetune"]["methods"] == \
        ["frozen", "partial", "full"]
