"""`dogbench export`: a run's model in timm's own format (plain timm reproduces predict's probabilities), as ONNX
(onnxruntime agrees), as a Space (app.py answers a Gradio client with predict's top-1), with a model card holding
the run's figures; bad input is refused by name, and a failed export leaves nothing behind.

The integration test at the end exports EfficientNet-Lite0 with its real weights and checks 20 real photos.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dogbench
from conftest import CNN, DEV, ORIGINALS, free_port, gradio_or_skip, make_class_folder_layout
from dogbench.cli import main
from dogbench.export import ExportConfig, ExportError, Format, MLPNotExpressible, export_run, load_export
from dogbench.export.onnx_model import max_opset

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime comes with the export extra")

FAST = ["--trials", "1", "--set", "tune.max_epochs=5", "--set", "tune.heads=[\"logistic\"]", "--set",
        "tune.baseline=false", "--set", "evaluate.n_bootstrap=50", "--set", "report.enabled=false", "--quiet"]
TEMPERATURE = 0.6  # set on the frozen head, so the folding of a temperature is tested (the tiny run fits T = 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a frozen (logistic, standardised, T = 0.6) and a LoRA-fine-tuned row of a tiny random ResNet,
    decoding with PIL as plain timm does."""
    base = tmp_path_factory.mktemp("export")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=6, n_test=3)
    assert main(["finetune", "--data", str(data), "--out", str(base / "run"), "--backbone",
                 "cnn=test_resnet@random,input_size=32", *FAST, "--set", 'features.decoder="pil"', "--cache-dir",
                 str(base / "cache"), "--methods", "lora", "--epochs", "1", "--set", "finetune.batch_size=4"]) == 0
    meta_path = base / "run" / "cnn" / "head" / "head.json"
    meta = json.loads(meta_path.read_text())
    meta["temperature"] = TEMPERATURE
    meta_path.write_text(json.dumps(meta))
    return base / "run"


@pytest.fixture(scope="module")
def photos(tiny_run: Path) -> list[Path]:
    return sorted(p for p in (tiny_run.parent / "data" / "test").rglob("*") if p.suffix in (".jpg", ".png"))


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """The frozen row in every format (the timm format, ONNX, a Space), checked on the run's own test images."""
    out = tmp_path_factory.mktemp("exports") / "cnn"
    report = export_run(tiny_run, out, ExportConfig(formats=(Format.TIMM, Format.ONNX, Format.SPACE), check_images=4),
                        model="cnn")
    return out, report


@pytest.fixture(scope="module")
def space_server(exported, tmp_path_factory: pytest.TempPathFactory):
    """`python app.py` in a copy of the Space folder (beside nothing of dogbench's), on a free port of 127.0.0.1;
    (url, process), or None without gradio. Started by the first test, so that it boots (importing gradio and
    timm takes seconds) while the other tests run."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        yield None
        return
    space = shutil.copytree(exported[0], tmp_path_factory.mktemp("space") / "space")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_SERVER_NAME", None)
    server = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    yield f"http://127.0.0.1:{port}/", server
    server.terminate()
    server.wait(timeout=30)
    server.stdout.close()


def _plain_timm(folder: Path, photos: list[Path]) -> np.ndarray:
    """The three lines of the model card: plain timm and its own PIL transform, no dogbench."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.inference_mode():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
        return model(x).softmax(-1).double().numpy()


def _onnx(folder: Path, photos: list[Path]) -> np.ndarray:
    """The card's onnxruntime lines: resized and cropped uint8 pixels in, as the file's metadata says."""
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])
    resize_crop = timm.data.create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                                             crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], use_prefetcher=True)
    pixels = torch.stack([resize_crop(Image.open(p).convert("RGB")) for p in photos]).numpy()
    return session.run(["probabilities"], {"pixels": pixels})[0].astype(np.float64)


# ---------------------------------------------------------------- the formats reproduce predict


