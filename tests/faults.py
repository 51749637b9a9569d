"""Seeded SIGKILL fault injection for whole `dogbench` commands (issue 14), shared by tests/test_faults.py and
the long soak (``python tests/faults.py --points 40 --json faults.json``).

A *point* is where a command is killed: ``write:N`` (the N-th atomic write, its temporary file cut to half its
size, then SIGKILL before the rename: a kill mid-write), ``step:N`` (after the N-th optimizer step of
fine-tuning: mid-epoch) or ``time:S`` (S seconds after the start, anywhere). The harness imports dogbench and
torch once, then forks a child per command (no torch op runs in the parent, so the children's thread pools start
clean): the killed command, then the same command again, whose results must equal an uninterrupted run's.

The injection lives here, not in the product: the child wraps ``dogbench.atomic.atomic_open`` and
``training.Stepper.optimizer_step`` before it calls ``cli.main``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FIELDS = ("val", "test", "head", "baseline", "calibration")  # deterministic parts of a row (no timings)


def _install(point: str, counts: dict[str, int] | None = None) -> None:
    """In the child: arm ``point`` (``counts``: count the sites instead, for a reference run)."""
    import dogbench.atomic as atomic
    from dogbench import training

    site, _, arg = point.partition(":")
    seen = {"write": 0, "step": 0}

    def hit(kind: str) -> bool:
        seen[kind] += 1
        if counts is not None:
            counts[kind] = seen[kind]
        return (site == kind or (site, kind) == ("enospc", "write")) and seen[kind] == int(arg)

    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[Any]:
        if not hit("write"):
            with real_open(path, mode) as handle:
                yield handle
            return
        (Path(os.environ["DOGBENCH_FAULT_LOG"]) if "DOGBENCH_FAULT_LOG" in os.environ else Path(os.devnull)) \
            .write_text(str(path))  # which file the point hit, for the campaign's table
        if site == "enospc":  # the disk fills up during this write: the real writer fails as a full disk fails
            with real_open(path, mode) as handle:
                yield _FullDisk(handle)
            return
        tmp = Path(path).parent / f".{Path(path).name}.fault.tmp"  # what a kill mid-write leaves behind
        tmp.parent.mkdir(parents=True, exist_ok=True)  # as atomic_open makes the target's folder
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            handle.truncate(max(0, handle.tell() // 2))
        os.kill(os.getpid(), signal.SIGKILL)

    atomic.atomic_open = atomic_open
    real_step = training.Stepper.optimizer_step

    def optimizer_step(self: Any, step: int) -> None:
        real_step(self, step)
        if hit("step"):
            os.kill(os.getpid(), signal.SIGKILL)

    training.Stepper.optimizer_step = optimizer_step
    if site == "time":
        threading.Timer(float(arg), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()


class _FullDisk:
    """A file handle on a disk that fills up: the first write stores half its bytes, then raises ENOSPC."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._handle.write(view[: len(view) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def run_child(argv: list[str], point: str | None = None, counts_file: Path | None = None,
              log: Path | None = None) -> int:
    """``dogbench argv`` in a forked child, with ``point`` armed; its exit status (negative: killed by signal)."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            if log is not None:
                os.environ["DOGBENCH_FAULT_LOG"] = str(log.with_suffix(".hit"))
            if log is not None:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
            counts: dict[str, int] | None = {} if counts_file is not None else None
            if point is not None or counts is not None:
                _install(point or "none:0", counts)
            from dogbench.cli import main

            code = main(argv)
            if counts_file is not None:
                counts_file.write_text(json.dumps(counts))
        except BaseException:  # noqa: BLE001 - what main let through is a crash: shown, then exit 70
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_results(run: Path) -> dict[str, Any]:
    """What a run computed, without its timings: every row's scores and every saved prediction's numbers."""
    results = json.loads((run / "results.json").read_text())
    out: dict[str, Any] = {"models": {label: {k: row.get(k) for k in RESULT_FIELDS}
                                      for label, row in results["models"].items()},
                           "comparisons": results.get("comparisons")}
    for label in results["models"]:
        with np.load(run / label / "predictions.npz", allow_pickle=False) as z:
            out[f"{label}/predictions"] = {k: z[k].tobytes().hex() for k in sorted(z.files)
                                           if z[k].dtype.kind in "fiub"}
    for weights in sorted(run.glob("*/*/backbone.safetensors")):
        import hashlib

        out[str(weights.relative_to(run))] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return out


def points(counts: dict[str, int], seconds: float, n: int, *, seed: int) -> list[str]:
    """``n`` kill points drawn with ``seed``: about half at atomic writes, a quarter at optimizer steps, the rest
    at times within the uninterrupted run's duration."""
    rng = random.Random(seed)
    kinds = [k for k in ("write", "step") if counts.get(k)]
    chosen: list[str] = []
    for i in range(n):
        kind = "time" if i % 4 == 3 or not kinds else ("write" if i % 4 in (0, 2) or "step" not in kinds else "step")
        if kind == "time":
            chosen.append(f"time:{rng.uniform(0.5, max(1.0, 0.7 * seconds)):.2f}")  # the reference ran longest
        else:
            chosen.append(f"{kind}:{rng.randint(1, counts[kind])}")
    return chosen


