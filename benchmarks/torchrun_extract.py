"""Extraction with 1 process against `torchrun --nproc-per-node N` on this machine (gloo, CPU).

    .venv/bin/python benchmarks/torchrun_extract.py --json torchrun_extract.json

On ``../shared/data/stanford-dogs-dev`` (the first ``--classes`` breeds, train and test), ResNet50 with random
weights (speed does not depend on them), fp32, batch 32, chunks of 64. Each round runs both modes into fresh
cache folders: one process with all the cores as torch threads, then N ranks with cores / N threads each. The
figure is the extraction's own time as ``dogbench extract`` prints it (rank 0's, which spans every rank's share,
waits included), and the command's wall time (start-up and model loading included); medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "stanford-dogs-dev"
COMPUTED = re.compile(r"computed (\d+) images in ([\d.]+) s")


def one(ranks: int, cache: Path, args: argparse.Namespace) -> dict:
    cores = os.cpu_count() or 1
    command = ["extract", "--data", str(DEV), "--backbone", "cnn=resnet50@random", "--cache-dir", str(cache),
               "--set", f"data.classes={args.classes}", "--set", "features.batch_size=32",
               "--set", "features.chunk_size=64", "--set", "features.precision=fp32", "--quiet"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                 "-m", "dogbench"] if ranks > 1 else [sys.executable, "-m", "dogbench"])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    start = time.perf_counter()
    done = subprocess.run([*launcher, *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    found = COMPUTED.search(done.stdout)
    if not found:
        sys.exit(f"no extraction figure in: {done.stdout}")
    return {"ranks": ranks, "threads_per_rank": max(1, cores // ranks), "extract_s": float(found.group(2)),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from dogbench.atomic import atomic_write_text
    from dogbench.data import open_dataset, select_classes

    n = len(select_classes(open_dataset(DEV), args.classes).samples)
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append([one(1, Path(tmp) / "one", args), one(args.ranks, Path(tmp) / "many", args)])
        print(f"round {r + 1}: " + "; ".join(f"{m['ranks']} rank(s): {n / m['extract_s']:.1f} img/s "
                                              f"({m['extract_s']:.1f} s, wall {m['wall_s']:.1f} s)"
                                              for m in rounds[-1]))
    summary = {}
    for i, mode in enumerate(("one", "many")):
        summary[mode] = {"ranks": rounds[0][i]["ranks"],
                         "img_s": statistics.median(n / r[i]["extract_s"] for r in rounds),
                         "wall_s": statistics.median(r[i]["wall_s"] for r in rounds)}
    ratio = statistics.median(r[0]["extract_s"] / r[1]["extract_s"] for r in rounds)
    print(f"{n} images; median: 1 rank {summary['one']['img_s']:.1f} img/s, {args.ranks} ranks "
          f"{summary['many']['img_s']:.1f} img/s; speed-up {ratio:.2f}x (median of per-round ratios)")
    if args.json:
        atomic_write_text(args.json, json.dumps({"images": n, "cpus": os.cpu_count(), "rounds": rounds,
                                                 "summary": summary, "speedup": ratio}, indent=1))


if __name__ == "__main__":
    main()
