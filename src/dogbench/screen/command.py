"""``dogbench screen`` end to end: candidates (``--backbone`` specs and a zoo), the rungs, the finalists' run,
the leaderboard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dogbench.backbones import pretraining_of, resolve_model_name
from dogbench.config import BackboneConfig, RunConfig, parse_backbone_table
from dogbench.data import Dataset
from dogbench.errors import DogbenchError
from dogbench.protocols.looks import run_looks
from dogbench.screen.board import leaderboard, summary_lines, write
from dogbench.screen.run import Contender, ScreenOutcome, run_rungs
from dogbench.screen.zoo import Candidate, load_zoo

RUN_FOLDER = "finalists"  # the finalists' run, inside the screen's folder


@dataclasses.dataclass(frozen=True)
class ScreenRequest:
    """What the command line asked: the candidates, how many finalists, the budget, where it goes."""

    backbones: tuple[BackboneConfig, ...]
    zoo: str | None
    finalists: int
    budget_images: int | None
    budget_s: float | None
    out: Path
    force: bool = False  # replace the config of an earlier screen's finalists' run in ``out``


def candidates(request: ScreenRequest) -> tuple[list[BackboneConfig], dict[str, dict[str, Any]]]:
    """The backbones to screen (the given ones, then the zoo's) and what each was pretrained on; one label once."""
    zoo: tuple[Candidate, ...] = load_zoo(request.zoo) if request.zoo else ()
    cfgs = list(request.backbones) + [parse_backbone_table(c.name, {"model": c.tag}) for c in zoo]
    about = {c.name: {"pretraining": c.pretraining, "leaky": c.leaky, "family": c.family.value} for c in zoo}
    for b in request.backbones:
        p = pretraining_of(resolve_model_name(b.model), b.weights)
        about[b.label] = {"pretraining": b.description or p.describe(), "leaky": p.imagenet}
    labels = [c.label for c in cfgs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise DogbenchError(f"candidate label{'s' if len(twice) > 1 else ''} {', '.join(twice)} given twice: each "
                            "--backbone LABEL and zoo name must be unique")
    if len(cfgs) < 2:
        raise DogbenchError("a screen ranks two or more backbones: give --zoo NAME or several --backbone specs")
    return cfgs, about


def screen(cfg: RunConfig, dataset: Dataset, request: ScreenRequest, *, progress: bool = True
           ) -> tuple[ScreenOutcome, list[dict[str, Any]]]:
    """Rungs over the candidates on the training images, then the finalists' ``dogbench run`` (tuned heads,
    test scored once, paired comparisons) in ``out/finalists``, then the leaderboard in ``out``."""
    from dogbench.pipeline import run

    cfgs, about = candidates(request)
    if (request.out / RUN_FOLDER / "config.json").exists() and not request.force:  # before hours of rungs
        raise DogbenchError(f"{request.out} holds an earlier screen (its finalists' run {request.out / RUN_FOLDER}): "
                            "give another --out, or --force to screen again into it")
    request.out.mkdir(parents=True, exist_ok=True)
    outcome = run_rungs(cfg, dataset, [Contender(c) for c in cfgs], finalists=request.finalists,
                        budget_images=request.budget_images, budget_s=request.budget_s, progress=progress)
    chosen = tuple(c for c in cfgs if c.label in outcome.finalists)
    results, run_path = run(dataclasses.replace(cfg, backbones=chosen, out=str(request.out / RUN_FOLDER)), dataset,
                            progress=progress, force=request.force)
    print(results.summary_table())
    run_results = json.loads((run_path / "results.json").read_text())
    rows = leaderboard(outcome, about, run_results["models"])
    lines = summary_lines(rows, outcome, len(dataset.split("train")))
    seen = run_looks(run_results, run_path)
    if seen is not None:
        lines.append(seen)
    print("\n".join(lines))
    write(request.out, rows, outcome, lines, len(dataset.split("train")))
    if cfg.report.enabled:
        from dogbench.report.screen_page import write_screen_report

        print(f"screen report: {write_screen_report(request.out, run_path).html}")
    return outcome, rows

