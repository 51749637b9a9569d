"""The test-set ledger: appends from concurrent processes all land, a torn line is skipped, counts by test set."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from dogbench.ledger import LEDGER_FILE, WARN_AFTER, Scoring, looks, read, record


def _scoring(test_set: str = "t1", model: str = "cnn", config: str = "c1", when: float = 1e9) -> Scoring:
    return Scoring(test_set=test_set, model=model, config=config, run="/runs/a", images=400, time=when)


def _append_many(cache: str, worker: int) -> None:
    for i in range(25):  # look i of every worker happens at the same time: one look, three model scorings
        record(Path(cache), [_scoring(model=f"m{worker}", config=f"c{i}", when=1e9 + i)])


def test_concurrent_appends_all_land_and_counts_are_by_test_set(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert len(read(tmp_path)) == 75
    record(tmp_path, [_scoring(test_set="t2")])
    seen = looks(tmp_path, "t1")
    assert (seen.looks, seen.scorings, seen.configs, seen.models) == (25, 75, 25, 3) and seen.too_many
    assert looks(tmp_path, "t1", until=1e9 + 4).looks == 5  # what had been seen by a look's time
    assert looks(tmp_path, "t2").looks == 1 and not looks(tmp_path, "t2").too_many
    assert looks(tmp_path, "t3").looks == 0 and "not been scored" in looks(tmp_path, "t3").sentence()


def test_a_torn_last_line_is_skipped_and_the_sentence_counts_in_words(tmp_path: Path) -> None:
    record(tmp_path, [_scoring(), _scoring(config="c2", model="vit")])  # one look at two models
    with open(tmp_path / LEDGER_FILE, "a", encoding="utf-8") as f:
        f.write('{"test_set": "t1", "mod')  # a writer killed mid-line
    seen = looks(tmp_path, "t1")
    assert (seen.looks, seen.scorings) == (1, 2)
    assert seen.sentence().startswith("This test set has been scored 1 time since 2001-09-09 (2 models scored), by "
                                      "2 configurations and 2 distinct models")
    record(tmp_path, [_scoring(config="c3", when=2e9)])  # the next append starts on a line of its own
    assert looks(tmp_path, "t1").looks == 2
    record(tmp_path, [_scoring(when=3e9 + i) for i in range(WARN_AFTER - 2)])
    assert looks(tmp_path, "t1").looks == WARN_AFTER and "optimistic" not in looks(tmp_path, "t1").sentence()
    record(tmp_path, [_scoring(when=4e9)])
    assert "treat its figures as optimistic" in looks(tmp_path, "t1").sentence()


def test_two_runs_on_one_test_set_count_two_in_the_second_report(tmp_path: Path) -> None:
    from conftest import make_class_folder_layout
    from dogbench.cli import main
    from dogbench.report.render import headline
    from dogbench.report.runs import load_runs

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=6, n_test=3)
    tiny = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--backbone",
            "cnn=test_resnet@random,input_size=32", "--trials", "2", "--set", "tune.max_epochs=8", "--set",
            "evaluate.n_bootstrap=100", "--set", "report.enabled=false", "--quiet"]
    assert main(["run", "--out", str(tmp_path / "first"), *tiny]) == 0
    _, caveats = headline(load_runs([tmp_path / "first"]))
    assert any(c.startswith("This test set has been scored 1 time since") for c in caveats), caveats
    assert main(["run", "--out", str(tmp_path / "second"), *tiny, "--set", "tune.seed=1"]) == 0
    _, caveats = headline(load_runs([tmp_path / "second"]))
    assert any(c.startswith("This test set has been scored 2 times since") and "(2 models scored), by 2 "
               "configurations and 1 distinct model " in c for c in caveats), caveats
    _, caveats = headline(load_runs([tmp_path / "first"]))  # the first run's report counts what it had seen
    assert any(c.startswith("This test set has been scored 1 time since") for c in caveats), caveats
    assert len(read(tmp_path / "cache")) == 2  # one line per model scored on test, in the run's feature cache
