"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target.

A reader never sees a half-written file, and a process killed mid-write leaves the old file (or none) and its
temporary, ``.<name>.<machine>-<pid>.<random>.tmp``; the next write of that file removes the temporaries of
writers that are gone (same machine and pid namespace, no such process), never one another process is still
writing.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
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
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None and err.errno is not None:  # a failed write (a full disk) names no file
            err.filename = str(path)  # name the one being written (its type and message stay)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # tidying up after others: never a reason for this write to fail
        remove_orphans(path)


def temporary_prefix(path: Path) -> str:
    """How the temporaries of ``path`` written in this machine's pid namespace begin; the writer's pid follows."""
    return f".{path.name}.{_writer_identity()}-"


@functools.cache
def _writer_identity() -> str:
    """This machine and pid namespace as 12 hex digits: within it a pid names one process (containers on one
    host may share a hostname and a kernel, not a pid namespace; machines sharing a folder differ in boot id)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed writers of this machine's pid namespace; the removed
    ones. A name that does not parse (not written by atomic_open) is left alone."""
    prefix = temporary_prefix(path)
    removed = []
    for leftover in glob.glob(glob.escape(str(path.parent / prefix)) + "*.tmp"):
        pid = re.fullmatch(r"([0-9]{1,9})\..*\.tmp", Path(leftover).name[len(prefix):])
        if pid and not _alive(int(pid.group(1))):
            with contextlib.suppress(OSError):  # removed by another writer first, or not a file: left
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
