"""Seeded fault injection for whole `dogbench` commands (issue 14), shared by tests/test_faults.py and the long
soak (``python tests/faults.py --points 40 --json faults.json``).

A *point* is where a command is hurt: ``write:N`` (the N-th atomic write, its temporary file cut to half its
size, then SIGKILL before the rename: a kill mid-write), ``step:N`` (after the N-th optimizer step of
fine-tuning: mid-epoch), ``time:S`` (SIGKILL S seconds after the start, anywhere), ``enospc:N`` (the N-th atomic
write fails with ENOSPC after half its bytes) or ``disk:B`` (a real full disk: the command runs on a tmpfs left
with B free bytes, so whichever write comes first fails, SQLite's and torch's included; ``--disk`` mounts it,
which needs root). Under ``--torchrun`` a point is ``R/write:N`` etc.: armed in rank R of a 2-rank torchrun.

The harness imports what a run imports once (``preload``), then forks a child per command (no torch op runs in
the parent, so the children's thread pools start clean): the hurt command, then the same command again, whose
results must equal an uninterrupted run's. Under ``--torchrun`` each command is a torchrun launch of this file,
whose ranks arm their point and call ``cli.main``.

The injection lives here, not in the product: the child wraps ``dogbench.atomic.atomic_open`` and
``training.Stepper.optimizer_step`` before it calls ``cli.main``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FIELDS = ("val", "test", "head", "baseline", "calibration", "tta")  # deterministic parts of a row (no timings)


def _install(point: str, counts: dict[str, int] | None = None) -> None:
    """In the child: arm ``point`` (``counts``: count the sites instead, for a reference run)."""
    import dogbench.atomic as atomic
    from dogbench import training

    site, _, arg = point.partition(":")
    seen = {"write": 0, "step": 0}
    last: dict[str, Any] = {"file": "", "stepping": False}  # the latest atomic write begun; optimizer steps since?
    log = Path(os.environ["DOGBENCH_FAULT_LOG"]) if "DOGBENCH_FAULT_LOG" in os.environ else Path(os.devnull)

    def kill() -> None:
        log.write_text(json.dumps(last))  # which file the point hit, or followed, for the campaign's table
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(kind: str) -> bool:
        seen[kind] += 1
        if counts is not None:
            counts[kind] = seen[kind]
        return (site == kind or (site, kind) == ("enospc", "write")) and seen[kind] == int(arg)

    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[Any]:
        last.update(file=str(path), stepping=False)
        if not hit("write"):
            with real_open(path, mode) as handle:
                yield handle
            return
        log.write_text(json.dumps(last))
        if site == "enospc":  # the disk fills up during this write: the real writer fails as a full disk fails
            with real_open(path, mode) as handle:
                yield _FullDisk(handle)
            return
        # what a kill mid-write leaves behind, named as atomic_open names it (so the next write removes it)
        tmp = Path(path).parent / f"{atomic.temporary_prefix(Path(path))}{os.getpid()}.fault.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)  # as atomic_open makes the target's folder
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            handle.truncate(max(0, handle.tell() // 2))
        kill()

    atomic.atomic_open = atomic_open
    real_step = training.Stepper.optimizer_step

    def optimizer_step(self: Any, step: int) -> None:
        real_step(self, step)
        last["stepping"] = True
        if hit("step"):
            kill()

    training.Stepper.optimizer_step = optimizer_step
    if site == "time":
        threading.Timer(float(arg), kill).start()


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
    return _wait(_fork(argv, point, counts_file, log))


def run_children(argvs: list[list[str]], logs: list[Path]) -> list[int]:
    """Several ``dogbench argv`` at once, each in a forked child writing to its log; their exit statuses."""
    return [_wait(pid) for pid in [_fork(argv, None, None, log) for argv, log in zip(argvs, logs, strict=True)]]


def _fork(argv: list[str], point: str | None, counts_file: Path | None, log: Path | None) -> int:
    """Start ``dogbench argv`` in a forked child (``point`` armed, output to ``log``); the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            if log is not None:
                os.environ["DOGBENCH_FAULT_LOG"] = str(log.with_suffix(".hit"))
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
            code = _armed_main(argv, point, counts_file)
        except BaseException:  # noqa: BLE001 - what main let through is a crash: shown, then exit 70
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    """The exit status of the forked child ``pid`` once it ends (negative: killed by that signal)."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _armed_main(argv: list[str], point: str | None, counts_file: Path | None) -> int:
    """``cli.main(argv)`` with ``point`` armed (or, with ``counts_file``, the sites counted into it)."""
    counts: dict[str, int] | None = {} if counts_file is not None else None
    if point is not None or counts is not None:
        _install(point or "none:0", counts)
    from dogbench.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    if counts_file is not None:  # the sites, and how long the command ran in this process
        counts_file.write_text(json.dumps({**(counts or {}), "seconds": round(time.perf_counter() - t0, 2)}))
    return code


def run_torchrun(argv: list[str], point: str | None = None, counts_file: Path | None = None,
                 log: Path | None = None, *, ranks: int = 2) -> int:
    """``dogbench argv`` under ``torchrun --nproc-per-node ranks`` (gloo on the CPU), ``point`` (``R/...``) armed in
    rank R; torchrun's exit status (it ends every rank when one dies)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOGBENCH_FAULT_POINT": point or "",
           "DOGBENCH_FAULT_COUNTS": str(counts_file or ""), "DOGBENCH_FAULT_LOG": str(log.with_suffix(".hit"))
           if log is not None else ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           __file__, "--rank-child", *argv]
    with open(log if log is not None else os.devnull, "ab") as out:
        launch = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return launch.wait(timeout=300)
        except subprocess.TimeoutExpired:  # a hang: no rank outlives the harness
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
            raise


