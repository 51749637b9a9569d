"""End-to-end tests of the `dogbench` command on tiny synthetic datasets with tiny random timm models."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dogbench.cli import main

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]
FAST = ["--trials", "3", "--set", "tune.max_epochs=15", "--set", "evaluate.n_bootstrap=200", "--quiet"]


def _run(args: list[str], tmp_path: Path) -> int:
    return main(["run", *args, "--cache-dir", str(tmp_path / "cache"), *FAST])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("e2e")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox", "owl"), n_train=8, n_test=4)
    out = base / "run"
    assert _run(["--data", str(data), "--out", str(out), *TINY], base) == 0
    return base, data, json.loads((out / "results.json").read_text())


def test_run_writes_results_with_the_documented_schema(tiny_run: tuple[Path, Path, dict]) -> None:
    base, _, results = tiny_run
    out = base / "run"
    for name in ("config.json", "results.json", "results.csv", "summary.txt", "optuna.db"):
        assert (out / name).is_file(), name
    assert set(results["models"]) == {"cnn", "vit"}
    for label, m in results["models"].items():
        for key in ("backbone", "weights", "feature_dim", "params", "gflops", "head", "val", "test", "baseline",
                    "timing_s", "throughput_img_s"):
            assert key in m, (label, key)
        assert m["weights"] == "random" and m["params"] > 0 and m["gflops"] > 0
        assert 0.0 <= m["val"]["top1"] <= 1.0
        lo, hi = m["test"]["top1_ci95"]
        assert lo <= m["test"]["top1"] <= hi
        assert m["test"]["top5"] >= m["test"]["top1"]
        assert set(m["test"]["per_class"]) == {"cat", "dog", "fox", "owl"}
        assert {"top1", "top1_ci95"} <= set(m["baseline"]["test"])
        assert {"extract", "tune", "fit", "evaluate"} <= set(m["timing_s"])
        assert (out / label / "head" / "head.safetensors").is_file()
        with np.load(out / label / "predictions.npz") as npz:
            assert npz["proba"].shape == (16, 4)
            np.testing.assert_allclose(npz["proba"].sum(axis=1), 1.0, atol=1e-5)
    c = results["comparison"]
    assert (c["a"], c["b"]) == ("cnn", "vit")
    assert c["delta_top1"] == pytest.approx(results["models"]["cnn"]["test"]["top1"]
                                            - results["models"]["vit"]["test"]["top1"])
    assert 0.0 <= c["mcnemar_p"] <= 1.0
    d = results["dataset"]
    assert (d["n_train"] + d["n_val"], d["n_test"], d["n_classes"], d["skipped"]) == (32, 16, 4, 0)
    assert set(results["environment"]) >= {"python", "torch", "timm", "device"}
    assert results["config"]["tune"]["trials"] == 3
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"].startswith("tuned") for r in rows].count(True) == 2 and len(rows) == 4


def test_rerun_reuses_the_feature_cache_and_the_study(tiny_run: tuple[Path, Path, dict]) -> None:
    base, data, first = tiny_run
    out = base / "run"
    assert _run(["--data", str(data), "--out", str(out), *TINY], base) == 0
    second = json.loads((out / "results.json").read_text())
    for label in ("cnn", "vit"):
        assert second["models"][label]["cache_hit"] is True
        assert second["models"][label]["throughput_img_s"] is None
        assert second["models"][label]["feature_key"] == first["models"][label]["feature_key"]
        assert second["models"][label]["head"]["n_trials"] == 3  # the study was resumed, not re-run
        assert second["models"][label]["test"]["top1"] == first["models"][label]["test"]["top1"]


def test_stage_commands_match_run(tiny_run: tuple[Path, Path, dict], capsys: pytest.CaptureFixture) -> None:
    """extract, tune, evaluate in three processes' worth of calls give run's results.json, timings included."""
    base, data, first = tiny_run
    common = ["--data", str(data), *TINY, "--cache-dir", str(base / "cache"), *FAST]
    assert main(["extract", *common]) == 0
    assert "cached" in capsys.readouterr().out
    staged = base / "staged"
    assert main(["tune", *common, "--out", str(staged)]) == 0
    assert (staged / "cnn" / "tuning.json").is_file()
    assert main(["evaluate", str(staged), "--quiet", "--cache-dir", str(base / "cache")]) == 0
    results = json.loads((staged / "results.json").read_text())
    for label in ("cnn", "vit"):
        staged_model, run_model = results["models"][label], first["models"][label]
        for key in ("test", "val", "head", "baseline", "feature_key"):
            if key == "head":
                assert staged_model[key]["params"] == run_model[key]["params"]
            else:
                assert staged_model[key] == run_model[key], (label, key)
        assert set(staged_model["timing_s"]) == set(run_model["timing_s"])
        assert staged_model["timing_s"]["tune"] > 0 and staged_model["timing_s"]["baseline"] > 0
    assert set(results["timing_s"]) == set(first["timing_s"]) and results["timing_s"]["total"] > 0


def test_a_changed_tuning_config_starts_a_new_study(tiny_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """Into the same run folder: another validation split or search space must not reuse the old tuning."""
    base, data, first = tiny_run
    out = tmp_path / "r"
    args = ["--data", str(data), "--out", str(out), "--backbone", "cnn=test_resnet@random,input_size=32"]
    assert _run(args, base) == 0
    before = json.loads((out / "results.json").read_text())["models"]["cnn"]["head"]["study"]
    changed = [*args, "--set", "data.val_fraction=0.5", "--set", 'tune.heads=["linear"]']
    assert _run(changed, base) == 2  # the folder's config rules: another one is refused ...
    assert _run([*changed, "--force"], base) == 0  # ... unless it replaces it
    after = json.loads((out / "results.json").read_text())["models"]["cnn"]
    assert after["head"]["study"] != before and after["head"]["kind"] == "linear"
    assert after["head"]["n_trials"] == 3


def test_evaluate_checks_its_inputs_before_extracting(class_folder_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):  # RUN_DIR is required
        main(["evaluate", "--data", str(class_folder_root), "--quiet"])
    assert main(["evaluate", str(tmp_path / "none"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    from dogbench.config import resolve
    from dogbench.rundir import RunDir

    RunDir(tmp_path / "r").write_config(resolve({"data": {"root": str(class_folder_root)}},
                                                backbone_specs=TINY[1::2]))
    code = main(["evaluate", str(tmp_path / "r"), "--quiet", "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "run `dogbench tune" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "nothing may be extracted before the tuning is found"


def test_unreadable_images_are_skipped_and_named(bad_images_root: tuple[Path, list[str]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    root, bad_ids = bad_images_root
    backbone = ["--backbone", "cnn=test_resnet@random,input_size=32"]
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        assert _run(["--data", str(root), "--out", str(tmp_path / "r"), *backbone], tmp_path) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["dataset"]["skipped"] == 3
    assert sorted(f["id"] for f in results["dataset"]["skipped_files"]) == sorted(bad_ids)
    printed = capsys.readouterr().out
    assert "3 skipped" in printed
    assert all(f"skipped {bad}:" in printed for bad in bad_ids)

    # --strict: fatal, naming the file, whether the features are cached already or not
    code = _run(["--data", str(root), "--out", str(tmp_path / "s"), *backbone, "--strict"], tmp_path)
    err = capsys.readouterr().err
    assert code == 2
    assert "--strict" in err and any(bad in err for bad in bad_ids)
    code = _run(["--data", str(root), "--out", str(tmp_path / "s"), *backbone, "--strict"], tmp_path / "fresh")
    err = capsys.readouterr().err
    assert code == 2
    assert "--strict" in err and any(bad in err for bad in bad_ids)
    assert "Traceback" not in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_default_run_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    """The README's main job offline: no dataset, the archive server unreachable -> one message, exit 2."""
    env = {**os.environ, "DOGBENCH_CACHE": str(tmp_path / "cache"),
           "DOGBENCH_DATA_URL": f"http://127.0.0.1:{_closed_port()}/"}
    proc = subprocess.run([sys.executable, "-m", "dogbench.cli", "run", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "download it or point --data at it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--backbone", "x=vit_smal@random"], "Unknown backbone 'vit_smal'"),
        (["--backbone", "x"], "expected LABEL=MODEL"),
        (["--set", "tune.trails=3"], "Did you mean 'trials'"),
        (["--precision", "fp8"], "auto, fp32, bf16, fp16"),
        (["--backbone", "x=resnet18@/nonexistent/w.safetensors"], "does not exist"),
        (["--device", "gpu"], "is not a device"),
        pytest.param(["--device", "cuda", "--backbone", "x=test_resnet@random"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["--trials", "0"], "tune.trials must be >= 1"),
        (["--data", "/nonexistent/dogs"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_clear_error(args: list[str], needle: str, class_folder_root: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "--data", str(class_folder_root), "--out", str(tmp_path / "r"), "--quiet",
                 "--cache-dir", str(tmp_path / "cache"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_run_on_the_official_layout_with_box_crops(official_root: Path, tmp_path: Path) -> None:
    """Stanford Dogs' own layout (.mat lists, XML boxes), cropped to the boxes: the crop changes the features."""
    backbone = ["--backbone", "cnn=test_resnet@random,input_size=32"]
    out = tmp_path / "r"
    assert _run(["--data", str(official_root), "--out", str(out), *backbone, "--crop-to-box"], tmp_path) == 0
    cropped = json.loads((out / "results.json").read_text())
    assert cropped["dataset"]["layout"] == "stanford-dogs"
    assert cropped["dataset"]["split_source"] == "official-lists"
    assert cropped["config"]["data"]["crop_to_box"] is True
    assert _run(["--data", str(official_root), "--out", str(tmp_path / "full"), *backbone], tmp_path) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert full["models"]["cnn"]["feature_key"] != cropped["models"]["cnn"]["feature_key"]


def test_box_ablation_gives_box_and_whole_rows_of_one_run(official_root: Path, tmp_path: Path) -> None:
    """data.box_ablation: every backbone as a box-cropped and a whole-image row, compared on the same test images;
    each head records its own crop setting and predicts with it."""
    import dogbench

    out = tmp_path / "r"
    args = ["--data", str(official_root), "--out", str(out), "--backbone", "cnn=test_resnet@random,input_size=32",
            "--crop-to-box", "--box-ablation"]
    assert _run(args, tmp_path) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["cnn", "cnn-whole"]
    saved = {b["label"]: b["crop_to_box"] for b in results["config"]["backbones"]}
    assert saved == {"cnn": True, "cnn-whole": False}
    cnn, whole = results["models"]["cnn"], results["models"]["cnn-whole"]
    assert cnn["feature_key"] != whole["feature_key"]
    assert cnn["test"]["n"] == whole["test"]["n"] > 0
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [("cnn", "cnn-whole")]
    for label, crop in saved.items():
        head = json.loads((out / label / "head" / "head.json").read_text())
        assert head["identity"]["features"]["crop_to_box"] is crop
    # the saved config does not expand twice, and both heads load and predict with their own crop setting
    assert _run(["--data", str(official_root), "--out", str(out), "--backbone",
                 "cnn=test_resnet@random,input_size=32", "--crop-to-box", "--box-ablation"], tmp_path) == 0
    run = dogbench.load_run(out)
    assert list(run.models) == ["cnn", "cnn-whole"]
    image = next((official_root / "Images").rglob("*.jpg"))
    assert (run.models["cnn"].crop_to_box, run.models["cnn-whole"].crop_to_box) == (True, False)
    assert set(run.predict([image])[0].top) == {"cnn", "cnn-whole"}


def test_classes_runs_on_a_subset_and_its_heads_know_only_those(class_folder_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["--data", str(class_folder_root), "--out", str(out), "--backbone", "cnn=test_resnet@random,input_size=32",
            "--classes", "2"]
    assert _run(args, tmp_path) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["n_classes"] == 2 and results["config"]["data"]["classes"] == 2
    head = json.loads((out / "cnn" / "head" / "head.json").read_text())
    assert len(head["class_names"]) == 2


def test_box_ablation_without_boxes_is_one_clear_error(class_folder_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "--data", str(class_folder_root), "--out", str(tmp_path / "r"), "--box-ablation",
                 "--cache-dir", str(tmp_path / "cache"), *TINY, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "no annotated boxes" in err and "Traceback" not in err


def test_a_dataset_without_test_images_fails_before_any_model_is_loaded(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from conftest import make_class_folder_layout

    root = make_class_folder_layout(tmp_path / "d", n_train=3, n_test=1)
    for image in (root / "test").rglob("*.*"):
        image.unlink()
    code = main(["run", "--data", str(root), "--out", str(tmp_path / "r"), "--quiet", *TINY,
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "0 test images" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_explain_writes_an_overlay_per_model_for_a_photo(tiny_run: tuple[Path, Path, dict],
                                                         capsys: pytest.CaptureFixture) -> None:
    base, data, _ = tiny_run
    photo = sorted(p for p in (data / "test" / "fox").iterdir() if not p.name.startswith("."))[0]
    out = base / "explain-cli"
    assert main(["explain", str(base / "run"), str(photo), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "explanations.json").read_text())
    assert [(r["label"], r["method"]) for r in records] == [("cnn", "grad-cam"), ("vit", "attention rollout")]
    for r in records:
        assert (out / r["png"]).read_bytes()[:4] == b"\x89PNG" and len(r["top3"]) == 3
        assert str(out / r["png"]) in printed
    assert (out / f"{photo.stem}.png").is_file() and f"side by side: {out / (photo.stem + '.png')}" in printed
    assert main(["explain", str(base / "run"), str(base / "nope.jpg")]) == 2
    assert f"{base / 'nope.jpg'} does not exist" in capsys.readouterr().err


def _one_photo(data: Path, breed: str) -> Path:
    return sorted(p for p in (data / "test" / breed).iterdir() if p.suffix in (".jpg", ".png"))[0]


def test_explain_writes_outside_the_run_folder_by_default(tiny_run: tuple[Path, Path, dict], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    base, data, _ = tiny_run
    run = base / "run"
    photo = _one_photo(data, "owl")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    monkeypatch.chdir(tmp_path)
    assert main(["explain", str(run), str(photo)]) == 0
    out = tmp_path / "explanations" / "run"  # explanations/<the run folder's name> in the current folder
    assert [r["label"] for r in json.loads((out / "explanations.json").read_text())] == ["cnn", "vit"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "the run folder was written"
    assert f"explanations: {out}" in capsys.readouterr().out


def test_predict_gives_a_line_to_each_missing_or_unreadable_file_and_predicts_the_rest(
        tiny_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, data, _ = tiny_run
    photo, missing, text = _one_photo(data, "cat"), tmp_path / "missing.jpg", tmp_path / "notadog.jpg"
    text.write_text("hello, I am a shopping list\n")
    run = str(base / "run")
    assert main(["predict", run, str(missing), str(photo), str(text), "--top-k", "2", "--quiet"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith(str(photo))] == [[str(photo), "cnn"],
                                                                                  [str(photo), "vit"]]
    assert [line.split() for line in lines if str(missing) in line] == [[str(missing), "-", "does", "not", "exist"]]
    said = [line for line in lines if str(text) in line]
    assert len(said) == 1 and said[0].count(str(text)) == 1, said  # the path once
    assert said[0].split(None, 2)[2] == "is a text file, not an image, despite its .jpg name"
    assert "cannot identify" not in out and "cannot read image" not in out
    assert f"predicted 1 image with cnn, vit ({run}); 2 files missing or unreadable" in err
    # JSON: one entry per file in the order given, the errors in dogbench's words
    assert main(["predict", run, str(missing), str(photo), str(text), "--format", "json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(p["image"], p["error"]) for p in doc["predictions"]] == [
        (str(missing), f"{missing} does not exist"), (str(photo), None),
        (str(text), f"{text} is a text file, not an image, despite its .jpg name")]
    # --strict stops at the first one, before any model is loaded
    assert main(["predict", run, str(photo), str(missing), "--strict", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{missing} does not exist (--strict stops" in err and "Traceback" not in err


def test_predict_exits_2_when_nothing_could_be_predicted(tiny_run: tuple[Path, Path, dict], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    base, _, _ = tiny_run
    text, empty = tmp_path / "notadog.jpg", tmp_path / "empty.png"
    text.write_text("not a dog\n")
    empty.write_bytes(b"")
    assert main(["predict", str(base / "run"), str(text), str(empty), str(tmp_path / "gone.jpg")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "nothing could be predicted: none of the 3 files given could be read" in err
    assert f"{text} is a text file" in err and f"{empty} is empty (0 bytes)" in err
    assert f"{tmp_path / 'gone.jpg'} does not exist" in err and "Traceback" not in err


def test_strict_keeps_what_was_predicted_before_a_file_corrupt_past_its_header(
        tiny_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, data, _ = tiny_run
    photo = _one_photo(data, "dog")
    from PIL import Image

    cut, buffer = tmp_path / "cut.jpg", io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # the header is fine, the pixels stop halfway
    run = str(base / "run")
    assert main(["predict", run, str(photo), str(cut), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith(str(cut)) and "is corrupt or truncated" in line for line in out.splitlines())
    assert main(["predict", run, str(photo), str(cut), "--strict", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(str(photo))] == [
        [str(photo), "cnn"], [str(photo), "vit"]]  # predicted before the bad file: written, not lost
    assert str(cut) not in out and f"{cut} is corrupt or truncated" in err and "--strict" in err


def test_models_prints_the_vit_paper_rows_from_the_models(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("vit_", "resnet50"))}
    # layers, hidden D, MLP, heads, patch, params (M) counted from the model, paper params (M), = paper
    assert rows["vit_b16"][2:] == ["12", "768", "3072", "12", "16", "86.6", "86", "yes"]
    assert rows["vit_l16"][2:] == ["24", "1024", "4096", "16", "16", "304.3", "307", "yes"]
    assert rows["vit_h14"][2:] == ["32", "1280", "5120", "16", "14", "632.0", "632", "yes"]
    assert rows["resnet50"][1] == "resnet50.tv_in1k" and "25.6" in rows["resnet50"]
    assert main(["models", "resnet50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["stages"] == [3, 4, 6, 3]
