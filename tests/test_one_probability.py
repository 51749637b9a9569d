"""One probability per (model, photo) everywhere (issue 27): `predict`, `explain`, the report's explanation panel
and the demo's ``/classify`` give the same calibrated top-3 for the same photo, to 1e-6.

The run's temperatures are set to 2.5 first, so calibrated and uncalibrated numbers differ and a surface that
showed the head's own probabilities would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_class_folder_layout
from dogbench.cli import main
from dogbench.heads import META_FILE
from dogbench.rundir import EXPLANATIONS_FILE, RunDir

TINY_RUN = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32",
            "--trials", "2", "--set", "tune.max_epochs=8", "--set", "evaluate.n_bootstrap=100",
            "--set", "report.explain=1", "--set", "report.examples=2", "--quiet"]
LABELS = ("cnn", "vit")


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny finished run whose heads carry temperature 2.5, its report's explanations made with it; the photo
    the report explains."""
    base = tmp_path_factory.mktemp("one-probability")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox", "owl"), n_train=8, n_test=4)
    run_dir = base / "run"
    assert main(["run", "--data", str(data), "--out", str(run_dir), "--cache-dir", str(base / "cache"),
                 *TINY_RUN]) == 0
    for label in LABELS:
        meta_path = RunDir(run_dir).head_dir(label) / META_FILE
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "temperature": 2.5}))
    records = json.loads((run_dir / "explanations" / EXPLANATIONS_FILE).read_text())
    return run_dir, Path(records[0]["image"])  # explained with the old temperature: the report makes them again


def _top3(pairs) -> list[tuple[str, float]]:
    return [(str(name), float(p)) for name, p in pairs][:3]


def _same(surface: str, got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want], surface
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], rtol=0, atol=1e-6, err_msg=surface)


def test_predict_explain_report_and_demo_show_one_top3(calibrated_run: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dogbench.report import plots
    from dogbench.serve import Demo, ServeConfig

    run_dir, photo = calibrated_run
    assert main(["predict", str(run_dir), str(photo), "--top-k", "3", "--format", "json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"][0]["models"]
    want = {label: _top3((t["breed"], t["p"]) for t in printed[label]) for label in LABELS}

    assert main(["explain", str(run_dir), str(photo), "--out", str(tmp_path / "explain")]) == 0
    explained = json.loads((tmp_path / "explain" / EXPLANATIONS_FILE).read_text())
    for record in explained:
        _same(f"explain {record['label']}", _top3(record["top3"]), want[record["label"]])

    drawn: list[list] = []  # the report's explanation panels: what each panel prints under its overlay
    real_figure = plots.explanation_figure

    def spy(panels, **kwargs):
        drawn.extend(panels)
        return real_figure(panels, **kwargs)

    monkeypatch.setattr(plots, "explanation_figure", spy)
    assert main(["report", str(run_dir), "--quiet"]) == 0
    panels = {title.split(":")[0]: top for title, _, top in drawn if title.split(":")[0] in LABELS}
    assert set(panels) == set(LABELS), [t for t, _, _ in drawn]
    for label in LABELS:
        _same(f"report panel {label}", _top3(panels[label]), want[label])
    records = json.loads((run_dir / "explanations" / EXPLANATIONS_FILE).read_text())
    assert all(r["calibrated"] is True and r["head"] == RunDir(run_dir).head_digest(r["label"]) for r in records)

    demo = Demo.from_run_dir(run_dir, ServeConfig(top_k=3))
    # the answer /classify serves (tests/test_serve.py's gradio_client test checks the endpoint equals it to 1e-6)
    answer = demo.answer(photo, explain=False).to_dict()
    for label in LABELS:
        _same(f"demo /classify {label}", _top3((t["breed"], t["p"]) for t in answer["models"][label]["top"]),
              want[label])
