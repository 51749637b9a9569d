"""TensorBoard, the default tracker: event files under ``RUN/tensorboard/`` that ``tensorboard --logdir runs/``
shows across many runs. One TensorBoard run per training (``<label>/<method>/<key>``: loss, validation top-1
and learning rate per epoch), per study (the objective per trial; each trial's parameters for the HParams
plugin) and ``results`` (the final figures as text, the confusion matrices and reliability diagrams)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dogbench.track.base import Finals, Tracker

RESULTS = "results"  # the TensorBoard run of the final figures, written anew by each finish


class TensorBoardTracker(Tracker):
    """Event files under ``root``; every call flushes, so a killed run loses nothing it was told."""

    def __init__(self, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.root = root
        self.name = f"TensorBoard ({root})"
        self._writer_class = SummaryWriter
        self.writers: dict[str, Any] = {}

    def writer(self, run: str) -> Any:
        if run not in self.writers:
            self.writers[run] = self._writer_class(log_dir=str(self.root / run), flush_secs=3600)
        return self.writers[run]

    def epoch(self, series: str, entry: Mapping[str, Any]) -> None:
        w, step = self.writer(series), int(entry["epoch"])
        w.add_scalar("train/loss", float(entry["train_loss"]), step)
        w.add_scalar("val/top1", float(entry["val_top1"]), step)
        w.add_scalar("train/lr", float(entry["lr"]), step)
        w.flush()

    def trial(self, study: str, number: int, params: Mapping[str, Any], value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return  # a pruned or failed trial has no objective to plot against its parameters
        w = self.writer(study)
        w.add_scalar("search/objective", value, number)
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
        w.add_hparams(hparams, {"search/trial_objective": value}, run_name=f"trial-{number:04d}",
                      global_step=number)
        w.flush()

    def finish(self, finals: Finals) -> None:
        if RESULTS in self.writers:
            self.writers.pop(RESULTS).close()
        shutil.rmtree(self.root / RESULTS, ignore_errors=True)  # the figures of an earlier finish are replaced
        w = self.writer(RESULTS)
        w.add_text("test", results_markdown(finals.results), 0)
        for kind, rows in finals.figures.items():
            for row, path in rows.items():
                with Image.open(path) as img:
                    w.add_image(f"{kind}/{row}", np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def results_markdown(results: Mapping[str, Any]) -> str:
    """The test figures of every row with their 95% intervals, as a Markdown table."""
    lines = ["| model | test top-1 (95% CI) | top-5 | macro-F1 | n |", "|---|---|---|---|---|"]
    for label, row in results.get("models", {}).items():
        test = row.get("test", {})
        lo, hi = test.get("top1_ci95", (math.nan, math.nan))
        lines.append(f"| {label} | {test.get('top1', math.nan):.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{test.get('top5', math.nan):.4f} | {test.get('macro_f1', math.nan):.4f} | {test.get('n', '')} |")
    return "\n".join(lines)
