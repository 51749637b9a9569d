"""The plan of a screen: successive halving over backbones on nested, seeded per-class subsamples of the
training split. Every candidate is probed at the first rung; the better half goes on to twice the images per
class, and so on, until a rung on half the split picks the finalists, whose own run then probes them on the whole
training split (a rung there would only re-probe the chosen). A budget in images shrinks every rung alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from dogbench.errors import DogbenchError

MIN_PER_CLASS = 2  # the cross-validated probe needs two images of a class to hold one out


class BudgetError(DogbenchError, ValueError):
    """A budget too small for the first rung; the message names the smallest that works."""


@dataclass(frozen=True)
class Budget:
    """What a screen may spend: images extracted, or wall seconds (None: no limit of that kind)."""

    images: int | None = None
    seconds: float | None = None


BUDGET_FORMS = "a time such as 45s, 30m or 1.5h, or images such as 20000img"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "img": None, "images": None}


def parse_budget(text: str) -> Budget:
    """``--budget``: ``30m``, ``1.5h``, ``900s`` (wall time) or ``20000img`` (images extracted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|img|images)\s*", text)
    if not match or float(match[1]) <= 0:
        raise BudgetError(f"--budget {text!r} is not a budget: give {BUDGET_FORMS}")
    value, unit = float(match[1]), _UNITS[match[2]]
    if unit is None:
        if not value.is_integer():
            raise BudgetError(f"--budget {text!r}: a number of images is whole")
        return Budget(images=int(value))
    return Budget(seconds=value * unit)


@dataclass(frozen=True)
class Rung:
    """One rung: images per class (a class with fewer gives all it has), how many candidates enter, and the
    images each of them has after it (cumulative: a rung's subsample holds the one before it)."""

    per_class: int
    enter: int
    images: int


@dataclass(frozen=True)
class Plan:
    """The rungs, the finalists they end with, and the images the plan extracts in all."""

    rungs: tuple[Rung, ...]
    finalists: int
    whole_split: bool  # whether the rungs double up to half the split (False: a budget made them smaller)

    @property
    def extracted(self) -> int:
        before, total = 0, 0
        for rung in self.rungs:
            total += rung.enter * (rung.images - before)
            before = rung.images
        return total

    def lines(self) -> list[str]:
        """The plan in words, one line a rung, as ``screen`` prints it before starting."""
        out = []
        for i, r in enumerate(self.rungs):
            after = f"the best {self.rungs[i + 1].enter} go on" if i + 1 < len(self.rungs) else \
                f"the best {self.finalists} are the finalists (their run probes them on the whole training split)"
            out.append(f"rung {i + 1}: {r.enter} candidates x {r.per_class} images per class ({r.images} images "
                       f"each); {after}")
        out.append(f"{self.extracted} images extracted in all"
                   + ("" if self.whole_split else "; the budget made every rung smaller"))
        return out


def nested_ranks(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each image's place in a seeded shuffle of its class: the rung of k images per class is ``ranks < k``, so a
    rung's subsample holds every smaller one."""
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        ranks[rows[rng.permutation(len(rows))]] = np.arange(len(rows))
    return ranks


def _schedule(counts: np.ndarray, candidates: int, finalists: int, top: int) -> tuple[Rung, ...]:
    """Rungs that halve the candidates down to ``finalists``, doubling images per class up to half of ``top``.
    A rung that would add no image (a small budget, small classes) is merged into the one before: it could only
    decide again on the same evidence."""
    n_rungs = max(1, math.ceil(math.log2(candidates / finalists))) if candidates > finalists else 1
    rungs: list[Rung] = []
    enter = candidates
    for i in range(n_rungs):
        per_class = max(MIN_PER_CLASS, math.ceil(top / 2 ** (n_rungs - i)))
        if not rungs or per_class > rungs[-1].per_class:
            rungs.append(Rung(per_class, enter, int(np.minimum(counts, per_class).sum())))
        enter = max(finalists, math.ceil(enter / 2))
    return tuple(rungs)


def plan(counts: np.ndarray, candidates: int, finalists: int, budget_images: int | None = None) -> Plan:
    """The rungs for training classes of ``counts`` images: doubling up to half the split, or the largest
    rungs that keep the plan within ``budget_images``."""
    finalists = min(finalists, candidates)
    most = int(counts.max())
    full = Plan(_schedule(counts, candidates, finalists, most), finalists, True)
    if budget_images is None or full.extracted <= budget_images:
        return full
    low, high = MIN_PER_CLASS, most  # the largest top rung that fits: extraction grows with it
    smallest = Plan(_schedule(counts, candidates, finalists, low), finalists, False)
    if smallest.extracted > budget_images:
        raise BudgetError(f"a budget of {budget_images} images is too small for one screen of {candidates} "
                          f"candidates: the smallest that works is {smallest.extracted} images ({MIN_PER_CLASS} per "
                          "class at every rung)")
    while low < high:
        mid = (low + high + 1) // 2
        if Plan(_schedule(counts, candidates, finalists, mid), finalists, False).extracted <= budget_images:
            low = mid
        else:
            high = mid - 1
    return Plan(_schedule(counts, candidates, finalists, low), finalists, False)
