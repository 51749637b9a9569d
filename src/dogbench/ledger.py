"""The test-set ledger: every scoring of a test set, appended to one file in the feature cache, so a report can
say how often this test set has been looked at, and by how many configurations (issue 32's multiple looks).

One JSON line per scoring, appended under the ledger's lock and flushed to disk; a reader skips a line a killed
writer left torn. Nothing is ever rewritten: the ledger only grows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from dogbench.locks import locked

LEDGER_FILE = "test-ledger.jsonl"
WARN_AFTER = 10  # scorings of one test set past which report and screen warn


@dataclass(frozen=True)
class Scoring:
    """One look at a test set: what was scored, with which configuration, when and where."""

    test_set: str  # the test set's digest (its images' content and labels)
    model: str  # the scored model's identity (backbone, weights, method)
    config: str  # the digest of the resolved config that produced it
    run: str  # the run folder
    images: int
    time: float  # seconds since the epoch


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


@dataclass(frozen=True)
class Looks:
    """How often one test set has been scored: looks (runs, each scoring its models at one time), model
    scorings, distinct configurations and models, and the first look."""

    looks: int
    scorings: int
    configs: int
    models: int
    first: float | None

    @property
    def too_many(self) -> bool:
        return self.looks > WARN_AFTER

    def sentence(self) -> str:
        """What a report says of it, in words."""
        if not self.looks:
            return "This test set has not been scored before."
        since = time.strftime("%Y-%m-%d", time.localtime(self.first)) if self.first else "?"
        warn = (f" Past {WARN_AFTER} looks, choices made after seeing test figures fit this test set: treat its "
                "figures as optimistic." if self.too_many else "")
        return (f"This test set has been scored {_n(self.looks, 'time')} since {since} ({_n(self.scorings, 'model')} "
                f"scored), by {_n(self.configs, 'configuration')} and {_n(self.models, 'distinct model')} (the "
                f"ledger in the feature cache).{warn}")


def record(cache_dir: Path, scorings: Iterable[Scoring]) -> None:
    """Append ``scorings`` to the ledger of ``cache_dir``, under its lock, flushed to disk before returning."""
    lines = "".join(json.dumps(asdict(s), sort_keys=True) + "\n" for s in scorings)
    if not lines:
        return
    path = cache_dir / LEDGER_FILE
    with locked(path.with_suffix(".lock"), what="the test-set ledger"):
        with open(path, "a+b") as f:
            if f.tell() and _last_byte(f) != b"\n":  # end a line a killed writer left torn: it stays unreadable
                lines = "\n" + lines
            f.write(lines.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _last_byte(f: BinaryIO) -> bytes:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read(cache_dir: Path) -> list[Scoring]:
    """Every whole line of the ledger (none when there is no ledger yet)."""
    path = cache_dir / LEDGER_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(Scoring(**json.loads(line)))
        except (ValueError, TypeError):  # a line a killed writer left half-written
            continue
    return out


def looks(cache_dir: Path, test_set: str, *, until: float | None = None) -> Looks:
    """How often ``test_set`` had been scored by ``until`` (default: now) according to the ledger of
    ``cache_dir``; a look is one run scoring its models at one time."""
    return tally(read(cache_dir), test_set, until=until)


def tally(scorings: list[Scoring], test_set: str, *, until: float | None = None) -> Looks:
    """``looks`` over ledger lines already read."""
    mine = [s for s in scorings if s.test_set == test_set and (until is None or s.time <= until)]
    return Looks(len({(s.run, s.time) for s in mine}), len(mine), len({s.config for s in mine}),
                 len({s.model for s in mine}), min((s.time for s in mine), default=None))
