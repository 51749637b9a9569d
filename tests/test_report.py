"""The report: `dogbench run` writes report.html (self-contained) and report.md; `dogbench report` combines runs.

Tiny synthetic datasets and tiny random timm models; the browser check opens the page in headless Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from browser import check_layout, check_page
from dogbench.cli import main
from dogbench.config import ConfigError, resolve
from dogbench.report import ReportError, load_runs, select_examples
from dogbench.report.plots import breed_order
from dogbench.report.runs import ModelRun
from dogbench.results import verdict
from dogbench.rundir import RunFolderError

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]
FAST = ["--trials", "4", "--set", "tune.max_epochs=15", "--set", "evaluate.n_bootstrap=200", "--quiet"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two run folders on the same tiny dataset: both backbones, and the CNN alone with other tuning."""
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("report")
    data = make_class_folder_layout(base / "data", classes=("cat", "dog", "fox", "owl", "yak"), n_train=8, n_test=4)
    common = ["--data", str(data), "--cache-dir", str(base / "cache"), *FAST]
    assert main(["run", *common, "--out", str(base / "both"), *TINY]) == 0
    assert main(["run", *common, "--out", str(base / "cnn-only"), TINY[0], TINY[1], "--set", "tune.seed=1",
                 "--set", "report.explain=2"]) == 0
    return base, base / "both", base / "cnn-only"