def _rank_child(argv: list[str]) -> None:
    """One torchrun rank: arm this rank's part of DOGBENCH_FAULT_POINT, run ``dogbench argv``, exit with its code
    (``os._exit``: a pending time point must not outlive the command)."""
    if sys.platform == "linux":  # this rank dies with its torchrun agent, even a SIGKILLed one: no orphans
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    rank = os.environ["RANK"]
    target, _, point = os.environ.get("DOGBENCH_FAULT_POINT", "").partition("/")
    counts = os.environ.get("DOGBENCH_FAULT_COUNTS")
    if not os.environ.get("DOGBENCH_FAULT_LOG"):
        os.environ.pop("DOGBENCH_FAULT_LOG", None)
    code = 70
    try:
        code = _armed_main(argv, point if target == rank else None,
                           Path(f"{counts}.rank{rank}") if counts else None)
    except BaseException:  # noqa: BLE001 - as in run_child
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_results(run: Path) -> dict[str, Any]:
    """What a run computed, without its timings: every row's scores and every saved prediction's numbers."""
    results = json.loads((run / "results.json").read_text())
    out: dict[str, Any] = {"models": {label: {k: row.get(k) for k in RESULT_FIELDS}
                                      for label, row in results["models"].items()},
                           "comparisons": results.get("comparisons")}
    for label in results["models"]:
        with np.load(run / label / "predictions.npz", allow_pickle=False) as z:
            out[f"{label}/predictions"] = {k: z[k].tobytes().hex() for k in sorted(z.files)}
    import hashlib

    for weights in sorted(run.glob("**/*.safetensors")):  # heads, fine-tuned backbones, adapters, best epochs
        out[str(weights.relative_to(run))] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return out


