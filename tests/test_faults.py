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
