"""Faults, nothing lost (issue 14): whole `dogbench run`s SIGKILLed at seeded points (mid-write, mid-step, at a
time) and given a full disk at seeded writes; every rerun completes with the uninterrupted run's results.

This is the CI variant of tests/faults.py (6 points on one tiny CNN); the soak is
``python tests/faults.py --points 40 --full-disk 8`` (docs/RELIABILITY.md). The harness forks its commands from
a fresh interpreter, hence a subprocess here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def test_seeded_kills_and_full_disks_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "faults.py"), "--points", "4", "--full-disk",
                           "2", "--small", "--seed", "3", "--root", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = summary["points"]
    assert len(rows) == 6 and summary["crashes"] == summary["unequal"] == summary["unclear_errors"] == 0
    kinds = {r["point"].split(":")[0] for r in rows}
    assert {"write", "step", "enospc"} <= kinds
    for r in rows:
        assert r["equal"] and r["rerun_exit"] == 0
        if r["point"].startswith(("write", "step")):
            assert r["first_exit"] == -signal.SIGKILL  # it was killed where it was told
        if r["point"].startswith("enospc"):
            assert r["first_exit"] == 2 and r["clear_error"]


def test_two_whole_runs_sharing_one_cache_and_one_study_both_get_a_solo_runs_results(tmp_path: Path) -> None:
    """Two `dogbench run`s at once on one feature cache and one Optuna study (SQLite, one --study name), each its
    own run folder: both finish, and each folder holds exactly what a run alone computes (features, tuned
    heads, fine-tuned weights, predictions)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_class_folder_layout
    from faults import run_results, tiny_run_argv

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    argv = tiny_run_argv(data, tmp_path / "unused", small=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path, cache: Path, storage: Path) -> list[str]:
        args = argv(out)
        args[args.index("--cache-dir") + 1] = str(cache)
        return [sys.executable, "-m", "dogbench", *args, "--storage", f"sqlite:///{storage}", "--study", "shared"]

    both = [subprocess.Popen(command(tmp_path / f"run{i}", tmp_path / "cache", tmp_path / "study.db"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in both:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    alone = subprocess.run(command(tmp_path / "alone", tmp_path / "cache-alone", tmp_path / "alone.db"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    expected = run_results(tmp_path / "alone")
    assert run_results(tmp_path / "run0") == expected and run_results(tmp_path / "run1") == expected
    import numpy as np

    entries = [e for e in (tmp_path / "cache-alone").iterdir() if (e / "features.npy").is_file()]
    assert entries
    for entry in entries:
        assert np.array_equal(np.load(tmp_path / "cache" / entry.name / "features.npy"),
                              np.load(entry / "features.npy"))
