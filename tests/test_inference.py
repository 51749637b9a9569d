"""The one inference path: ``load_run`` / ``predict`` / ``dogbench predict`` against the run's own predictions,
the run folder's config as the source of truth, heads that know their backbone, and corrupt run-folder files."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dogbench
from dogbench.cli import main
from dogbench.config import ConfigError, RunConfig, resolve
from dogbench.heads import HeadIdentityError
from dogbench.rundir import RunDir, new_run_dir

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=8", "--set", "evaluate.n_bootstrap=100", "--set",
        "report.enabled=false", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(run folder, dataset, cache) of a finished tiny run: two random backbones, 4 classes."""
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("inference")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox", "owl"), n_train=8, n_test=4)
    out, cache = base / "run", base / "cache"
    assert main(["run", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), *TINY, *FAST]) == 0
    return out, data, cache


def _copy_run(tiny: tuple[Path, Path, Path], dest: Path) -> Path:
    shutil.copytree(tiny[0], dest)
    return dest


def test_predict_reproduces_the_runs_own_predictions(tiny: tuple[Path, Path, Path]) -> None:
    run_dir = tiny[0]
    run = dogbench.load_run(run_dir)
    assert list(run.models) == ["cnn", "vit"] and run.classes == ("cat", "dog", "fox", "owl")
    for label in run.models:
        saved = RunDir(run_dir).read_predictions(label)
        proba = run.predict_proba([Path(p) for p in saved.paths])[label]
        np.testing.assert_array_equal(proba.argmax(axis=1), saved.proba.argmax(axis=1))
        np.testing.assert_allclose(proba, saved.proba, atol=1e-5, rtol=0)
        assert run.models[label].head is not None and str(run.models[label].head.device) == "cpu"


def test_predict_takes_paths_pil_images_and_arrays_alike(tiny: tuple[Path, Path, Path]) -> None:
    run = dogbench.load_run(tiny[0])
    path = Path(RunDir(tiny[0]).read_predictions("cnn").paths[0])
    picture = Image.open(path).convert("RGB")
    answers = run.predict([path, picture, np.asarray(picture)], top_k=2)
    assert [a.image for a in answers] == [str(path), "<image 1>", "<image 2>"]
    for a in answers:
        assert set(a.top) == {"cnn", "vit"} and all(len(t) == 2 for t in a.top.values()) and a.error is None
    # the file is decoded by libjpeg-turbo (torchvision.io), the in-memory copy by PIL's libjpeg; both get the
    # same tensor resize and crop
    for label in ("cnn", "vit"):
        for other in answers[1:]:
            assert [b for b, _ in other.top[label]] == [b for b, _ in answers[0].top[label]]
            np.testing.assert_allclose([q for _, q in other.top[label]], [q for _, q in answers[0].top[label]],
                                       atol=1e-6)
    one = run.predict(picture, top_k=1)
    assert len(one) == 1 and one[0].top["cnn"][0][0] == answers[1].top["cnn"][0][0]
    assert one[0].top["cnn"][0][1] == pytest.approx(answers[1].top["cnn"][0][1], abs=1e-6)  # another batch


