from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dogbench.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_with


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writers_produce_the_content_and_create_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    atomic_write_bytes(target / "x.bin", b"\x00\x01\xff")
    atomic_write_text(target / "x.txt", "héllo\n")
    atomic_write_json(target / "x.json", {"k": [1, 2.5, "z"], "n": None})
    atomic_write_with(target / "x.npy", lambda handle: np.save(handle, np.arange(6.0).reshape(2, 3)))

    assert (target / "x.bin").read_bytes() == b"\x00\x01\xff"
    assert (target / "x.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((target / "x.json").read_text()) == {"k": [1, 2.5, "z"], "n": None}
    np.testing.assert_array_equal(np.load(target / "x.npy"), np.arange(6.0).reshape(2, 3))
    assert _leftovers(target) == []


def test_overwrite_replaces_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old, and longer than the new text")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_error_inside_atomic_open_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as handle:
            handle.write("half written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_error_inside_atomic_open_without_old_file_leaves_nothing(tmp_path: Path) -> None:
    def writer(handle: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(tmp_path / "new.npy", writer)
    assert list(tmp_path.iterdir()) == []


def test_temp_file_lives_beside_the_target_until_exit(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with atomic_open(path) as handle:
        handle.write(b"data")
        assert not path.exists()
        assert len(_leftovers(tmp_path)) == 1
    assert path.read_bytes() == b"data"
    assert _leftovers(tmp_path) == []


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644


def test_a_killed_writers_temporary_is_removed_by_the_next_write_but_a_live_writers_is_kept(tmp_path: Path) -> None:
    """SIGKILL mid-write leaves ``.<name>.<host>-<pid>.<random>.tmp``; the next write of that file removes it
    (its writer is gone), while the temporary of a writer still running, or of another file, stays."""
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "results.json"
    script = ("import os, sys\nfrom dogbench.atomic import atomic_open\n"
              "with atomic_open(sys.argv[1]) as f:\n    f.write(b'half')\n    f.flush()\n"
              "    print('writing', flush=True)\n    sys.stdin.read()\n")
    killed = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    live = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "other.json")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        for p in (killed, live, other):
            assert p.stdout.readline() == b"writing\n"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        other.kill()
        other.wait()
        temporaries = set(_leftovers(tmp_path))
        assert len(temporaries) == 3 and all(f"-{killed.pid}." in t or f"-{live.pid}." in t or f"-{other.pid}." in t
                                             for t in temporaries)
        atomic_write_text(path, "whole")
        assert path.read_text() == "whole"
        left = set(_leftovers(tmp_path))
        assert not any(f"-{killed.pid}." in t for t in left)  # the dead writer's: removed
        assert any(f"-{live.pid}." in t for t in left)  # still being written: kept
        assert any(f"-{other.pid}." in t and t.startswith(".other.json.") for t in left)  # another file's: kept
    finally:
        live.communicate(b"")
    assert live.returncode == 0 and path.read_text() == "half"  # the live writer finished normally
    assert _leftovers(tmp_path) == [t for t in left if t.startswith(".other.json.")]


def test_temporaries_that_do_not_parse_are_left_alone_and_never_fail_a_write(tmp_path: Path) -> None:
    """Planted names beside the target (unicode digits, a pid too large for os.kill, another machine's, a dead
    pid of ours with a folder in the way): the write lands; only the dead writer's plain file goes."""
    from dogbench.atomic import temporary_prefix

    path = tmp_path / "results.json"
    ours = temporary_prefix(path)
    planted = [f"{ours}\u00b2\u00b3.x.tmp", f"{ours}99999999999999999999.x.tmp", ".results.json.0123456789ab-1.x.tmp",
               f"{ours}1.x.tmp"]  # pid 1 lives: kept
    for name in planted:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f"{ours}4999999.d.tmp").mkdir()  # not a file: unlink fails, the write does not
    (tmp_path / f"{ours}4999998.x.tmp").write_bytes(b"half")  # a pid no process has: removed
    atomic_write_text(path, "ok")
    assert path.read_text() == "ok"
    assert set(_leftovers(tmp_path)) == {*planted, f"{ours}4999999.d.tmp"}