@pytest.mark.usefixtures("space_server")  # starts booting now, for the Space test at the end
def test_plain_timm_reproduces_predicts_calibrated_probabilities(tiny_run, photos, exported) -> None:
    out, report = exported
    want = dogbench.load_run(tiny_run).predict_proba(photos)["cnn"]
    got = _plain_timm(out, photos)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [c.format for c in report.checks] == [Format.TIMM, Format.ONNX]
    assert all(c.max_abs_diff <= 1e-5 and c.top1_agree == c.n_images for c in report.checks)
    written = {p.name: p.stat().st_size for p in out.iterdir()}
    assert report.to_dict()["files"] == written and set(written) == {"config.json", "model.safetensors", "model.onnx",
                                                                       "README.md", "app.py", "requirements.txt"}
    assert "exported cnn (test_resnet): asked for" in report.summary()
    # the temperature is in the classifier: undoing it changes the numbers
    assert np.abs(got - _softmax(np.log(want) * TEMPERATURE)).max() > 1e-3
    config = json.loads((out / "config.json").read_text())
    recorded = json.loads((tiny_run / "results.json").read_text())["models"]["cnn"]["preprocess"]
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == ["cat", "dog", "fox"]
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std"):
        assert config["pretrained_cfg"][key] == recorded[key], key
    assert config["dogbench"]["label"] == "cnn" and config["dogbench"]["temperature"] == TEMPERATURE


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_onnxruntime_agrees_with_predict_at_any_batch(tiny_run, photos, exported) -> None:
    import onnx

    out, report = exported
    want = dogbench.load_run(tiny_run).predict_proba(photos)["cnn"]
    np.testing.assert_allclose(_onnx(out, photos), want, atol=1e-4)
    np.testing.assert_allclose(_onnx(out, photos[:1]), want[:1], atol=1e-4)  # batch 1: the batch is dynamic
    assert report.opset == onnx.load(str(out / "model.onnx")).opset_import[0].version
    assert f"opset {report.opset}" in (out / "README.md").read_text()


def test_load_export_gives_predicts_top_k(tiny_run, photos, exported) -> None:
    model = load_export(exported[0])
    want = dogbench.load_run(tiny_run).predict(photos, top_k=3)
    for photo, prediction in zip(photos, want, strict=True):
        got = model.top(photo, 3)
        assert [b for b, _ in got] == [b for b, _ in prediction.top["cnn"]]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in prediction.top["cnn"]], atol=1e-5)
    assert model.label == "cnn" and model.classes == ("cat", "dog", "fox")
    with pytest.raises(ExportError, match="not a dogbench export"):
        load_export(photos[0].parent)


