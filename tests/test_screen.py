"""``dogbench screen`` on a tiny dataset with small random timm models: successive halving that never decodes a
test image, a candidate whose weights cannot be loaded skipped with its reason, the finalists' own run, the
leaderboard, the plan's arithmetic and a budget too small named with the smallest that works."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_class_folder_layout
from dogbench.config import from_mapping, parse_backbone_spec
from dogbench.data import open_dataset
from dogbench.evaluate import holm
from dogbench.screen.board import SCREEN_FILE, pareto_front
from dogbench.screen.command import RUN_FOLDER, ScreenRequest, screen
from dogbench.screen.rungs import BudgetError, nested_ranks, plan

SPECS = ("r0=test_resnet@random,input_size=32", "r1=test_resnet@random,input_size=32,seed=1",
         "v0=test_vit@random,img_size=32", "v1=test_vit@random,img_size=32,seed=1",
         "r2=test_resnet@random,input_size=32,seed=2")


def test_the_plan_halves_candidates_doubles_images_and_names_the_smallest_budget() -> None:
    counts = np.full(10, 16)
    p = plan(counts, 8, 3)
    # 8 -> 4 -> 3: the rung on half the split picks the finalists (their run probes the whole split)
    assert [(r.enter, r.per_class) for r in p.rungs] == [(8, 4), (4, 8)] and p.whole_split
    assert p.extracted == 8 * 40 + 4 * 40  # each rung extracts only the images it adds
    tight = plan(counts, 8, 3, budget_images=300)
    assert not tight.whole_split and tight.extracted <= 300 and [r.per_class for r in tight.rungs] == [2, 4]
    assert [r.per_class for r in plan(counts, 15, 3, budget_images=300).rungs] == [2]  # no rung that adds nothing
    with pytest.raises(BudgetError, match="the smallest that works is 160 images"):
        plan(counts, 8, 3, budget_images=100)
    ranks = nested_ranks(np.repeat(np.arange(3), 5), seed=0)
    assert sorted(ranks[:5]) == list(range(5)) and sorted(ranks[10:]) == list(range(5))


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    assert pareto_front([0.9, 0.8, 0.7, 0.85], [10, 5, 6, 10]) == [True, True, False, False]


def test_the_probe_ranks_by_tune_metric_and_keeps_top1_beside() -> None:
    """On imbalanced classes the probe's C is chosen and its score given by ``tune.metric`` (balanced top-1: the
    mean recall per class of the held-out predictions), with top-1 and its interval still reported."""
    from dogbench.screen.probe import cv_probe

    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 8 + [2] * 6)
    X = rng.normal(size=(len(y), 6)) + 0.9 * np.eye(6)[y]
    plain = cv_probe(X, y, seed=0)
    balanced = cv_probe(X, y, seed=0, metric="balanced_top1", balance="weights")
    assert plain.metric == "top1" and plain.score == plain.top1 == plain.correct.mean()
    recall = [balanced.correct[y == k].mean() for k in np.unique(y)]
    assert balanced.metric == "balanced_top1" and balanced.score == pytest.approx(np.mean(recall))
    assert balanced.top1 == balanced.correct.mean() and balanced.score != balanced.top1
    assert balanced.to_dict()["score"] == balanced.score


def test_a_time_budget_stops_the_rungs_when_the_next_would_not_fit(tmp_path: Path) -> None:
    """The first rung always runs (it measures the speeds); the next is skipped when its expected extraction and
    probing would pass the budget, and the finalists are then the best of the first rung."""
    from dogbench.screen.run import Contender, run_rungs

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=3)
    cfg = from_mapping({"features": {"cache_dir": str(tmp_path / "cache")}})
    contenders = [Contender(parse_backbone_spec(s)) for s in SPECS]
    outcome = run_rungs(cfg, open_dataset(data), contenders, finalists=2, budget_images=None, budget_s=1e-3,
                        progress=False)
    assert outcome.stopped_by_time and outcome.rungs_run == 1 < len(outcome.plan.rungs)
    assert all(len(c.scores) == 1 for c in contenders) and len(outcome.finalists) == 2
    first = sorted(contenders, key=lambda c: -c.scores[0].score)
    assert outcome.finalists == tuple(c.label for c in first[:2])


def test_a_rungs_expected_time_adds_its_probing_to_its_extraction() -> None:
    from dogbench.screen.run import Contender, rung_seconds

    fast, slow = (Contender(parse_backbone_spec(s)) for s in SPECS[:2])
    fast.img_s, slow.img_s = [100.0, 300.0], [50.0]  # medians 200 and 50 img/s
    assert rung_seconds([fast, slow], 100, 400, 0.0) == pytest.approx(100 / 200 + 100 / 50)
    assert rung_seconds([fast, slow], 100, 400, 0.01) == pytest.approx(2.5 + 0.01 * 400 * 2)
    assert rung_seconds([Contender(parse_backbone_spec(SPECS[2]))], 100, 400, 0.01) == pytest.approx(4.0)


def test_a_screen_reads_no_test_image_skips_what_cannot_load_and_runs_its_finalists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dogbench.features import runner

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=3)
    dataset = open_dataset(data)
    test_paths = {s.path for s in dataset.split("test")}
    decoded: list[Path] = []
    for name in ("load_image", "read_image"):
        real = getattr(runner, name)

        def spy(path, *args, _real=real, **kwargs):
            decoded.append(Path(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(runner, name, spy)
    monkeypatch.setattr("dogbench.pipeline.run", lambda cfg, ds, **kw: _finalists_only(cfg, tmp_path))
    cfg = from_mapping({"features": {"cache_dir": str(tmp_path / "cache")}, "evaluate": {"n_bootstrap": 100},
                        "report": {"enabled": False}})
    broken = parse_backbone_spec(f"gone=test_resnet@{tmp_path / 'missing.safetensors'}")
    request = ScreenRequest(tuple(parse_backbone_spec(s) for s in SPECS) + (broken,), None, 2, None, None,
                            tmp_path / "screen")
    outcome, rows = screen(cfg, dataset, request, progress=False)
    assert decoded and not set(decoded) & test_paths  # the rungs decoded training images only
    assert [r.enter for r in outcome.plan.rungs] == [6, 3] and outcome.rungs_run == 2
    assert len(outcome.finalists) == 2
    saved = json.loads((tmp_path / "screen" / SCREEN_FILE).read_text())
    assert [r["label"] for r in saved["leaderboard"]] == [r["label"] for r in rows] and len(rows) == 6
    gone = next(r for r in rows if r["label"] == "gone")
    assert gone["cv"] is None and "could not be loaded" in gone["skipped"]
    reached = {r["label"]: r["rung"] for r in rows}
    assert sorted(reached.values()) == [0, 1, 1, 2, 2, 2] and set(outcome.finalists) < {
        k for k, v in reached.items() if v == 2}
    assert all(r["test"] is not None for r in rows if r["finalist"])
    assert outcome.extracted == 5 * 6 + 3 * 6  # 2 then 4 images per class of 3 classes: the increments only
    assert "finalists (test scored once, in their run)" in capsys.readouterr().out
    again, _ = screen(cfg, dataset, request, progress=False)
    assert again.extracted == 0 and again.finalists == outcome.finalists  # every rung's features were cached


def _finalists_only(cfg, base: Path) -> tuple[SimpleNamespace, Path]:
    """Stands in for ``pipeline.run``: a results.json with the finalists' rows (the real run is tested elsewhere)."""
    out = base / "fake-run"
    out.mkdir(exist_ok=True)
    models = {b.label: {"val": {"top1": 0.5}, "test": {"top1": 0.4, "top1_ci95": [0.2, 0.6]}} for b in cfg.backbones}
    (out / "results.json").write_text(json.dumps({"models": models}))
    assert cfg.out.endswith(RUN_FOLDER)
    return SimpleNamespace(summary_table=lambda: "the finalists' summary"), out


