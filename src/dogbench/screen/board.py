"""The screen's leaderboard: every candidate at the rung it reached (cross-validated top-1 with its interval,
LogME, measured img/s, params, GFLOPs, pretraining), the finalists' test figures from their run, the Pareto fronts
(accuracy against speed and against size), written as ``screen.json`` and a printed, saved table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dogbench.atomic import atomic_write_json, atomic_write_text
from dogbench.results import board_metric, text_table
from dogbench.screen.run import Contender, ScreenOutcome

SCREEN_FILE = "screen.json"
SUMMARY_FILE = "screen-summary.txt"


def pareto_front(accuracy: Sequence[float], cost: Sequence[float]) -> list[bool]:
    """Whether each point is on the front of high accuracy and low cost: no other point is at least as good on
    both and better on one."""
    points = list(zip(accuracy, cost, strict=True))
    return [not any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for a2, c2 in points) for a, c in points]


def _row(c: Contender, outcome: ScreenOutcome, about: Mapping[str, Mapping[str, Any]],
         tested: Mapping[str, Any]) -> dict[str, Any]:
    last = c.scores[-1] if c.scores else None
    rung = outcome.plan.rungs[len(c.scores) - 1] if c.scores else None
    model = tested.get(c.label)
    return {
        "label": c.label, "model": c.cfg.model, "weights": c.cfg.weights, **about.get(c.label, {}),
        "rung": len(c.scores), "per_class": rung.per_class if rung else None,
        "cv": last.to_dict() if last else None, "logme": c.logme,
        "img_s": float(np.median(c.img_s)) if c.img_s else None, "params": c.params, "gflops": c.gflops,
        "finalist": c.label in outcome.finalists, "skipped": c.skipped,
        "val_top1": model["val"]["top1"] if model else None,
        "test": {k: model["test"][k] for k in ("top1", "top1_ci95")} if model else None,
    }


def leaderboard(outcome: ScreenOutcome, about: Mapping[str, Mapping[str, Any]],
                tested: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row a candidate, best first: by the rung reached, then its cross-validated score there (``tune.metric``;
    top-1 by default). ``about``: pretraining and leaky flag by label; ``tested``: the finalists' rows of their
    run's results.json."""
    rows = [_row(c, outcome, about, tested) for c in outcome.contenders]
    rows.sort(key=lambda r: (-r["rung"], -(r["cv"]["score"] if r["cv"] else -1)))
    for key, cost in (("pareto_speed", lambda r: -r["img_s"]), ("pareto_size", lambda r: r["params"])):
        # speed: only the candidates whose speed was measured here (a cache hit measures none)
        scored = [r for r in rows if r["cv"] and (key == "pareto_size" or r["img_s"])]
        front = pareto_front([r["cv"]["score"] for r in scored], [cost(r) for r in scored])
        for r, on in zip(scored, front, strict=True):
            r[key] = on
    return rows


def _cells(r: dict[str, Any]) -> list[str]:
    cv = r["cv"]
    return [
        r["label"], f"{r['rung']} ({r['per_class']}/class)" if cv else "skipped",
        f"{cv['top1']:.4f} [{cv['ci95'][0]:.4f}, {cv['ci95'][1]:.4f}]" if cv else "-",
        f"{r['logme']:.4f}" if r["logme"] is not None else "-",
        f"{r['img_s']:.1f}" if r["img_s"] else ("cached" if cv else "-"),
        f"{r['params'] / 1e6:.1f}M" if r["params"] else "-", f"{r['gflops']:.2f}" if r["params"] else "-",
        f"{r['test']['top1']:.4f}" if r["test"] else "-", "yes" if r.get("leaky") else "no",
    ]


def summary_lines(rows: list[dict[str, Any]], outcome: ScreenOutcome, n_train: int) -> list[str]:
    """The leaderboard as a text table, with the plan's outcome and LogME's agreement in words."""
    header = ["model", "rung reached", "CV top1 [95% CI]", "LogME", "img/s", "params", "GFLOPs", "test top1", "leaky"]
    lines = text_table(header, [_cells(r) for r in rows])
    lines.append(f"{outcome.extracted} images extracted for {len(rows)} candidates in {outcome.rungs_run} rungs "
                 f"({outcome.seconds:.1f} s); probing every candidate on all {n_train} training images would "
                 f"extract {len(rows) * n_train}" + ("; the time budget stopped the rungs early"
                                                     if outcome.stopped_by_time else ""))
    if outcome.logme_tau is None:
        lines.append("LogME's agreement with the probes: undefined (fewer than 3 candidates, or tied scores)")
    else:
        lines.append(f"LogME's ranking of the first rung against the probes': Kendall's tau = {outcome.logme_tau:.2f} "
                     f"(p = {outcome.logme_p:.3g}, {len([r for r in rows if r['cv']])} candidates)")
    metric = board_metric(rows)
    if metric != "top1":
        lines.append(f"ranked by the cross-validated {metric} (tune.metric): " + ", ".join(
            f"{r['label']} {r['cv']['score']:.4f}" for r in rows if r["cv"]))
    lines.append(f"finalists (test scored once, in their run): {', '.join(outcome.finalists)}")
    return lines


def write(out: Path, rows: list[dict[str, Any]], outcome: ScreenOutcome, lines: list[str], n_train: int) -> None:
    """``screen.json`` (the plan, the leaderboard, LogME's tau) and the summary, atomically."""
    atomic_write_json(out / SCREEN_FILE, {
        "plan": {"rungs": [vars(r) for r in outcome.plan.rungs], "finalists": outcome.plan.finalists,
                 "whole_split": outcome.plan.whole_split, "planned_images": outcome.plan.extracted},
        "rungs_run": outcome.rungs_run, "stopped_by_time": outcome.stopped_by_time,
        "extracted_images": outcome.extracted, "probe_all_images": len(rows) * n_train,
        "seconds": round(outcome.seconds, 3),
        "logme_kendall_tau": outcome.logme_tau, "logme_kendall_p": outcome.logme_p,
        "finalists": list(outcome.finalists), "leaderboard": rows,
    })
    atomic_write_text(out / SUMMARY_FILE, "\n".join(lines) + "\n")
