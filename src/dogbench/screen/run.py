"""``dogbench screen``: many backbones ranked on the user's training images within a budget, the finalists then
given dogbench's usual run (tuned head, test scored once, paired comparisons).

Rungs (``screen.rungs``) read training images only: each rung extracts just the images it adds to the one before
(a cache entry of its own, reused by a later screen), probes every surviving candidate by cross-validation on the
rung's images (``screen.probe``), and keeps the better half. LogME (``screen.logme``) ranks the first rung's
features without training, and Kendall's tau says how far its ranking agrees with the probes'.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dogbench.backbones import Backbone, load_backbone, measure_gflops
from dogbench.config import BackboneConfig, RunConfig, crops_to_box
from dogbench.data import Dataset
from dogbench.errors import DogbenchError
from dogbench.features import extract_features
from dogbench.screen.logme import logme
from dogbench.screen.probe import ProbeScore, cv_probe
from dogbench.screen.rungs import Plan, nested_ranks, plan


@dataclass
class Contender:
    """One candidate's way through the rungs: its features so far (by sample id), scores, speed and cost."""

    cfg: BackboneConfig
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    scores: list[ProbeScore] = field(default_factory=list)
    img_s: list[float] = field(default_factory=list)  # extraction throughput of each rung that computed images
    params: int = 0
    gflops: float = 0.0
    logme: float | None = None
    skipped: str | None = None  # why it left the screen without a score (weights that cannot be loaded)

    @property
    def label(self) -> str:
        return self.cfg.label


@dataclass(frozen=True)
class ScreenOutcome:
    """What a screen decided: the plan, every candidate's way, the finalists, LogME's agreement, the stop."""

    plan: Plan
    contenders: tuple[Contender, ...]
    finalists: tuple[str, ...]
    rungs_run: int
    logme_tau: float | None
    logme_p: float | None
    stopped_by_time: bool
    extracted: int  # images pushed through a model in all (cache hits count 0)
    seconds: float


def rung_dataset(dataset: Dataset, samples: list[Any]) -> Dataset:
    """``dataset`` narrowed to ``samples`` (training images of one rung's increment)."""
    return dataclasses.replace(dataset, samples=tuple(samples))


def _load(contender: Contender) -> Backbone | None:
    """The candidate's backbone, or None with the reason recorded (the screen goes on without it)."""
    try:
        return load_backbone(contender.cfg)
    except (DogbenchError, OSError, RuntimeError, ValueError) as err:
        contender.skipped = f"its weights could not be loaded: {str(err).splitlines()[0]}"
        print(f"dogbench: {contender.label} skipped: {contender.skipped}", file=sys.stderr, flush=True)
        return None


def _extract(contender: Contender, cfg: RunConfig, increment: Dataset, *, progress: bool) -> int:
    """The increment's features for one candidate, added to its rows; the images computed (0 on a cache hit)."""
    backbone = _load(contender)
    if backbone is None:
        return 0
    if not contender.params:
        contender.params, contender.gflops = backbone.params, measure_gflops(backbone)
    fs = extract_features(backbone, increment, cfg=cfg.features, crop_to_box=crops_to_box(cfg, contender.cfg),
                          progress=progress)  # unreadable images are left out of every candidate's rung
    contender.rows.update(zip(fs.sample_ids, fs.features, strict=True))
    if fs.throughput_img_s:
        contender.img_s.append(fs.throughput_img_s)
    return fs.n_computed


def rung_seconds(alive: list[Contender], new_images: int, rung_images: int, probe_s_per_image: float) -> float:
    """The seconds a rung should take at the speeds measured so far: extracting its new images (0 before any
    speed was measured) and probing its images, per candidate."""
    speeds = [np.median(c.img_s) for c in alive if c.img_s]
    extract = float(sum(new_images / s for s in speeds) * len(alive) / max(1, len(speeds))) if speeds else 0.0
    return extract + probe_s_per_image * rung_images * len(alive)


def _logme_agreement(alive: list[Contender], ids: list[str], y: np.ndarray) -> tuple[float | None, float | None]:
    """LogME of each candidate on the first rung's features, and Kendall's tau (with its p) against the probes."""
    from scipy.stats import kendalltau

    for c in alive:
        c.logme = logme(np.stack([c.rows[i] for i in ids]), y).score
    if len(alive) < 3:
        return None, None
    tau = kendalltau([c.logme for c in alive], [c.scores[0].score for c in alive])
    if not np.isfinite(tau.statistic):  # the probes (or LogME) all tie: no ranking to agree with
        return None, None
    return float(tau.statistic), float(tau.pvalue)


def run_rungs(cfg: RunConfig, dataset: Dataset, contenders: list[Contender], *, finalists: int,
              budget_images: int | None, budget_s: float | None, progress: bool) -> ScreenOutcome:
    """Successive halving over ``contenders`` on the training split of ``dataset`` (never its test images)."""
    start = time.perf_counter()
    train = list(dataset.split("train"))
    labels = np.array([s.label for s in train])
    ranks = nested_ranks(labels, cfg.tune.seed)
    the_plan = plan(np.bincount(labels)[np.unique(labels)], len(contenders), finalists, budget_images)
    for line in the_plan.lines():
        print(f"screen: {line}", file=sys.stderr, flush=True)
    alive, before, extracted, tau, p, stopped, rungs_run = list(contenders), 0, 0, None, None, False, 0
    probe_rate = 0.0  # probing seconds per image and candidate, measured on the rung before
    for i, rung in enumerate(the_plan.rungs):
        increment = [s for s, r in zip(train, ranks, strict=True) if before <= r < rung.per_class]
        expected = rung_seconds(alive, len(increment), rung.images, probe_rate)
        if budget_s is not None and i and time.perf_counter() - start + expected > budget_s:
            stopped = True
            break
        for c in alive:
            extracted += _extract(c, cfg, rung_dataset(dataset, increment), progress=progress)
        alive = [c for c in alive if c.skipped is None]
        if not alive:
            raise DogbenchError("no candidate could be loaded: " + "; ".join(
                f"{c.label}: {c.skipped}" for c in contenders))
        members = [s for s, r in zip(train, ranks, strict=True) if r < rung.per_class
                   and all(s.sample_id in c.rows for c in alive)]
        ids, y = [s.sample_id for s in members], np.array([s.label for s in members])
        probing = time.perf_counter()
        for c in alive:
            c.scores.append(cv_probe(np.stack([c.rows[k] for k in ids]), y, seed=cfg.tune.seed,
                                     metric=cfg.tune.metric, balance=cfg.data.balance))
        probe_rate = (time.perf_counter() - probing) / max(1, len(alive) * len(ids))
        if i == 0:
            tau, p = _logme_agreement(alive, ids, y)
        rungs_run, before = i + 1, rung.per_class
        keep = the_plan.rungs[i + 1].enter if i + 1 < len(the_plan.rungs) else the_plan.finalists
        alive = sorted(alive, key=lambda c: -c.scores[-1].score)[:keep]
    best = sorted(alive, key=lambda c: -c.scores[-1].score)[: the_plan.finalists]
    return ScreenOutcome(the_plan, tuple(contenders), tuple(c.label for c in best), rungs_run, tau, p, stopped,
                         extracted, time.perf_counter() - start)