def campaign(make_argv: Callable[[Path], list[str]], root: Path, n: int, *, full_disk: int = 0, seed: int = 0,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """An uninterrupted reference run, then ``n`` seeded points: each a fresh folder, the command killed there,
    then run again until it completes; every completed run's results must equal the reference's."""
    import dogbench.cli  # noqa: F401 - imported once here (torch too); the forked children start from it

    reference = root / "reference"
    counts_file = root / "counts.json"
    t0 = time.perf_counter()
    code = run_child(make_argv(reference), counts_file=counts_file, log=root / "reference.log")
    seconds = time.perf_counter() - t0
    if code != 0:
        raise AssertionError(f"the reference run failed ({code}): {(root / 'reference.log').read_text()[-3000:]}")
    expected = run_results(reference)
    counts = json.loads(counts_file.read_text())
    rows = []
    rng = random.Random(seed + 1)
    chosen = points(counts, seconds, n, seed=seed) + [f"enospc:{rng.randint(1, counts['write'])}"
                                                      for _ in range(full_disk)]
    for i, point in enumerate(chosen):
        folder = root / f"point{i:02d}"
        log_file = root / f"point{i:02d}.log"
        first = run_child(make_argv(folder), point, log=log_file)
        said = log_file.read_text(errors="replace") if log_file.is_file() else ""
        reruns, code = 0, None
        while code != 0 and reruns < 3:  # a rerun must finish (a time point may also fire after the end)
            code = run_child(make_argv(folder), log=root / f"point{i:02d}.rerun.log")
            reruns += 1
        hit = log_file.with_suffix(".hit")
        target = Path(hit.read_text()) if hit.is_file() else None
        row = {"point": point, "file": _relative(target, root / "caches", folder), "first_exit": first,
               "rerun_exit": code, "reruns": reruns,
               "equal": code == 0 and run_results(folder) == expected,
               "temporaries_left": sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))}
        if point.startswith("enospc"):  # exit 2, the full disk and the file named, no traceback
            row["clear_error"] = (first == 2 and "No space left on device: " in said and "Traceback" not in said)
        rows.append(row)
        log(json.dumps(row))
    return {"reference_s": round(seconds, 2), "sites": counts, "points": rows,
            "crashes": sum(r["rerun_exit"] != 0 for r in rows), "unequal": sum(not r["equal"] for r in rows),
            "unclear_errors": sum(r.get("clear_error") is False for r in rows)}


def _relative(path: Path | None, caches: Path, run: Path) -> str | None:
    """The file a point hit, as ``run/...`` or ``cache/...`` (None for a step or time point)."""
    if path is None:
        return None
    for base, name in ((run, "run"), (caches, "cache")):
        try:
            parts = path.relative_to(base).parts
        except ValueError:
            continue
        return "/".join((name, *(parts[1:] if name == "cache" else parts)))
    return str(path)


def tiny_run_argv(data: Path, cache: Path, *, small: bool = False) -> Callable[[Path], list[str]]:
    """``dogbench run`` on a tiny dataset: extraction, head tuning, the baseline, evaluation, fine-tuning (lp-ft
    and lora of a tiny CNN and ViT, 2 epochs with mid-epoch checkpoints) and the report; ``small``: the CNN's
    lp-ft alone."""
    models = (["--backbone", "cnn=test_resnet@random,input_size=32"] if small else
              ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"])

    def argv(out: Path) -> list[str]:
        return ["run", "--data", str(data), "--out", str(out), "--cache-dir", str(cache / out.name), *models,
                "--methods", "frozen,lp-ft" if small else "frozen,lp-ft,lora", "--trials", "4", "--epochs", "2",
                "--quiet",
                "--set", "tune.max_epochs=10", "--set", "evaluate.n_bootstrap=100", "--set", "finetune.batch_size=4",
                "--set", "finetune.checkpoint_every=2", "--set", "report.explain=1", "--set", "report.examples=2"]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=40, help="SIGKILL points")
    p.add_argument("--full-disk", type=int, default=6, help="ENOSPC points (a write that fills the disk)")
    p.add_argument("--small", action="store_true", help="one tiny CNN (lp-ft) instead of a CNN and a ViT "
                   "(lp-ft, lora): the CI variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, help="work folder (default: a new temporary one)")
    p.add_argument("--json", type=Path, help="write the campaign's rows here")
    args = p.parse_args(argv)
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_class_folder_layout

    root = args.root or Path(tempfile.mkdtemp(prefix="dogbench-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    data = make_class_folder_layout(root / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    summary = campaign(tiny_run_argv(data, root / "caches", small=args.small), root, args.points,
                       full_disk=args.full_disk, seed=args.seed)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(summary['points'])} points, {summary['crashes']} reruns that failed, {summary['unequal']} results "
          f"unequal to the uninterrupted run's, {summary['unclear_errors']} full disks without a clear error "
          f"(reference {summary['reference_s']} s, sites {summary['sites']})")
    return 0 if summary["crashes"] == summary["unequal"] == summary["unclear_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
