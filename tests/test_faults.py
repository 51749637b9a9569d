"""Faults, nothing lost (issue 14): whole `dogbench run`s SIGKILLed at seeded points (mid-write, mid-step, at a
time; in one process and in one rank of a 2-rank torchrun), given an injected ENOSPC at seeded writes and a real
full disk (a tmpfs) at seeded fill levels; every rerun completes with the uninterrupted run's results and leaves
no temporary file behind.

These are the CI variants of tests/faults.py (a few points on one tiny CNN); the soaks are in
docs/guide/reliability.md. The harness forks its commands from a fresh interpreter, hence a subprocess here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import unmount_below


def _campaign(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "faults.json"
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "faults.py"), *args, "--small", "--root",
                               str(tmp_path / "work"), "--json", str(out)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        unmount_below(tmp_path)  # the harness unmounts its tmpfs, unless it was killed first
    if done.returncode == 3:  # faults.py could not mount a tmpfs: this machine does not let this user
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["crashes"] == summary["unequal"] == summary["unclear_errors"] == summary["temporaries_left"] == 0
    for r in summary["points"]:
        assert r["equal"] and r["rerun_exit"] == 0 and r["temporaries_left"] == [], r
    return summary


def test_seeded_kills_and_full_disks_lose_nothing(tmp_path: Path) -> None:
    """One kill of each kind (mid-write, mid-step, at a time) and one injected ENOSPC."""
    rows = _campaign(tmp_path, "--points", "3", "--full-disk", "1", "--seed", "3")["points"]
    assert len(rows) == 4
    assert {"write", "step", "time", "enospc"} == {r["point"].split(":")[0] for r in rows}
    for r in rows:
        if r["point"].startswith(("write", "step")):
            assert r["first_exit"] == -signal.SIGKILL  # it was killed where it was told
        if r["point"].startswith("write"):  # mid-write: its half temporary was removed by the rerun's write
            assert r["file"].startswith(("run/", "cache/"))
        if r["point"].startswith("enospc"):
            assert r["first_exit"] == 2 and r["clear_error"]


def test_a_real_full_disk_at_seeded_fill_levels_is_named_and_the_rerun_loses_nothing(tmp_path: Path) -> None:
    """The run folder and cache on a tmpfs left with a seeded number of free bytes (log-uniform up to what the
    run writes): whichever write comes first fails, ours or SQLite's or torch's; exit 2 naming the file, then
    the disk is freed and the same command completes with the uninterrupted run's results."""
    summary = _campaign(tmp_path, "--points", "0", "--full-disk", "0", "--disk", "3", "--seed", "0")
    rows = summary["points"]
    assert len(rows) == 3 and all(r["point"].startswith("disk:") for r in rows)
    for r in rows:
        assert r["first_exit"] == 2 and r["clear_error"] and r["file"].startswith(("run/", "cache/")), r


def test_seeded_kills_of_one_torchrun_rank_lose_nothing(tmp_path: Path) -> None:
    """`dogbench run` under a 2-rank torchrun (gloo): rank 0 killed mid-write, a rank killed mid-epoch of DDP
    fine-tuning; torchrun ends the other rank, and the same torchrun command completes with the uninterrupted
    2-rank run's results."""
    summary = _campaign(tmp_path, "--points", "2", "--full-disk", "0", "--torchrun", "--seed", "1")
    assert summary["sites"]["0"]["write"] > 0 and summary["sites"]["1"]["write"] > 0  # feature chunks: both ranks
    assert summary["sites"]["0"]["step"] == summary["sites"]["1"]["step"] > 0  # DDP: the same steps
    rows = summary["points"]
    assert [r["point"].split("/")[1].split(":")[0] for r in rows] == ["write", "step"]
    for r in rows:
        assert r["first_exit"] != 0  # torchrun reports the killed rank


TOGETHER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import faults
faults.preload()  # the commands below are forks of this interpreter: its imports are made once, not per command
plan, root = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
codes = faults.run_children(plan["together"], [root / "run0.log", root / "run1.log"])
codes.append(faults.run_child(plan["alone"], log=root / "alone.log"))
print(json.dumps(codes))
"""


def test_two_whole_runs_sharing_one_cache_and_one_study_both_get_a_solo_runs_results(tmp_path: Path) -> None:
    """Two `dogbench run`s at once on one feature cache and one Optuna study (SQLite, one --study name), each its
    own run folder and process: both finish, and each folder holds exactly what a run alone computes (features,
    tuned heads, fine-tuned weights, predictions)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_class_folder_layout
    from faults import run_results, tiny_run_argv

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    argv = tiny_run_argv(data, small=True)

    def command(out: Path, cache: Path, storage: Path) -> list[str]:
        args = argv(out)
        args[args.index("--cache-dir") + 1] = str(cache)
        return [*args, "--storage", f"sqlite:///{storage}", "--study", "shared"]

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "together": [command(tmp_path / f"run{i}", tmp_path / "cache", tmp_path / "study.db") for i in (0, 1)],
        "alone": command(tmp_path / "alone", tmp_path / "cache-alone", tmp_path / "alone.db")}))
    done = subprocess.run([sys.executable, "-c", TOGETHER.format(tests=str(Path(__file__).parent)), str(plan),
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    logs = "".join((tmp_path / f"{name}.log").read_text(errors="replace")[-2000:] for name in ("run0", "run1", "alone")
                   if (tmp_path / f"{name}.log").is_file())
    assert done.returncode == 0 and json.loads(done.stdout) == [0, 0, 0], done.stderr[-3000:] + logs
    expected = run_results(tmp_path / "alone")
    assert run_results(tmp_path / "run0") == expected and run_results(tmp_path / "run1") == expected
    import numpy as np

    entries = [e for e in (tmp_path / "cache-alone").iterdir() if (e / "features.npy").is_file()]
    assert entries
    for entry in entries:
        assert np.array_equal(np.load(tmp_path / "cache" / entry.name / "features.npy"),
                              np.load(entry / "features.npy"))
