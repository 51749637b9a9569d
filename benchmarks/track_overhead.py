"""What TensorBoard tracking costs a head search: the same seeded 100-trial study with ``[track] to = []`` and
``["tensorboard"]`` (the default: a scalar and an HParams session per trial, flushed), median of 3 each.

    .venv/bin/python benchmarks/track_overhead.py --out track_overhead.json
    .venv/bin/python benchmarks/track_overhead.py --trials 100 --repeats 3 --classes 120 --per-class 100 --dim 768

Issue 31's target: under 5% slower with TensorBoard on. Besides wall and CPU seconds (median of the repeats; on
a shared machine they drift by more than the target) it times the trackers' calls themselves: the overhead
proper. The features are bench_tune.py's seeded stand-in for a backbone's (by default 30 classes x 30 images,
128-d: short trials, so the per-trial cost of tracking weighs the most it can); each search runs in a fresh
folder with a fresh SQLite study, off and on taking turns to go first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from dogbench.config import RunConfig, TrackConfig, TrackTo, TuneConfig
from dogbench.track import Trackers, session
from dogbench.tune import tune_head

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import synthetic_features  # noqa: E402 - the sibling script's features, not a package


def search_s(features, *, trials: int, tensorboard: bool) -> dict[str, float]:
    """One head search: its wall and CPU seconds, the seconds spent inside the trackers' calls (the overhead
    itself, free of the machine's noise), and the event files it left (0 with tracking off)."""
    cfg = RunConfig(track=TrackConfig(to=(TrackTo.TENSORBOARD,) if tensorboard else ()))
    inside = [0.0]
    trial = Trackers.trial

    def timed_trial(self: Trackers, *args: Any) -> None:
        t = time.perf_counter()
        trial(self, *args)
        inside[0] += time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        Trackers.trial = timed_trial
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            with session(cfg, run):
                tune_head(features.X_train, features.y_train, features.X_val, features.y_val,
                          cfg=TuneConfig(trials=trials), storage=f"sqlite:///{run / 'optuna.db'}",
                          study_name="overhead", progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            Trackers.trial = trial
        return {"wall_s": wall, "cpu_s": cpu, "inside_s": inside[0] if tensorboard else 0.0,
                "event_files": len(list(run.rglob("events.out.tfevents.*")))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    features = synthetic_features(n_classes=args.classes, per_class=args.per_class, dim=args.dim)
    search_s(features, trials=5, tensorboard=True)  # warm-up: imports, kernels, the first SQLite file
    runs: dict[str, list[dict[str, float]]] = {"off": [], "tensorboard": []}
    for r in range(args.repeats):  # alternating which goes first
        for tb in (False, True) if r % 2 == 0 else (True, False):
            runs["tensorboard" if tb else "off"].append(search_s(features, trials=args.trials, tensorboard=tb))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    row: dict[str, Any] = {"trials": args.trials, "repeats": args.repeats, "classes": args.classes,
                           "n_train": len(features.y_train), "dim": args.dim}
    for key in ("wall_s", "cpu_s"):
        off, on = median("off", key), median("tensorboard", key)
        row.update({f"off_{key}": round(off, 3), f"tensorboard_{key}": round(on, 3),
                    f"overhead_{key.removesuffix('_s')}_pct": round(100 * (on / off - 1), 2)})
    row["inside_trackers_s"] = round(median("tensorboard", "inside_s"), 3)
    row["inside_trackers_pct_of_off_wall"] = round(100 * row["inside_trackers_s"] / row["off_wall_s"], 2)
    row["event_files"] = runs["tensorboard"][-1]["event_files"]
    row["runs"] = {k: [{m: round(v, 3) for m, v in run.items()} for run in v] for k, v in runs.items()}
    print(json.dumps(row, indent=2))
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