def test_the_command_line_screen_runs_its_finalists_for_real(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dogbench.cli import main

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=6, n_test=3)
    out = tmp_path / "screen"
    argv = ["screen", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *[x for s in SPECS[:4] for x in ("--backbone", s)], "--finalists", "3", "--budget", "1h",
            "--trials", "2", "--set", "tune.max_epochs=8", "--set", "evaluate.n_bootstrap=100",
            "--set", "report.enabled=false", "--quiet"]
    assert main(argv) == 0
    saved = json.loads((out / SCREEN_FILE).read_text())
    results = json.loads((out / RUN_FOLDER / "results.json").read_text())
    assert set(results["models"]) == set(saved["finalists"]) and len(saved["finalists"]) == 3
    for m in results["models"].values():  # the finalists' run took the rungs' rows from the cache
        meta = json.loads((tmp_path / "cache" / m["feature_key"] / "meta.json").read_text())
        assert meta["taken_rows"] == saved["plan"]["rungs"][saved["rungs_run"] - 1]["images"] > 0
    for row in saved["leaderboard"]:
        tested = results["models"].get(row["label"])
        assert row["finalist"] == (tested is not None)
        assert row["test"] == ({k: tested["test"][k] for k in ("top1", "top1_ci95")} if tested else None)
    printed = capsys.readouterr().out
    assert f"screen: {out / SCREEN_FILE}" in printed and "finalists (test scored once, in their run)" in printed
    # three finalists: the run's verdict is the best by validation against the other two, Holm-corrected
    val = {label: m["val"]["top1"] for label, m in results["models"].items()}
    many = results["best_vs_rest"]
    assert many["best"] == max(val, key=lambda k: val[k]) and many["correction"] == "holm"
    pairs = many["comparisons"]
    assert [c["a"] for c in pairs] == [many["best"]] * 2 and {c["b"] for c in pairs} == set(val) - {many["best"]}
    assert [c["p_holm"] for c in pairs] == holm([c["mcnemar_p"] for c in pairs])
    assert results["comparison"] == pairs[0] and "is the best of 3 models on validation top1" in printed
    every = results["comparisons"]  # all three pairs, Holm-corrected over the three
    assert len(every) == 3 and [c["p_holm_all"] for c in every] == holm([c["mcnemar_p"] for c in every])
    from dogbench.report.runs import load_runs
    from dogbench.report.sections import summary_section

    runs = load_runs([out / RUN_FOLDER])
    table = summary_section([m for r in runs for m in r.models.values()], every).blocks[-1]
    assert "Holm p (all pairs)" in table.header and len(table.rows) == 3
    # the screen's report (leaderboard, Pareto fronts) renders in headless Chromium
    from browser import check_page
    from dogbench.report.screen_page import write_screen_report

    files = write_screen_report(out, out / RUN_FOLDER)
    page = check_page(files.html, tmp_path / "screen-report.png")
    assert page.images == 1 and not page.broken_images and not page.page_errors and not page.console_errors
    assert "Leaderboard" in page.text and "Pareto fronts" in page.text
    assert all(label in page.text for label in saved["finalists"])
    assert "This test set has been scored 1 time since" in page.text and "(3 models scored)" in page.text
