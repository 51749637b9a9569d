"""The screen's report: the leaderboard, the Pareto fronts (cross-validated accuracy against measured speed and
against size), the finalists' verdict and the test set's ledger, in the report's own document and writers. No
torch import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import NullFormatter

from dogbench.protocols.looks import run_looks
from dogbench.report.document import Assets, Figure, Report, Section, Table
from dogbench.report.labels import place_labels
from dogbench.report.plots import new_figure, png
from dogbench.report.render import ReportFiles, write_report
from dogbench.results import board_metric, verdict, verdict_of_many


def pareto_figure(rows: list[dict[str, Any]]) -> MplFigure:
    """The cross-validated score (``tune.metric``) at the rung each candidate reached against img/s and against
    parameters; the Pareto front (nothing both better and cheaper) joined by a line, the finalists filled."""
    scored = [r for r in rows if r["cv"]]
    fig = new_figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((axes[0], "img_s", "pareto_speed", "images per second on this machine (extraction)"),
              (axes[1], "params", "pareto_size", "parameters (millions)"))
    labelled = []  # (axes, points, labels): placed once the figure's layout is final
    for ax, key, front, xlabel in panels:
        shown = [r for r in scored if r[key]]  # a speed that was not measured (cached features) is not drawn
        xy = np.array([[r[key] / (1e6 if key == "params" else 1), r["cv"]["score"] * 100] for r in shown])
        for r, (x, y) in zip(shown, xy, strict=True):
            ax.plot(x, y, "o", ms=8, color="#1f77b4", mfc="#1f77b4" if r["finalist"] else "white")
        on = sorted((x, y) for r, (x, y) in zip(shown, xy, strict=True) if r.get(front))
        if on:
            ax.plot(*zip(*on, strict=True), "-", color="#ff7f0e", alpha=0.7, lw=1.5, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide
        ax.margins(x=0.3, y=0.2)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
        if shown:
            labelled.append((ax, xy, [r["label"] for r in shown]))
    metric = board_metric(rows).replace("_", " ").replace("top1", "top-1")
    axes[0].set_ylabel(f"cross-validated {metric} (%) at the rung reached")
    fig.suptitle("Accuracy against speed and size (filled: finalists)")
    for ax, xy, labels in labelled:
        place_labels(ax, xy, labels, fontsize=8)
    return fig


def _leaderboard_table(rows: list[dict[str, Any]]) -> Table:
    metric = board_metric(rows)
    ranked_by = [] if metric == "top1" else [f"CV {metric.replace('_', ' ')} %"]
    body = [[r["label"], r.get("pretraining", "") + (" (ImageNet-family: leaky)" if r.get("leaky") else ""),
             f"{r['rung']} ({r['per_class']}/class)" if r["cv"] else f"skipped: {r['skipped']}",
             *([f"{r['cv']['score'] * 100:.1f}" if r["cv"] else "-"] if ranked_by else []),
             f"{r['cv']['top1'] * 100:.1f} [{r['cv']['ci95'][0] * 100:.1f}, {r['cv']['ci95'][1] * 100:.1f}]"
             if r["cv"] else "-", f"{r['logme']:.3f}" if r["logme"] is not None else "-",
             f"{r['img_s']:.1f}" if r["img_s"] else "-", f"{r['params'] / 1e6:.1f}M" if r["params"] else "-",
             f"{r['gflops']:.2f}" if r["params"] else "-",
             f"{r['test']['top1'] * 100:.1f} [{r['test']['top1_ci95'][0] * 100:.1f}, "
             f"{r['test']['top1_ci95'][1] * 100:.1f}]" if r["test"] else "-"] for r in rows]
    header = ["model", "pretraining", "rung reached", *ranked_by, "CV top-1 % [95% CI]", "LogME", "img/s", "params",
              "GFLOPs", "test top-1 % (finalists)"]
    return Table(header, body, f"Best first: by the rung reached, then the cross-validated {metric.replace('_', ' ')} "
                 "(tune.metric) of the C-swept probe on that rung's training images. Only the finalists were scored "
                 "on test, once, in their run.")


def build_screen_report(screen: dict[str, Any], finalists: dict[str, Any], run_dir: Path) -> Report:
    """The screen's document from its ``screen.json`` and the finalists' ``results.json``."""
    rows, assets = screen["leaderboard"], Assets()
    board = Section("leaderboard", "Leaderboard", blocks=[_leaderboard_table(rows)])
    board.paragraphs.append(
        f"{screen['extracted_images']} images extracted in {screen['rungs_run']} rungs; probing every candidate on "
        f"the whole training split would have extracted {screen['probe_all_images']}."
        + (" The time budget stopped the rungs early." if screen["stopped_by_time"] else ""))
    image = assets.add("pareto.png", png(pareto_figure(rows)), "Pareto fronts of the screen")
    front = Section("pareto", "Pareto fronts", blocks=[Figure(image, "Each candidate at the rung it reached; the "
                                                              "line joins those no other beats on both axes.")])
    best, pair = finalists.get("best_vs_rest"), finalists.get("comparison")
    if best:
        verdicts = [verdict_of_many(best)]
    else:
        verdicts = [verdict(pair)] if pair else [f"One finalist: {', '.join(screen['finalists'])}."]
    caveats = []
    if screen.get("logme_kendall_tau") is not None:
        caveats.append(f"LogME ranked the first rung with Kendall's tau = {screen['logme_kendall_tau']:.2f} against "
                       f"the probes (p = {screen['logme_kendall_p']:.3g}): trust it on this data only as far.")
    seen = run_looks(finalists, run_dir)
    if seen is not None:
        caveats.append(seen)
    title = f"Screen of {len(rows)} backbones on {finalists['dataset']['name']}"
    return Report(title, f"finalists: {', '.join(screen['finalists'])}", verdicts, caveats, [board, front],
                  assets.files)


def write_screen_report(out: Path, run_dir: Path) -> ReportFiles:
    """``report.html`` and ``report.md`` of the screen in ``out``, from its files and its finalists' run."""
    screen = json.loads((out / "screen.json").read_text())
    finalists = json.loads((run_dir / "results.json").read_text())
    return write_report(build_screen_report(screen, finalists, run_dir), out)
