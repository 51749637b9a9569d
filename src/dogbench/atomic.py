"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target.

A reader never sees a half-written file, and a process killed mid-write leaves the old file (or none) and its
temporary, ``.<name>.<host>-<pid>.<random>.tmp``; the next write of that file removes the temporaries of
writers that are gone (same host, no such process), never one another process is still writing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temporary_prefix(path)}{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the mode open() would give
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        remove_orphans(path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None and err.errno is not None:  # a failed write (a full disk) names no file
            err.filename = str(path)  # name the one being written (its type and message stay)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_prefix(path: Path) -> str:
    """How this host's temporaries of ``path`` begin; the writer's pid follows."""
    return f".{path.name}.{socket.gethostname()}-"


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed writers of this host; the removed ones."""
    prefix = temporary_prefix(path)
    removed = []
    for leftover in glob.glob(glob.escape(str(path.parent / prefix)) + "*.tmp"):
        pid = Path(leftover).name[len(prefix):].partition(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # another writer removed it first
                os.unlink(leftover)
                removed.append(Path(leftover))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Let ``writer`` fill a binary handle (np.save, torch.save, ...) and publish the result atomically."""
    with atomic_open(path, "wb") as handle:
        writer(handle)
