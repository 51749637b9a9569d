"""Inter-process locks on shared state (a feature-cache entry, a partial download, a study, a run folder).

Advisory file locks through the ``filelock`` package (``flock`` on Linux, released by the kernel when a process
dies, so a killed run never leaves a stale lock behind). A process that finds the lock held says once what it
is waiting for, then waits: the other process's work is reused instead of being done twice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from dogbench.errors import DogbenchError


class LockTimeout(DogbenchError, TimeoutError):
    """Another process held a lock for longer than the caller would wait."""


@contextmanager
def locked(path: str | Path, *, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` (created if missing) for the block; ``what`` names the shared state in the
    message printed when another process holds it. ``timeout`` None waits for as long as it takes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=True)  # re-entrant within a process: a nested hold never hangs
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"dogbench: waiting for another process that holds {what} ({path})", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise LockTimeout(f"{what} is still held by another process after {timeout:g} s ({path})") from None
    try:
        yield
    finally:
        lock.release()