def test_dogbench_predict_walks_folders_reports_unreadable_files_and_writes_every_format(
    tiny: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, data, _ = tiny
    photos = tmp_path / "photos"
    shutil.copytree(data / "test" / "cat", photos / "cats")
    (photos / "broken.jpg").write_text("not an image")
    cats = sorted(f for f in (photos / "cats").iterdir() if f.suffix != ".txt" and not f.name.startswith("."))
    n = len(cats)  # notes.txt is no image, .DS_Store is hidden
    assert main(["predict", str(run_dir), str(photos), "--format", "json", "--top-k", "3", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"] == ["cnn", "vit"] and len(doc["predictions"]) == n + 1
    broken = [p for p in doc["predictions"] if p["error"]]
    assert [Path(p["image"]).name for p in broken] == ["broken.jpg"] and "broken.jpg" in broken[0]["error"]
    good = [p for p in doc["predictions"] if not p["error"]]
    assert all(len(p["models"]["cnn"]) == 3 for p in good)
    api = dogbench.load_run(run_dir).predict(cats, top_k=3)
    assert [[(t["breed"], t["p"]) for t in p["models"]["vit"]] for p in good] == [
        [(b, pytest.approx(q, abs=1e-12)) for b, q in a.top["vit"]] for a in api]

    assert main(["predict", str(run_dir), str(photos / "cats"), "--format", "csv", "--top-k", "2", "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == n * 2 * 2 and {r["model"] for r in rows} == {"cnn", "vit"}
    assert main(["predict", str(run_dir), str(photos), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"broken\.jpg +- +is a text file, not an image", table) and "top-5" in table.splitlines()[0]
    assert main(["predict", str(run_dir), str(photos), "--strict", "--quiet"]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err


def test_a_head_loads_on_the_cpu_whatever_device_it_recorded(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run_dir = _copy_run(tiny, tmp_path / "run")
    meta_path = RunDir(run_dir).head_dir("cnn") / "head.json"
    meta = json.loads(meta_path.read_text())
    assert "device" not in meta["params"] and meta["identity"]["timm_tag"] and meta["class_names"]
    meta["params"]["device"] = "cuda:3"  # what heads of an earlier dogbench saved
    meta_path.write_text(json.dumps(meta))
    model = dogbench.load_run(run_dir).models["cnn"]
    assert model.head.device == "cpu" and next(model.head.module_.parameters()).device.type == "cpu"


def test_a_head_for_another_backbone_is_refused_naming_both(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _copy_run(tiny, tmp_path / "run")
    meta_path = RunDir(run_dir).head_dir("vit") / "head.json"
    meta = json.loads(meta_path.read_text())
    true_sha = meta["identity"]["weights_sha256"]
    meta["identity"]["weights_sha256"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HeadIdentityError, match="belongs to another backbone") as err:
        dogbench.load_run(run_dir)
    assert "f" * 64 in str(err.value) and true_sha in str(err.value) and str(meta_path.parent) in str(err.value)
    path = RunDir(run_dir).read_predictions("cnn").paths[0]
    assert main(["predict", str(run_dir), path]) == 2
    assert "belongs to another backbone" in capsys.readouterr().err


# ---------------------------------------------------------------- the run folder's config rules


def test_tune_on_an_existing_folder_uses_its_config_and_refuses_another(
    tiny: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _, cache = tiny
    run_dir = _copy_run(tiny, tmp_path / "run")
    before = (run_dir / "config.json").read_text()
    # nothing given: the folder's config (its data, backbones, trials); only how it runs may change
    assert main(["tune", "--out", str(run_dir), "--cache-dir", str(cache), "--quiet"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["backbones"] == json.loads(before)["backbones"]
    capsys.readouterr()
    code = main(["tune", "--out", str(run_dir), "--cache-dir", str(cache), "--trials", "7",
                 "--backbone", "cnn=resnet18@random", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "was made with another config" in err and "tune.trials: 2 -> 7" in err
    assert "backbones.cnn.model: 'test_resnet' -> 'resnet18'" in err and "Traceback" not in err
    assert json.loads((run_dir / "config.json").read_text())["tune"]["trials"] == 2  # untouched
    # evaluate takes the folder positionally and its config as the source of truth
    assert main(["evaluate", str(run_dir), "--cache-dir", str(cache), "--quiet"]) == 0
    assert main(["tune", "--out", str(run_dir), "--cache-dir", str(cache), "--trials", "3", "--force",
                 "--quiet"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["tune"]["trials"] == 3


def test_config_differences_ignore_how_a_run_executes() -> None:
    from dogbench.config import config_differences

    a = resolve({}, backbone_specs=["cnn=test_resnet@random"])
    b = resolve({}, overrides=["features.device=cpu", "features.batch_size=8", "report.examples=20"],
                backbone_specs=["cnn=test_resnet@random"])
    assert config_differences(a, b) == []
    c = resolve({}, overrides=["data.val_fraction=0.3"], backbone_specs=["cnn=test_resnet@random,input_size=48"])
    assert config_differences(a, c) == ["backbones.cnn.input_size: None -> 48", "data.val_fraction: 0.2 -> 0.3"]


def test_backbone_overrides_apply_after_backbone_specs_and_weight_paths_are_absolute(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = resolve({}, overrides=["backbones.vit.img_size=224"], backbone_specs=["vit=vit_s16@w.safetensors"])
    assert cfg.backbones[0].model_kwargs == {"img_size": 224}
    assert cfg.backbones[0].weights == str(tmp_path / "w.safetensors")
    assert resolve({"data": {"root": "dogs"}}).data.root == str(tmp_path / "dogs")


def test_new_run_folders_made_in_the_same_second_differ(tmp_path: Path) -> None:
    made = [new_run_dir(tmp_path).path for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)


def test_switches_turn_on_and_off(tmp_path: Path) -> None:
    from dogbench.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--no-strict", "--crop-to-box", "--no-download", "--data", "x"])
    cfg = config_from_args(args)
    assert (cfg.data.strict, cfg.data.crop_to_box, cfg.data.download) == (False, True, False)
    args = build_parser().parse_args(["run", "--strict", "--no-crop-to-box", "--data", "x"])
    cfg = config_from_args(args)
    assert (cfg.data.strict, cfg.data.crop_to_box, cfg.data.download) == (True, False, True)


# ---------------------------------------------------------------- corrupt files: one message, exit 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


CORRUPTIONS = {"truncated": _truncate, "missing": lambda p: p.unlink(),
               "wrong": lambda p: p.write_bytes(b"\x00" * 64)}


@pytest.mark.parametrize("rel", ["config.json", "results.json", "cnn/tuning.json", "cnn/head/head.json",
                                 "cnn/head/head.safetensors", "cnn/predictions.npz"])
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_every_command_that_reads_a_corrupt_run_file_names_it_and_exits_2(
    tiny: tuple[Path, Path, Path], tmp_path: Path, rel: str, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(tiny, tmp_path / "run")
    CORRUPTIONS[how](run_dir / rel)
    photo = RunDir(tiny[0]).read_predictions("cnn").paths[0]
    run, cache = str(run_dir), str(tiny[2])
    predict, evaluate = ["predict", run, photo, "--quiet"], ["evaluate", run, "--cache-dir", cache, "--quiet"]
    report = ["report", run, "--explain", "0", "--quiet"]
    explain = ["explain", run, photo, "--out", str(tmp_path / "explain")]  # not ./explanations: the cwd
    readers = {  # the commands that read this file (main() turns every DogbenchError into exit 2, no traceback;
        # anything else would propagate here and fail the test)
        "config.json": [predict, evaluate, explain] + ([report] if how != "missing" else []),  # report: defaults
        "results.json": [predict, report],
        "cnn/tuning.json": [evaluate],
        "cnn/head/head.json": [predict, explain] if how != "missing" else [predict],  # explain works without
        "cnn/head/head.safetensors": [predict, explain],
        "cnn/predictions.npz": [report],
    }[rel]
    for argv in readers:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(run_dir / rel) in err and err.startswith("dogbench: error:"), (argv, err)
    if rel == "config.json":
        assert "--force" in err  # a new folder, or the config written anew
        return
    # the command the message names rebuilds the file, and the readers work again
    rebuild = re.search(r"`(dogbench [^`]+)`", err).group(1).split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "tuning again"
        assert main([*rebuild[1:], "--quiet"]) == 0, rebuild
    for argv in readers:
        assert main(argv) == 0, argv


def test_run_config_round_trips_through_the_run_folder(tmp_path: Path) -> None:
    cfg = resolve({}, backbone_specs=["cnn=test_resnet@random"])
    run = RunDir(tmp_path / "r")
    settled = run.settle_config(cfg)
    assert run.read_config() == settled and isinstance(settled, RunConfig)


@pytest.mark.parametrize("name", ["meta.json", "features.npy", "index.json"])
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_cache_entry_file_is_named_by_every_command_that_reads_it(
    tiny: tuple[Path, Path, Path], tmp_path: Path, name: str, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, data, cache = tiny
    cache = Path(shutil.copytree(cache, tmp_path / "cache"))
    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2  # one per backbone
    before = np.load(entries[0] / "features.npy")
    CORRUPTIONS[how](entries[0] / name)
    run = _copy_run(tiny, tmp_path / "run")
    extract = ["extract", "--data", str(data), "--cache-dir", str(cache), *TINY, "--quiet"]
    evaluate = ["evaluate", str(run), "--cache-dir", str(cache), "--quiet"]
    if name == "index.json" and how == "missing":
        # index.json is written last: without it the entry is unfinished and is computed again
        assert main(extract) == 0 and np.array_equal(np.load(entries[0] / "features.npy"), before)
        return
    for argv in (extract, evaluate):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(entries[0] / name) in err and f"Delete the folder {entries[0]}" in err, err
    shutil.rmtree(entries[0])  # what the message says: then the same command recomputes it
    assert main(extract) == 0 and np.array_equal(np.load(entries[0] / "features.npy"), before)


def test_folder_rules_hold_at_the_edges(tiny: tuple[Path, Path, Path], tmp_path: Path, monkeypatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    run_dir, data, cache = tiny
    run_dir = _copy_run(tiny, tmp_path / "run")
    saved = (run_dir / "config.json").read_text()
    # a device the machine lacks is refused before anything is written into the folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", str(run_dir), "--device", "cuda:5", "--quiet"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and (run_dir / "config.json").read_text() == saved
    # the same data through another spelling of its path is the same config
    monkeypatch.chdir(data.parent)
    assert main(["tune", "--out", str(run_dir), "--data", f"../{data.parent.name}/{data.name}", "--quiet"]) == 0
    # bench never writes into a run folder; an output path that cannot be written is one message, exit 2
    assert main(["bench", "--data", str(data), *TINY, "--out", str(run_dir), "--quiet"]) == 2
    assert "is a run folder" in capsys.readouterr().err
    photo = RunDir(run_dir).read_predictions("cnn").paths[0]
    assert main(["predict", str(run_dir), photo, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dogbench: error:") and str(tmp_path) in err
    # an unreadable config.json is written anew with --force (the defaults and the flags given)
    (run_dir / "config.json").write_text("{")
    assert main(["tune", "--out", str(run_dir), "--data", str(data), *TINY, *FAST, "--force"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["tune"]["trials"] == 2


def test_a_grey_array_is_one_image(tiny: tuple[Path, Path, Path]) -> None:
    run = dogbench.load_run(tiny[0])
    grey = np.full((40, 48), 128, dtype=np.uint8)
    answers = run.predict(grey, top_k=1)
    assert len(answers) == 1 and answers[0].error is None and set(answers[0].top) == {"cnn", "vit"}
    assert run.predict_proba(np.stack([grey, grey]))["cnn"].shape == (2, 4)


def test_calibration_is_fitted_on_validation_and_carried_to_predict(tiny: tuple[Path, Path, Path],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from dogbench.evaluate import apply_temperature

    run_dir = tiny[0]
    results = RunDir(run_dir).read_results()
    run = dogbench.load_run(run_dir)
    for label, m in results.models.items():
        cal = m.calibration
        t = cal["temperature"]
        assert t > 0 and cal["bins"] == 15 and run.models[label].temperature == t
        assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"] + 1e-9  # T minimises validation NLL
        assert set(cal["test"]["after"]) == {"ece", "nll", "brier"}
        assert sum(cal["reliability"]["after"]["count"]) == m.test["n"]
        saved = RunDir(run_dir).read_predictions(label)
        np.testing.assert_allclose(saved.proba, apply_temperature(saved.proba_uncalibrated, t), atol=1e-6)
        assert (saved.proba.argmax(axis=1) == saved.proba_uncalibrated.argmax(axis=1)).all()
    assert main(["predict", str(run_dir), str(saved.paths[0]), "--format", "json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"]["cnn"] == {"temperature": results.models["cnn"].calibration["temperature"],
                                         "calibrated": True}
    assert main(["predict", str(run_dir), str(saved.paths[0]), "--quiet"]) == 0
    assert "temperature-scaled (T = " in capsys.readouterr().out


def test_a_second_test_set_is_scored_by_the_same_heads(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_class_folder_layout

    _, data, cache = tiny
    extra = make_class_folder_layout(tmp_path / "mine", classes=("Cat", "fox"), n_train=2, n_test=2, flat=True,
                                     seed=3)
    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), *TINY, *FAST,
                 "--set", f'data.extra_test=["{extra}"]']) == 0
    printed = capsys.readouterr().out
    assert "second test set mine (8 images, 0 skipped): test top-1 cnn " in printed
    results = RunDir(out).read_results()
    assert results.extra_test["mine"]["n"] == 8 and results.extra_test["mine"]["root"] == str(extra)
    comp = results.extra_test["mine"]["comparisons"][0]
    assert (comp["a"], comp["b"], comp["n"]) == ("cnn", "vit", 8)
    for m in results.models.values():
        e = m.extra_test["mine"]
        assert e["n"] == 8 and 0 <= e["top1"] <= 1 and set(e["per_class"]) <= {"cat", "fox"}
        assert {"ece", "nll", "brier"} == set(e["calibration"]) and "top1" in e["baseline"]
    assert results.timing_s["extra_test"] > 0
    zebras = make_class_folder_layout(tmp_path / "zebras", classes=("zebra",), n_train=1, n_test=1, flat=True)
    capsys.readouterr()
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "bad"), "--cache-dir", str(cache), *TINY,
                 *FAST, "--set", f'data.extra_test=["{zebras}"]']) == 2
    assert "has classes the dataset does not: zebra" in capsys.readouterr().err


def test_data_efficiency_curves_from_the_cached_features(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, data, cache = tiny
    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), *TINY, *FAST,
                 "--shots", "1,3,all", "--set", "shots.seeds=2", "--set", "shots.trials=2"]) == 0
    assert "data efficiency: test top-1 with k training images per class" in capsys.readouterr().out
    results = RunDir(out).read_results()
    curves = results.data_efficiency
    n_train = results.dataset.n_train // 4  # images per class in the training split (4 balanced classes)
    assert curves["shots"] == [1, 3, n_train] and curves["seeds"] == 2
    for label in ("cnn", "vit"):
        for k in curves["shots"]:
            point = curves["models"][label][str(k)]
            for method in ("tuned", "baseline"):
                runs = point[method]["runs"]
                assert [r["seed"] for r in runs] == [0, 1] and all(r["n_train"] == 4 * k for r in runs)
                assert point[method]["min"] <= point[method]["mean"] <= point[method]["max"]
    assert results.timing_s["shots"] > 0
    with pytest.raises(ConfigError, match="neither a number of images per class"):
        resolve({}, overrides=['shots.shots=["0"]'])


def test_seeds_repeat_split_search_and_scoring(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, data, cache = tiny
    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), *TINY, *FAST,
                 "--seeds", "3"]) == 0
    assert "over 3 seeds (split, search, refit): test top-1 mean +- sd cnn " in capsys.readouterr().out
    results = RunDir(out).read_results()
    s = results.seeds
    assert s["n"] == 3
    for label, m in results.models.items():
        tuned = s["models"][label]["tuned"]
        assert len(tuned["values"]) == 3 and tuned["values"][0] == m.test["top1"]  # seed 0 is the run itself
        assert tuned["min"] <= tuned["mean"] <= tuned["max"] and len(s["models"][label]["baseline"]["values"]) == 3
    (c,) = s["comparisons"]
    cnn, vit = s["models"]["cnn"]["tuned"]["values"], s["models"]["vit"]["tuned"]["values"]
    assert c["delta"]["values"] == pytest.approx([a - b for a, b in zip(cnn, vit, strict=True)])
    assert results.timing_s["seeds"] > 0
    from dogbench.report import build_report, load_runs

    assert "seeds" in [sec.id for sec in build_report(load_runs([out]), examples=2).sections]