def test_the_lora_row_is_exported_merged(tiny_run, photos, exported, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    report = export_run(tiny_run, tmp_path / "lora", ExportConfig(formats=("timm",), check_images=4),
                        model="cnn/lora")
    assert report.label == "cnn/lora" and report.why == "asked for"
    want = dogbench.load_run(tiny_run).predict_proba(photos)["cnn/lora"]
    np.testing.assert_allclose(_plain_timm(tmp_path / "lora", photos), want, atol=1e-5)
    tuned, frozen = load_file(tmp_path / "lora" / "model.safetensors"), load_file(exported[0] / "model.safetensors")
    assert set(tuned) == set(frozen) and not any(k.startswith("base_model") or "lora" in k for k in tuned)
    assert any(not torch.equal(tuned[k], frozen[k]) for k in tuned if not k.startswith("fc."))  # merged deltas
    assert not (tmp_path / "lora" / "model.onnx").exists()


# ---------------------------------------------------------------- MLP heads


def _with_mlp_head(run: Path, copy: Path) -> Path:
    """A copy of ``run`` whose frozen cnn head is an MLP (fitted on random features of the right width)."""
    from dogbench.heads import MLPHead

    shutil.copytree(run, copy)
    head_dir = copy / "cnn" / "head"
    meta = json.loads((head_dir / "head.json").read_text())
    rng = np.random.default_rng(0)
    head = MLPHead(hidden_size=8, max_epochs=2, batch_size=8).fit(
        rng.normal(size=(12, meta["n_features_in"])).astype(np.float32), np.arange(12) % 3)
    head.save(head_dir, identity=meta["identity"], class_names=meta["class_names"], temperature=0.8)
    return copy


def test_an_mlp_head_goes_to_onnx_where_timm_cannot_hold_it(tiny_run, photos, tmp_path: Path) -> None:
    run = _with_mlp_head(tiny_run, tmp_path / "mlp-run")
    with pytest.raises(MLPNotExpressible, match="--format onnx") as refused:
        export_run(run, tmp_path / "timm", ExportConfig(formats=("timm", "onnx")), model="cnn")
    assert "test_resnet has no MLP classifier" in str(refused.value)
    assert not (tmp_path / "timm").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mlp-run"]
    report = export_run(run, tmp_path / "onnx", ExportConfig(formats=("onnx",), check_images=4), model="cnn")
    want = dogbench.load_run(run).predict_proba(photos)["cnn"]
    np.testing.assert_allclose(_onnx(tmp_path / "onnx", photos), want, atol=1e-4)
    assert report.checks[0].max_abs_diff <= 1e-4 and not (tmp_path / "onnx" / "config.json").exists()


def test_an_mlp_head_becomes_timms_classifier_where_timm_has_one(tmp_path: Path) -> None:
    """ConvNeXt's head_hidden_size builds Linear -> GELU -> Linear: standardisation, weights and temperature
    fold into it, and the saved folder loads back with plain timm."""
    from dogbench.backbones import load_backbone
    from dogbench.config import BackboneConfig
    from dogbench.evaluate import apply_temperature, full_proba
    from dogbench.export.timm_model import classifier_model, save_timm
    from dogbench.heads import MLPHead

    backbone = load_backbone(BackboneConfig(label="c", model="test_convnext", weights="random", input_size=32))
    x = backbone.preprocess.normalize(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        features = backbone.model(x).numpy()
    head = MLPHead(hidden_size=8, max_epochs=3, batch_size=4).fit(features, np.array([0, 1, 3, 0, 1, 3]))
    want = apply_temperature(full_proba(head.predict_proba(features), head.classes_, 5), 0.7)  # class 2, 4 unseen
    save_timm(classifier_model(backbone, head, 5, 0.7), tmp_path, classes=tuple("abcde"),
              preprocess=backbone.preprocess.to_dict(), record={})
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.inference_mode():
        got = model(x).softmax(-1).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["head_hidden_size"] == 8
    assert (got[:, [2, 4]] == 0).all()


# ---------------------------------------------------------------- bad input: named, and nothing written


def test_bad_input_is_refused_by_name_and_nothing_is_written(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        (dict(model="dog"), "has no model 'dog'. Its models: cnn, cnn/lora"),
        (dict(cfg=ExportConfig(formats=("onnx",), opset=99)),
         f"cannot write ONNX opset 99 for this export: choose --opset 14 to {max_opset()}, or"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            export_run(tiny_run, out, **kwargs)
        assert not out.exists()
    with pytest.raises(ExportError, match="Unknown export format 'tim'. Did you mean 'timm'"):
        ExportConfig(formats=("tim",))
    with pytest.raises(ExportError, match="--opset must be a positive whole number"):
        ExportConfig(opset=0)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished, ignore=shutil.ignore_patterns("results.*", "summary.txt"))
    with pytest.raises(ExportError, match=f"{unfinished} is not a finished run.*results.json is missing"):
        export_run(unfinished, out)
    with pytest.raises(ExportError, match="is not a finished run"):
        export_run(tmp_path / "nowhere", out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty: give a new folder"):
        export_run(tiny_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "unfinished"]  # no temporary left


def test_a_check_over_tolerance_fails_the_export_and_leaves_nothing(tiny_run, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dogbench.export import run as export_module

    def shifted(path: Path, pixels: torch.Tensor) -> np.ndarray:
        proba = original(path, pixels)
        return proba + np.array([3e-4, -3e-4, 0.0])

    original = export_module.onnx_proba
    monkeypatch.setattr(export_module, "onnx_proba", shifted)
    (tmp_path / "out").mkdir()  # an empty --out is fine, and stays as it was on failure
    with pytest.raises(ExportError, match=r"onnx export disagrees with dogbench's predict path: max \|p - "
                                          r"p_predict\| = 3\.0\de-04 \(tolerance 0\.0001\)"):
        export_run(tiny_run, tmp_path / "out", ExportConfig(check_images=2), model="cnn")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- the model card


def test_the_card_holds_the_runs_figures(tiny_run, exported) -> None:
    from dogbench.results import p_value

    out, report = exported
    card = (out / "README.md").read_text()
    results = json.loads((tiny_run / "results.json").read_text())
    m = results["models"]["cnn"]
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for line in ("library_name: timm", "pipeline_tag: image-classification", "- image-classification",
                 "metrics:\n- accuracy\n- f1", f"datasets:\n- {results['dataset']['name'].lower()}",
                 "sdk: gradio", "app_file: app.py"):
        assert line in header, line
    lo, hi = m["test"]["top1_ci95"]
    ece = m["calibration"]["test"]
    for figure in (f"{m['test']['top1'] * 100:.2f}%", f"{lo * 100:.2f}% to {hi * 100:.2f}%",
                   f"top-5 accuracy | {m['test']['top5'] * 100:.2f}%", f"macro-F1 | {m['test']['macro_f1']:.4f}",
                   f"{ece['before']['ece']:.4f} before, {ece['after']['ece']:.4f} after",
                   f"{m['head']['n_trials']} trials", f"validation split ({results['dataset']['n_val']} images"):
        assert figure in body, figure
    mine = [c for c in results["comparisons"] if "cnn" in (c["a"], c["b"])]
    won = [c for c in mine if c["delta_top1"] != 0 and (c["delta_top1"] > 0) == (c["a"] == "cnn")]
    assert mine and ("## The comparison it won" if won else "## Comparisons (it won none)") in body
    for c in won or mine:
        other = c["b"] if c["a"] == "cnn" else c["a"]
        assert f"McNemar {p_value(c['mcnemar_p'])}, n = {c['n']} test images" in body and f"({other})" in body
    digest = hashlib.sha256(json.dumps(results["config"], sort_keys=True).encode()).hexdigest()
    assert f"`{digest}`" in body and f"dogbench {dogbench.__version__}" in body
    assert 'timm.create_model("local-dir:' in body and "onnxruntime.InferenceSession" in body
    assert "hf upload USER/REPO" in body and "Caveat" not in body  # random weights: nothing leaked
    assert [c.describe() in body for c in report.checks] == [True, True]


# ---------------------------------------------------------------- the Space


def test_the_space_folder_runs_as_it_is_and_answers_with_predicts_top1(tiny_run, photos, exported,
                                                                       space_server) -> None:
    gradio_or_skip()
    from gradio_client import Client, handle_file

    assert {"app.py", "requirements.txt"} <= {p.name for p in exported[0].iterdir()}
    assert "timm>=" in (exported[0] / "requirements.txt").read_text()
    client = _client(Client, *space_server)
    want = dogbench.load_run(tiny_run).predict(photos[:2], top_k=1)
    for photo, prediction in zip(photos[:2], want, strict=True):
        answer = client.predict(handle_file(str(photo)), api_name="/predict")
        assert answer["label"] == prediction.top["cnn"][0][0], (photo.name, answer)


def _client(client_class, url: str, server: subprocess.Popen, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            return client_class(url, verbose=False)
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ---------------------------------------------------------------- EfficientNet-Lite0 and real photos


@pytest.mark.skipif(not (CNN.is_file() and DEV.is_dir() and ORIGINALS.is_dir()),
                    reason="../shared (EfficientNet-Lite0 weights, Stanford Dogs) is absent")
def test_efficientnet_lite0_export_agrees_with_predict_on_real_photos(tmp_path: Path) -> None:
    """20 full-size photos: plain timm (its own PIL transform) gives predict's top-1 on every one, and within 1e-4
    the probabilities of the same run decoding with PIL; onnxruntime agrees within 1e-4 too."""
    from dogbench.config import Precision
    from dogbench.device import Policy
    from dogbench.predictor import Predictor

    breeds = sorted(p.name for p in (ORIGINALS / "Images").iterdir())
    for breed in breeds:  # a small real slice: 5 training and 2 test photos of each of the originals' breeds
        shots = sorted((DEV / "Images" / breed).iterdir())[:7]
        for i, shot in enumerate(shots):
            folder = tmp_path / "dogs" / ("train" if i < 5 else "test") / breed
            folder.mkdir(parents=True, exist_ok=True)
            (folder / shot.name).symlink_to(shot)
    assert main(["finetune", "--data", str(tmp_path / "dogs"), "--out", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--backbone", f"cnn=tf_efficientnet_lite0@{CNN}", *FAST, "--methods",
                 "lora", "--epochs", "1", "--set", "finetune.batch_size=4"]) == 0  # a frozen and a LoRA row
    photos = sorted((ORIGINALS / "Images").rglob("*.jpg"))[::4][:20]
    report = export_run(tmp_path / "run", tmp_path / "out", ExportConfig(photos=tuple(photos), check_images=20),
                        model="cnn")
    assert report.label == "cnn" and report.why == "asked for"
    onnx_check = next(c for c in report.checks if c.format is Format.ONNX)  # onnxruntime on predict's pixels
    assert onnx_check.n_images == 20 and onnx_check.max_abs_diff <= 1e-4 and onnx_check.top1_agree == 20

    predictor = dogbench.load_run(tmp_path / "run").models["cnn"]
    assert predictor.decoder == "auto"
    predicted = predictor.predict_proba(photos)[0]
    pil = Predictor("cnn", predictor.backbone, predictor.head, classes=predictor.classes,
                    features=replace(predictor.features_cfg, decoder="pil", reduced_decode=False),
                    policy=Policy.resolve("cpu", Precision.FP32))
    decoded_with_pil = pil.predict_proba(photos)[0]
    plain = _plain_timm(tmp_path / "out", photos)
    assert (plain.argmax(1) == predicted.argmax(1)).all()
    np.testing.assert_allclose(plain, decoded_with_pil, atol=1e-4)
    np.testing.assert_allclose(_onnx(tmp_path / "out", photos[:4]), decoded_with_pil[:4], atol=1e-4)

    lora = export_run(tmp_path / "run", tmp_path / "lora", ExportConfig(formats=("timm",), photos=tuple(photos),
                                                                         check_images=20),
                      model="cnn/lora")  # the fine-tuned row, its LoRA merged (ONNX: the same graph as above)
    assert [(c.n_images, c.top1_agree) for c in lora.checks] == [(20, 20)]
    assert max(c.max_abs_diff for c in lora.checks) <= 1e-4
    tuned = dogbench.load_run(tmp_path / "run").models["cnn/lora"].predict_proba(photos)[0]
    assert (_plain_timm(tmp_path / "lora", photos).argmax(1) == tuned.argmax(1)).all()


def test_the_export_command_writes_the_folder_and_says_what_and_why(tiny_run, tmp_path: Path, capsys) -> None:
    """`dogbench export RUN --out DIR`: the best model by validation top-1 (said so), timm's format, its checks."""
    out = tmp_path / "best"
    assert main(["export", str(tiny_run), "--out", str(out), "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("exported cnn") and "the best by validation top-1" in printed.splitlines()[0]
    assert "check timm: max |p - p_predict|" in printed
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as any folder this user makes, not mkdtemp's 0700
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2  # never over an export


def test_the_card_renders_in_headless_chromium_with_the_runs_figures(tiny_run, exported, tmp_path: Path) -> None:
    """The card as a Hub page shows it: its Markdown (after the metadata header) rendered with tables, in Chromium."""
    from markdown_it import MarkdownIt

    from browser import check_page

    out, _ = exported
    body = (out / "README.md").read_text().split("---\n", 2)[2]
    html = tmp_path / "card.html"
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    html.write_text(f"<!doctype html><meta charset='utf-8'><body>{rendered}")
    page = check_page(html, tmp_path / "card.png")
    assert page.page_errors == [] and page.console_errors == [] and page.broken_images == []
    m = json.loads((tiny_run / "results.json").read_text())["models"]["cnn"]
    text = " ".join(page.text.split())
    assert f"{m['test']['top1'] * 100:.2f}%" in text
    assert "top-5 accuracy\t" in page.text and "| top-5 accuracy |" not in text  # a table's cells, not its source


def test_serve_takes_an_export_folder_and_runs_its_space_app(tiny_run, exported, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`dogbench serve EXPORT_DIR` runs the export's Space app; a run folder still gets the full demo."""
    from dogbench.export import space
    from dogbench.export.spec import is_export

    out, _ = exported
    assert is_export(out) and not is_export(tiny_run) and not is_export(tmp_path)
    served = []
    monkeypatch.setattr(space, "serve_export", lambda folder, **kw: served.append((Path(folder), kw)))
    assert main(["serve", str(out), "--port", "0"]) == 0
    assert served == [(out, {"host": "127.0.0.1", "port": 0})]
    with pytest.warns(UserWarning, match="--max-upload-mb, --concurrency do not apply to an export folder"):
        assert main(["serve", str(out), "--port", "0", "--max-upload-mb", "5", "--concurrency", "4"]) == 0


def test_onnx_without_its_extra_is_refused_in_words_before_anything_is_written(tiny_run, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"--format onnx needs onnxruntime: pip install 'dogbench\[export\]', or "
                                          "export --format timm"):
        export_run(tiny_run, out, ExportConfig(formats=("onnx",)))
    assert not out.exists() and list(tmp_path.iterdir()) == []
