"""`torchrun --nproc-per-node 2 -m dogbench extract` (gloo, CPU): the ranks share the chunks of one cache entry
and the features are the bits one process computes (at the same torch threads per process: a different
thread count changes float rounding, about 1e-7, in one process as well)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dogbench.cli import main

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]


def _extract(data: Path, cache: Path, *, ranks: int) -> subprocess.CompletedProcess:
    args = ["extract", "--data", str(data), *TINY, "--cache-dir", str(cache), "--set", "features.chunk_size=8",
            "--set", "features.batch_size=4", "--quiet"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--standalone", "-m", "dogbench"] if ranks > 1 else [sys.executable, "-m", "dogbench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_extract_the_bits_of_one_process(tmp_path: Path) -> None:
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=12, n_test=6)
    one = _extract(data, tmp_path / "one", ranks=1)
    two = _extract(data, tmp_path / "two", ranks=2)
    entries = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir())
    assert len(entries) == 2 and entries == sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir())
    for key in entries:
        a = np.load(tmp_path / "one" / key / "features.npy")
        b = np.load(tmp_path / "two" / key / "features.npy")
        assert a.shape == (54, a.shape[1]) and np.array_equal(a, b), key
        assert not (tmp_path / "two" / key / "chunks").exists()  # joined by rank 0
    # 54 images in 7 chunks of 8: rank 0 computed chunks 0, 2, 4, 6 (30 images) and printed the summary
    assert two.stdout.count("computed 30 images") == 2 and "computed 54 images" in one.stdout


def test_other_commands_are_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "under torchrun only `dogbench extract` runs on several ranks so far" in capsys.readouterr().err