def test_run_writes_a_self_contained_report(runs: tuple[Path, Path, Path]) -> None:
    _, run, _ = runs
    results = json.loads((run / "results.json").read_text())
    html = (run / "report.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # nothing to fetch: opens offline
    assert not re.search(r'(?:href|src)="(?:https?:)?//', html)
    assert _named_verdict(results) in html.replace("&#39;", "'")
    for header in ("test top-1 [95% CI]", "top-5", "macro-F1", "params", "GFLOPs", "img/s", "device"):
        assert header in html
    for section in ("Accuracy and compute", "Per-breed accuracy", "Confusions", "Head search (Optuna)",
                    "Test predictions, right and wrong", "Where the models look"):
        assert f">{section}</h2>" in html
    # every model: a confusion matrix, an optimisation history; both models in the explanations
    for label in ("cnn", "vit"):
        assert f"confusion matrix of {label}" in html and f"{label} optimisation history" in html
    records = json.loads((run / "explanations" / "explanations.json").read_text())
    assert {r["label"] for r in records} == {"cnn", "vit"}
    assert {r["method"] for r in records} == {"attention rollout", "grad-cam"}
    assert len({r["figure"] for r in records}) == 6  # report.explain


def test_markdown_report_links_files_that_exist(runs: tuple[Path, Path, Path]) -> None:
    _, run, _ = runs
    md = (run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 8
    for link in links:
        assert (run / link).is_file(), link
        assert (run / link).read_bytes()[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
    assert md.startswith("# test\\_resnet vs test\\_vit\n")  # the backbones by name, not by label (issue 27)


def test_random_weights_are_not_leaky_and_say_so(runs: tuple[Path, Path, Path]) -> None:
    _, run, _ = runs
    results = json.loads((run / "results.json").read_text())
    for m in results["models"].values():
        assert m["leaky"] is False and m["pretraining"] == "random initialisation (no pretraining)"
    assert "randomly initialised weights: a smoke test" in (run / "report.md").read_text()


def test_the_page_renders_in_headless_chromium(runs: tuple[Path, Path, Path]) -> None:
    _, run, _ = runs
    page = check_page(run / "report.html", ARTIFACTS / "report-tiny.png")
    assert page.images >= 15
    assert page.broken_images == [] and page.console_errors == [] and page.page_errors == []
    assert page.failed_requests == []
    results = json.loads((run / "results.json").read_text())
    assert _named_verdict(results) in page.text
    assert "test top-1 [95% CI]" in page.text
    assert page.screenshot.stat().st_size > 50_000


def _named_verdict(results: dict) -> str:
    from dogbench.names import model_name

    return verdict(results["comparison"], {k: model_name(m) for k, m in results["models"].items()})


def test_the_report_names_its_models_and_says_why(runs: tuple[Path, Path, Path]) -> None:
    """Issue 27: the title and the verdict name the backbones, the labels stay in brackets; who is who in full;
    a why paragraph with the run's numbers; no nested brackets in the caveats."""
    _, run, _ = runs
    report = json.loads((run / "report.json").read_text())
    assert report["title"] == "test_resnet vs test_vit"
    assert re.match(r"test_(resnet|vit) with random weights \((cnn|vit)\) beats test_(resnet|vit) with random "
                    r"weights \((cnn|vit)\) by \d+\.\d\d points", report["verdicts"][0]) or \
        "have the same test top-1" in report["verdicts"][0]
    md = (run / "report.md").read_text()
    assert "- cnn is test\\_resnet (timm test\\_resnet), weights from random initialisation" in md
    results = json.loads((run / "results.json").read_text())
    probe = {k: m["baseline"]["test"]["top1"] * 100 for k, m in results["models"].items()}
    assert "**Why.** " in md and all(f"{v:.1f}%" in md.split("**Why.** ")[1].split("\n")[0] for v in probe.values())
    for caveat in report["caveats"]:
        assert not re.search(r"\([^()]*\(", caveat), caveat


def test_the_page_keeps_anchors_clear_of_the_navigation_and_fits_1280(runs: tuple[Path, Path, Path],
                                                                       tmp_path: Path) -> None:
    """Every section the navigation links to starts below the sticky bar; no figure is wider than the window;
    and the check itself fails on a page without the anchor offsets and with an over-wide figure."""
    _, run, _ = runs
    good = check_layout(run / "report.html")
    assert good.page_errors == [] and good.covered == [] and good.too_wide == []
    html = (run / "report.html").read_text()
    broken = re.sub(r"\[id\] \{ scroll-margin-top[^}]*\}", "", html).replace(
        "figure img { max-width: 100%;", "figure img { min-width: 1400px;")
    (tmp_path / "broken.html").write_text(broken)
    bad = check_layout(tmp_path / "broken.html")
    assert bad.covered and "page" in bad.too_wide


def test_the_breeds_where_each_model_leads_are_five_each_in_the_verdicts_direction() -> None:
    from dogbench.report.sections import LEADERS, leaders_table

    rng = np.random.default_rng(0)
    a, b = _model(rng.random(300) < 0.3, "a"), _model(rng.random(300) < 0.8, "b")  # b wins
    names = [f"breed {i}" for i in range(12)]
    ra, rb = rng.uniform(0.0, 0.5, 12), rng.uniform(0.4, 1.0, 12)
    ra[3], rb[3] = 0.9, 0.1  # the one breed where a leads
    table = leaders_table(names, ra, rb, a, b)
    assert table.header[-1] == "b - a (points)" and table.header[2:4] == ["b", "a"]
    assert [row[0] for row in table.rows] == ["b"] * LEADERS + ["a"] * LEADERS
    diffs = [float(row[-1]) for row in table.rows]
    assert diffs[:LEADERS] == sorted(diffs[:LEADERS], reverse=True) and diffs[0] > 0
    assert diffs[LEADERS] == -80.0 and table.rows[LEADERS][1] == "breed 3"
    assert diffs[LEADERS:] == sorted(diffs[LEADERS:])


def test_several_runs_combine_into_one_comparison(runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
                                                  ) -> None:
    base, both, cnn_only = runs
    out = base / "combined"
    assert main(["report", str(both), str(cnn_only), "--out", str(out), "--explain", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    html = (out / "report.html").read_text()
    for key in ("both/cnn", "both/vit", "cnn-only/cnn"):
        assert key in html
    # the same CNN features, another study seed: compared on the same test images across the runs
    report = json.loads((out / "report.json").read_text())
    assert report["verdicts"][0].startswith("both: ") and "cnn-only: " not in " ".join(report["verdicts"])
    assert [v for v in report["verdicts"] if v.startswith("Across runs: test_resnet with random weights (both/cnn)")]
    assert "McNemar p" in html and "Every paired comparison" in html


def test_cross_run_comparisons_are_paired_on_shared_test_images(runs: tuple[Path, Path, Path]) -> None:
    from dogbench.report.runs import comparisons

    _, both, cnn_only = runs
    loaded = load_runs([both, cnn_only])
    comps = comparisons(loaded, n_resamples=200)
    across = [c for c in comps if c.get("across_runs")]
    assert {(c["a"], c["b"]) for c in across} == {("both/cnn", "cnn-only/cnn"), ("both/vit", "cnn-only/cnn")}
    a, b = loaded[0].models["both/cnn"], loaded[1].models["cnn-only/cnn"]
    c = next(c for c in across if c["a"] == "both/cnn")
    assert c["n"] == len(a.sample_ids) and c["top1_a"] == pytest.approx(a.correct.mean())
    assert c["top1_b"] == pytest.approx(b.correct.mean())


def test_report_on_a_folder_without_results_says_what_to_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json is missing" in capsys.readouterr().err
    with pytest.raises(RunFolderError, match="does not exist"):
        load_runs([tmp_path / "missing"])


def test_missing_predictions_name_the_command_that_makes_them(runs: tuple[Path, Path, Path], tmp_path: Path
                                                               ) -> None:
    _, run, _ = runs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text((run / "results.json").read_text())
    (broken / "cnn").mkdir()  # predictions of cnn are missing
    with pytest.raises(ReportError, match=r"predictions.npz is missing.*dogbench evaluate"):
        load_runs([broken])


def test_the_page_escapes_what_it_did_not_write() -> None:
    from dogbench.report.document import Report, Section, Table
    from dogbench.report.render import render_html, render_markdown

    report = Report("dogbench: a<b", "x & y", ['<script>alert(1)</script> wins'], ['"quoted" <i>'],
                    [Section("s", "T", ["1 < 2 & 3"], [Table(["h<"], [["<b>bold</b>"]])])], {})
    page = render_html(report)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; wins" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page and "1 &lt; 2 &amp; 3" in page
    assert "\\<script\\>" in render_markdown(report)


def test_the_report_package_does_not_import_torch(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    _, run, _ = runs
    code = ("import sys; from pathlib import Path; from dogbench.report import make_report; "
            f"make_report([Path({str(run)!r})], Path({str(tmp_path)!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "report.html").is_file()


def _model(correct: np.ndarray, key: str) -> ModelRun:
    n = len(correct)
    y = np.arange(n) % 3
    proba = np.full((n, 3), 0.1, dtype=np.float32)
    proba[np.arange(n), np.where(correct, y, (y + 1) % 3)] = 0.8
    return ModelRun(key, key, "r", {}, np.array([f"s{i:03d}" for i in range(n)]), y, proba,
                    np.array([f"/x/{i}.jpg" for i in range(n)]), ("a", "b", "c"), None, np.full((n, 4), -1))


def test_examples_cover_every_agreement_group_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.7, rng.random(200) < 0.6
    models = [_model(a, "a"), _model(b, "b")]
    ids = select_examples(models, n=12, seed=3)
    assert len(ids) == len(set(ids)) == 12
    rows = [int(i[1:]) for i in ids]
    groups = {(bool(a[r]), bool(b[r])) for r in rows}
    assert groups == {(True, True), (True, False), (False, True), (False, False)}
    assert select_examples(models, n=12, seed=3) == ids != select_examples(models, n=12, seed=4)
    assert select_examples(models[:1], n=5, seed=0) and select_examples(models, n=0, seed=0) == []


def test_breed_order_puts_confused_breeds_side_by_side() -> None:
    n = 8
    confusion = np.eye(n, dtype=int) * 20
    for i, j in ((0, 5), (2, 7), (1, 4)):
        confusion[i, j] = confusion[j, i] = 6
    order = list(breed_order(confusion))
    assert sorted(order) == list(range(n))
    for i, j in ((0, 5), (2, 7), (1, 4)):
        assert abs(order.index(i) - order.index(j)) == 1


def test_report_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="report.explain at most"):
        resolve({}, overrides=["report.examples=2", "report.explain=3"])
    assert resolve({}, overrides=["report.enabled=false"]).report.enabled is False


def test_a_single_model_run_has_a_report_without_a_comparison(runs: tuple[Path, Path, Path]) -> None:
    _, _, cnn_only = runs
    md = (cnn_only / "report.md").read_text()
    assert "**Only one model: nothing to compare.**" in md
    assert "## Per-breed accuracy" not in md and "## Test predictions, right and wrong" in md


def test_moved_images_leave_a_report_with_placeholders(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    _, run, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report*", "explanations"))
    ids = np.load(copy / "cnn" / "predictions.npz")
    moved = {k: ids[k] for k in ids.files}
    moved["paths"] = np.array([str(tmp_path / "gone" / Path(p).name) for p in moved["paths"]])
    np.savez_compressed(copy / "cnn" / "predictions.npz", **moved)
    np.savez_compressed(copy / "vit" / "predictions.npz", **moved)
    assert main(["report", str(copy), "--quiet"]) == 0  # explanations cannot be made: a note, not a failure
    html = (copy / "report.html").read_text()
    assert "(image not readable)" in html and "no explanations (none of the 6 test images to explain" in html


def test_examples_of_models_without_shared_test_images_come_from_the_first() -> None:
    a = _model(np.arange(20) % 2 == 0, "a")
    b = dataclasses.replace(_model(np.ones(20, bool), "b"), sample_ids=np.array([f"t{i:03d}" for i in range(20)]))
    ids = select_examples([a, b], n=6, seed=0)
    assert len(ids) == 6 and all(i.startswith("s") for i in ids)
    assert {bool(a.correct[int(i[1:])]) for i in ids} == {True, False}


def test_per_breed_accuracy_and_confused_pairs_known_answers(tmp_path: Path) -> None:
    from dogbench.report.document import Assets
    from dogbench.report.sections import _recall, confusion_section

    # 6 images of classes 0,0,1,1,2,2: row 1 (class 0) taken for 1, rows 4 and 5 (class 2) taken for 1
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 1, 1])
    proba = np.full((6, 3), 0.1, dtype=np.float32)
    proba[np.arange(6), pred] = 0.8
    m = ModelRun("m", "m", "r", {}, np.array([f"s{i}" for i in range(6)]), y, proba,
                 np.array([str(tmp_path / f"{i}.jpg") for i in range(6)]), ("a", "b", "c"), None, np.full((6, 4), -1))
    np.testing.assert_array_equal(_recall(m, np.arange(6)), [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(_recall(m, np.array([0, 2, 3])), [1.0, 1.0, np.nan])
    section = confusion_section([m], Assets(), pairs=5)
    table = section.blocks[1]
    assert [row[:3] for row in table.rows] == [["c", "b", "2 of 2"], ["a", "b", "1 of 2"]]


def test_cross_run_comparisons_align_permuted_rows() -> None:
    from dogbench.report.runs import RunFolder, comparisons

    rng = np.random.default_rng(1)
    right = rng.random(40) < 0.7
    a = _model(right, "x/m")
    perm = rng.permutation(40)
    b0 = _model(~right, "y/m")  # right exactly where a is wrong, on the same ids; then stored in another order
    b = dataclasses.replace(b0, sample_ids=b0.sample_ids[perm], y_true=b0.y_true[perm], proba=b0.proba[perm])
    runs = [RunFolder(Path("x"), "x", {"dataset": {"root": "/d"}}, {"x/m": a}),
            RunFolder(Path("y"), "y", {"dataset": {"root": "/d"}}, {"y/m": b})]
    [c] = comparisons(runs, n_resamples=100)
    assert c["n"] == 40 and c["a_only_correct"] + c["b_only_correct"] == 40
    assert c["top1_a"] == pytest.approx(a.correct.mean()) and c["top1_b"] == pytest.approx(1 - a.correct.mean())
    other = [runs[0], dataclasses.replace(runs[1], results={"dataset": {"root": "/elsewhere"}})]
    assert comparisons(other, n_resamples=100) == []  # same ids in another dataset are other photos


def test_per_breed_compares_the_cnn_with_the_vit(runs: tuple[Path, Path, Path]) -> None:
    from dogbench.report.sections import comparable_pair

    base, both, cnn_only = runs
    models = [m for run in load_runs([cnn_only, both]) for m in run.models.values()]
    a, b = comparable_pair(models)  # cnn-only/cnn comes first, but the CNN / ViT pair is preferred
    assert (a.key, b.key) == ("cnn-only/cnn", "both/vit")
    assert comparable_pair(models[:2]) is not None and comparable_pair(models[:1]) is None


def test_explanations_from_before_calibration_are_made_again(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A run folder whose explanations.json predates explain's calibrated top-3 gets them made again."""
    _, run, _ = runs
    old = tmp_path / "old"
    shutil.copytree(run, old)
    records_file = old / "explanations" / "explanations.json"
    records = json.loads(records_file.read_text())
    assert records and all(r["calibrated"] is True for r in records)
    stale = [{k: v for k, v in r.items() if k != "calibrated"} | {"top3": [["stale", 1.0]]} for r in records]
    records_file.write_text(json.dumps(stale))
    assert main(["report", str(old), "--quiet"]) == 0
    again = json.loads(records_file.read_text())
    assert [r["sample_id"] for r in again] == [r["sample_id"] for r in records]
    assert all(r["calibrated"] is True and r["top3"] != [["stale", 1.0]] for r in again)