def points(counts: dict[str, dict[str, int]], seconds: float, n: int, *, seed: int) -> list[str]:
    """``n`` kill points drawn with ``seed``: about half at atomic writes, a quarter at optimizer steps, the rest
    at times within the uninterrupted run's duration, in the order write, step, time, write (so the first three
    points hit every kind). ``counts``: the sites per rank; with more than one rank, each point is armed in a
    rank drawn too (``R/kind:N``)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    for i in range(n):
        first = ("write", "step", "time", "write")[i % 4]
        kind, ranks = next((k, r) for k in (first, "write", "step", "time")
                           if (r := [r for r in sorted(counts) if k == "time" or counts[r].get(k)]))
        rank = rng.choice(ranks)
        if kind == "time":  # within the rank's own run (the reference's ran longest)
            point = f"time:{rng.uniform(0.5, max(1.0, 0.9 * counts[rank].get('seconds', seconds))):.2f}"
        else:
            point = f"{kind}:{rng.randint(1, counts[rank][kind])}"
        chosen.append(f"{rank}/{point}" if len(counts) > 1 else point)
    return chosen


def disk_points(total: int, n: int, *, seed: int, least: int = 4096) -> list[str]:
    """``n`` free-space amounts for real full disks, log-uniform between ``least`` bytes and ``total`` (what the
    uninterrupted run wrote), one per stratum: the early small writes (feature chunks, the study's SQLite file)
    get as many points as the big late ones (checkpoints, the report)."""
    rng = random.Random(seed + 2)
    span = math.log(max(total, least + 1) / least)
    return [f"disk:{int(least * math.exp(span * (i + rng.random()) / n))}" for i in range(n)]


def preload() -> None:
    """Import what a ``dogbench run`` imports (torch, timm, optuna, sklearn, matplotlib: seconds per command),
    once, in the harness: the forked children start from it. No torch op runs here, so no thread pool starts."""
    import torch.utils.tensorboard  # noqa: F401 - the default tracker's writer

    import dogbench.cli  # noqa: F401
    import dogbench.explain  # noqa: F401
    import dogbench.pipeline  # noqa: F401
    import dogbench.protocols.finetune  # noqa: F401
    import dogbench.report.render  # noqa: F401
    import dogbench.track  # noqa: F401
    import dogbench.training  # noqa: F401


def campaign(make_argv: Callable[[Path], list[str]], root: Path, n: int, *, full_disk: int = 0, disk: int = 0,
             torchrun: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """An uninterrupted reference run, then ``n`` seeded kill points, ``full_disk`` injected ENOSPC points and
    ``disk`` real full disks (a tmpfs): each a fresh folder, the command hurt there, then run again until it
    completes; every completed run's results must equal the reference's. ``torchrun``: every command is a
    2-rank torchrun and the kill points are armed in one rank each (no disk points)."""
    preload()
    from conftest import tmpfs

    runner = run_torchrun if torchrun else run_child
    reference = root / "reference"
    counts_file = root / "counts.json"
    t0 = time.perf_counter()
    code = runner(make_argv(reference), counts_file=counts_file, log=root / "reference.log")
    seconds = time.perf_counter() - t0
    if code != 0:
        raise AssertionError(f"the reference run failed ({code}): {(root / 'reference.log').read_text()[-3000:]}")
    expected = run_results(reference)
    counts = ({str(r): json.loads(Path(f"{counts_file}.rank{r}").read_text()) for r in range(2)} if torchrun
              else {"0": json.loads(counts_file.read_text())})
    written = sum(f.stat().st_size for f in root.glob("reference*/**/*") if f.is_file())
    rng = random.Random(seed + 1)
    chosen = (points(counts, seconds, n, seed=seed)
              + [f"enospc:{rng.randint(1, counts['0']['write'])}" for _ in range(full_disk if not torchrun else 0)]
              + disk_points(written, disk if not torchrun else 0, seed=seed))
    rows = []
    with (tmpfs(root / "disk", 2 * written + (64 << 20)) if any(c.startswith("disk:") for c in chosen)
          else contextlib.nullcontext()) as mounted:
        for i, point in enumerate(chosen):
            rows.append(_one_point(runner, make_argv, root, mounted, i, point, expected))
            log(json.dumps(rows[-1]))
    return {"reference_s": round(seconds, 2), "sites": counts if torchrun else counts["0"], "written": written,
            "points": rows, "crashes": sum(r["rerun_exit"] != 0 for r in rows),
            "unequal": sum(not r["equal"] for r in rows),
            "unclear_errors": sum(r.get("clear_error") is False for r in rows),
            "temporaries_left": sum(len(r["temporaries_left"]) for r in rows),
            "stages": {s: sum(r["stage"] == s for r in rows) for s in sorted({r["stage"] for r in rows})}}


def _one_point(runner: Callable[..., int], make_argv: Callable[[Path], list[str]], root: Path,
               disk: Path | None, i: int, point: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Hurt the command at ``point`` in a fresh folder, run it again until it completes; the campaign's row."""
    from conftest import fill

    kind, _, arg = point.rpartition("/")[2].partition(":")
    folder = (disk if kind == "disk" else root) / f"point{i:02d}"
    log_file = root / f"point{i:02d}.log"
    filler = fill(disk, int(arg)) if kind == "disk" else None
    first = runner(make_argv(folder), None if filler else point, log=log_file)
    if filler is not None:
        filler.unlink()  # the user frees the disk
    said = log_file.read_text(errors="replace") if log_file.is_file() else ""
    reruns, code = 0, None
    while code != 0 and reruns < 3:  # a rerun must finish (a time point may also fire after the end)
        code = runner(make_argv(folder), log=root / f"point{i:02d}.rerun.log")
        reruns += 1
    hit = log_file.with_suffix(".hit")
    struck = json.loads(hit.read_text()) if hit.is_file() else {"file": "", "stepping": False}
    target = Path(struck["file"]) if struck["file"] else None
    if kind == "disk":
        failed = re.search(r"No space left on device: (\S+)", said)
        target = Path(failed.group(1)) if failed else None
    file = _relative(target, folder)
    row = {"point": point, "stage": stage(kind, file, stepping=struck["stepping"]), "file": file,
           "first_exit": first, "rerun_exit": code, "reruns": reruns,
           "equal": code == 0 and run_results(folder) == expected,
           "temporaries_left": sorted(str(p.relative_to(folder.parent)) for base in (folder, _cache_of(folder))
                                      for p in base.rglob("*.tmp"))}
    if kind in ("enospc", "disk"):  # exit 2, the full disk and the file named, no traceback
        row["clear_error"] = (first == 2 and "No space left on device: " in said and "Traceback" not in said)
    if kind == "disk":
        shutil.rmtree(folder)  # the tmpfs holds one point at a time
        shutil.rmtree(_cache_of(folder), ignore_errors=True)
    return row


def stage(kind: str, file: str | None, *, stepping: bool = False) -> str:
    """The stage of ``dogbench run`` a point struck, from the file it hit (a write, a full disk) or, for a time
    point, the latest file written before it or ``stepping`` (optimizer steps since that write): extract, tune,
    evaluate, finetune, report (or start)."""
    if kind == "step" or (kind == "time" and stepping):
        return "finetune (mid-epoch)"
    if file is None:
        return "start"
    parts = file.split("/")
    if parts[0] not in ("run", "cache") or len(parts) < 2:
        return "other"
    if parts[0] == "cache":
        return "extract"
    if parts[1].startswith(("report", "explanations")):
        return "report"
    if len(parts) >= 4 and parts[2] != "head":  # run/<label>/<method>/...: a fine-tuned model
        return "finetune (checkpoint)" if "train" in parts else "finetune"
    if parts[-1] == "tuning.json" or parts[-1].startswith("optuna.db") or "head" in parts:  # -journal too
        return "tune"
    if parts[-1] in ("predictions.npz", "results.json", "results.csv", "summary.txt"):
        return "evaluate"
    return "start" if parts[-1] == "config.json" else "run"


def _cache_of(run: Path) -> Path:
    """The feature cache of the run folder ``run`` in these campaigns: beside it."""
    return run.with_name(f"{run.name}.cache")


def _relative(path: Path | None, run: Path) -> str | None:
    """The file a point hit, as ``run/...`` or ``cache/...`` (None for a step or time point)."""
    if path is None:
        return None
    for base, name in ((run, "run"), (_cache_of(run), "cache")):
        try:
            parts = path.relative_to(base).parts
        except ValueError:
            continue
        return "/".join((name, *parts))
    return str(path)


# the recipe's random and stateful parts on (EMA weights, mixup / cutmix draws), and TTA in the test scoring: a
# resumed run must still equal the uninterrupted one
RECIPE = ["--set", "finetune.ema_decay=0.9", "--set", "finetune.mixup=0.8", "--set", "finetune.cutmix=1.0",
          "--set", 'evaluate.tta="flip"']


def tiny_run_argv(data: Path, *, small: bool = False, ranked: bool = False) -> Callable[[Path], list[str]]:
    """``dogbench run`` on a tiny dataset, its feature cache beside the run folder: extraction, head tuning,
    the baseline, evaluation, fine-tuning (lp-ft and lora of a tiny CNN and ViT, 2 epochs with mid-epoch
    checkpoints; EMA, mixup and cutmix on, flip-TTA in test scoring) and the report; ``small``: the CNN's lp-ft
    alone; ``ranked``: for torchrun (chunks small enough for each rank to write some)."""
    models = (["--backbone", "cnn=test_resnet@random,input_size=32"] if small else
              ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"])

    def argv(out: Path) -> list[str]:
        return ["run", "--data", str(data), "--out", str(out), "--cache-dir", str(_cache_of(out)), *models,
                "--methods", "frozen,lp-ft" if small else "frozen,lp-ft,lora", "--trials", "4", "--epochs", "2",
                "--quiet",
                "--set", "tune.max_epochs=10", "--set", "evaluate.n_bootstrap=100", "--set", "finetune.batch_size=4",
                "--set", "finetune.checkpoint_every=2", "--set", "report.explain=1", "--set", "report.examples=2",
                *RECIPE,
                *(["--set", "features.chunk_size=8"] if ranked else [])]  # several chunks: every rank writes some
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-child"]:
        _rank_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=40, help="SIGKILL points")
    p.add_argument("--full-disk", type=int, default=6, help="injected ENOSPC points (a write that fills the disk)")
    p.add_argument("--disk", type=int, default=0, help="real full disks: the command on a tmpfs with a seeded "
                   "number of bytes left (mounts one: needs root)")
    p.add_argument("--torchrun", action="store_true", help="every command a 2-rank torchrun (gloo), each kill point "
                   "in one rank; no full-disk points")
    p.add_argument("--small", action="store_true", help="one tiny CNN (lp-ft) instead of a CNN and a ViT "
                   "(lp-ft, lora): the CI variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, help="work folder (default: a new temporary one)")
    p.add_argument("--json", type=Path, help="write the campaign's rows here")
    args = p.parse_args(argv)
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import MountUnavailable, make_class_folder_layout

    root = args.root or Path(tempfile.mkdtemp(prefix="dogbench-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    data = make_class_folder_layout(root / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    try:
        summary = campaign(tiny_run_argv(data, small=args.small, ranked=args.torchrun), root, args.points,
                           full_disk=args.full_disk, disk=args.disk, torchrun=args.torchrun, seed=args.seed)
    except MountUnavailable as err:
        print(f"faults.py: {err}", file=sys.stderr)
        return 3
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(summary['points'])} points, {summary['crashes']} reruns that failed, {summary['unequal']} results "
          f"unequal to the uninterrupted run's, {summary['unclear_errors']} full disks without a clear error, "
          f"{summary['temporaries_left']} temporaries left (reference {summary['reference_s']} s, sites "
          f"{summary['sites']})")
    clean = summary["crashes"] == summary["unequal"] == summary["unclear_errors"] == summary["temporaries_left"] == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
