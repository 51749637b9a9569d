"""The tracker contract, the fan-out over the configured trackers, and the session a command opens.

Trackers are observers: they receive what a run already computed (an epoch's history entry, a finished trial, the
final results) and never stop the run. The first failure of a tracker is one warning naming it; the tracker is
then left out, and the session's end says what it did not log.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrackingWarning(UserWarning):
    """A tracker that could not be reached or failed: the run goes on without it."""


@dataclass(frozen=True)
class Finals:
    """What a finished command hands the trackers: ``results`` (results.json's dict), the files to attach
    (results.json, summary.txt, report.html) and the report's figures per row (``{"confusion": {row: png}}``)."""

    results: Mapping[str, Any]
    artifacts: tuple[Path, ...] = ()
    figures: Mapping[str, Mapping[str, Path]] = field(default_factory=dict)


class Tracker(ABC):
    """One destination: ``epoch`` per finished training epoch, ``trial`` per finished study trial, ``finish``
    once the results are written, ``close`` at the end of the command."""

    name: str  # in warnings: "TensorBoard (runs/x/tensorboard)", "MLflow (http://host:5000)"

    @abstractmethod
    def epoch(self, series: str, entry: Mapping[str, Any]) -> None:
        """``entry``: the loop's history entry (epoch, train_loss, val_top1, lr, step) of training ``series``."""

    @abstractmethod
    def trial(self, study: str, number: int, params: Mapping[str, Any], value: float | None) -> None:
        """A finished trial of ``study``: its parameters and objective (None: pruned or failed)."""

    @abstractmethod
    def finish(self, finals: Finals) -> None:
        """The final figures with their intervals, the report's images, the run's files."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release (the end of the command)."""


class Trackers:
    """The fan-out: every call goes to each live tracker; a tracker that raises is warned about once, dropped,
    and what it then misses is counted for ``close``'s closing warning."""

    def __init__(self, trackers: list[Tracker], run_dir: Path | None = None) -> None:
        self.live = list(trackers)
        self.run_dir = run_dir
        self.missed: dict[str, Counter[str]] = {}

    def series(self, folder: Path) -> str:
        """A training folder ``RUN/<label>/<method>/train/<key>`` as the series ``<label>/<method>/<key[:8]>``."""
        try:
            parts = list(folder.resolve().relative_to(self.run_dir.resolve()).parts) if self.run_dir else []
        except ValueError:
            parts = []
        parts = [p for p in parts if p != "train"] or [folder.name]
        return "/".join([*parts[:-1], parts[-1][:8]])

    def epoch(self, folder: Path, entry: Mapping[str, Any]) -> None:
        series = self.series(folder)
        self._each("epochs", lambda t: t.epoch(series, entry))

    def trial(self, study: str, number: int, params: Mapping[str, Any], value: float | None) -> None:
        self._each("trials", lambda t: t.trial(study, number, params, value))

    def finish(self, finals: Finals) -> None:
        self._each("final figures", lambda t: t.finish(finals))

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.live):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker never stops the run
                self.drop(tracker, err)
        for counts in self.missed.values():
            counts[what] += 1

    def drop(self, tracker: Tracker, err: BaseException) -> None:
        """Warn once that ``tracker`` failed and leave it out from now on."""
        self.failed(tracker.name, err)
        self.live.remove(tracker)
        with contextlib.suppress(Exception):
            tracker.close()

    def failed(self, name: str, err: BaseException) -> None:
        """The one warning about tracker ``name`` (which could not open, or failed); its misses count from now."""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"tracking: {name} failed ({reason}); the run goes on without it", TrackingWarning,
                      stacklevel=4)
        self.missed[name] = Counter()

    def close(self) -> None:
        """Close every live tracker, then say on stderr what the dropped ones did not log."""
        for tracker in list(self.live):
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001
                self.drop(tracker, err)
        for name, counts in self.missed.items():  # a note, not a second warning about the same tracker
            what = ", ".join(f"{n} {kind}" if kind != "final figures" else kind for kind, n in counts.items())
            print(f"tracking: not logged to {name}: {what or 'nothing (it failed at the end)'}", file=sys.stderr)


_ACTIVE: contextvars.ContextVar[Trackers | None] = contextvars.ContextVar("dogbench_trackers", default=None)
_NONE = Trackers([])


def active() -> Trackers:
    """The trackers of the command running now (none outside a session, and on ranks other than 0)."""
    return _ACTIVE.get() or _NONE


@contextlib.contextmanager
def tracking(trackers: Trackers) -> Iterator[Trackers]:
    """Make ``trackers`` the active ones for the block; closed at its end, whatever happens."""
    token = _ACTIVE.set(trackers)
    try:
        yield trackers
    finally:
        _ACTIVE.reset(token)
        trackers.close()
