"""The commands that build a config and work on a dataset: run, extract, tune, finetune, evaluate, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dogbench.cli.text import plural
from dogbench.config import FROZEN, METHODS, ConfigError, RunConfig, load_config, resolve, saved_to_doc
from dogbench.rundir import RESULTS_FILE, RunDir, RunFolderError

if TYPE_CHECKING:
    from dogbench.data import Dataset

RANKED = frozenset({"extract", "tune", "evaluate", "run", "finetune"})  # the commands torchrun can launch


def _run_folder(args: argparse.Namespace) -> RunDir | None:
    """The run folder a config-building command works on: RUN_DIR (evaluate) or --out; None for a new one."""
    path = getattr(args, "run_dir", None) or (args.out if args.command in ("run", "tune", "extract", "finetune")
                                              else None)
    return RunDir(path) if path else None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config (or the run folder's own config.json), then --backbone, then flags and --set overrides."""
    run = _run_folder(args)
    force = getattr(args, "force", False)
    if args.config is not None or run is None or (not run.exists() and args.command != "evaluate"):
        doc = load_config(args.config)
    else:
        try:
            doc = saved_to_doc(run.read_config().to_dict())
        except RunFolderError:
            if not force:
                raise
            doc = {}  # --force on an unreadable config.json: the defaults and the flags given write it anew
    overrides = list(args.set)
    flag_keys = {
        "data": "data.root", "trials": "tune.trials", "device": "features.device", "storage": "tune.storage",
        "study": "tune.study",
        "precision": "features.precision", "out": "out", "cache_dir": "features.cache_dir",
        "data_url": "data.data_url", "images": "bench.images", "repeats": "bench.repeats",
        "batch_size": "features.batch_size", "strict": "data.strict", "crop_to_box": "data.crop_to_box",
        "box_ablation": "data.box_ablation",
        "classes": "data.classes",
        "download": "data.download", "compile": "bench.compare_compile", "recipe": "bench.recipe",
        "train": "bench.train",
        "seeds": "evaluate.seeds", "epochs": "finetune.epochs", "track": "track.to",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if getattr(args, "methods", None) is not None:
        overrides.append(f"finetune.methods={json.dumps([m.strip() for m in args.methods.split(',') if m.strip()])}")
    elif args.command == "finetune" and not any(o.startswith("finetune.methods=") for o in overrides) and not any(
            m != FROZEN for m in doc.get("finetune", {}).get("methods", ())):
        overrides.append(f"finetune.methods={json.dumps(list(METHODS))}")
    if getattr(args, "shots", None) is not None:
        overrides.append(f"shots.shots={json.dumps(args.shots.split(','))}")
    if args.command == "evaluate":
        overrides.append(f"out={json.dumps(str(args.run_dir))}")
    cfg = resolve(doc, overrides=overrides, backbone_specs=args.backbone)
    if args.command == "finetune":  # frozen (the ladder's first rung) always; methods add to a folder's own
        saved = run.read_config().finetune.methods if run is not None and run.exists() else ()
        methods = dict.fromkeys((FROZEN, *saved, *cfg.finetune.methods))
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, methods=tuple(methods)))
    if run is None and cfg.out and args.command in ("run", "tune", "extract", "finetune"):
        run = RunDir(cfg.out)  # `out` named by the config file
    if run is not None:
        run.check_config(cfg, force=force)  # before any data is read or downloaded
    elif args.command == "bench" and cfg.out and RunDir(cfg.out).exists() and not Path(cfg.out, "bench.csv").exists():
        raise ConfigError(f"{cfg.out} is a run folder: give `dogbench bench` a folder of its own (--out)")
    return cfg


def run_job(args: argparse.Namespace) -> int:
    """A config-building command: the config first (checked against its run folder), then the dataset, then the
    work (one process, or every rank under torchrun)."""
    from dogbench import distributed
    from dogbench.data.download import prepare_dataset

    start = time.perf_counter()
    cfg = config_from_args(args)
    progress = not args.quiet
    if distributed.launched() and args.command != "extract":
        return _ranked(args, cfg, start=start, progress=progress)
    dataset = prepare_dataset(cfg.data, progress=progress)  # before torch is imported: fails in a second
    data_s = time.perf_counter() - start
    if args.command == "bench":
        return _bench(cfg, dataset, progress=progress)
    if args.command == "extract":
        return _extract(cfg, dataset, progress=progress)
    if args.command == "screen":
        return _screen(args, cfg, dataset, progress=progress)
    return _pipeline(args, cfg, dataset, data_s=data_s, start=start, progress=progress)


def _bench(cfg: RunConfig, dataset: Dataset, *, progress: bool) -> int:
    from dogbench.bench.extract import run_bench
    from dogbench.bench.train import run_train_bench

    bench = (run_train_bench if cfg.bench.train else run_bench)(cfg, dataset, progress=progress)
    out = Path(cfg.out) if cfg.out else Path("runs") / ("bench-" + time.strftime("%Y%m%d-%H%M%S"))
    bench.write(out, cfg)
    print(bench.summary_table())
    print(f"bench: {out / ('train_bench.csv' if cfg.bench.train else 'bench.csv')}")
    return 0


def _screen(args: argparse.Namespace, cfg: RunConfig, dataset: Dataset, *, progress: bool) -> int:
    """``screen``: the given backbones (--backbone or the config's) and the zoo's, ranked; the finalists run."""
    from dogbench.screen.command import ScreenRequest, screen
    from dogbench.screen.rungs import Budget, parse_budget

    budget = parse_budget(args.budget) if args.budget else Budget()
    out = Path(cfg.out) if cfg.out else Path("runs") / ("screen-" + time.strftime("%Y%m%d-%H%M%S"))
    given = cfg.backbones if (args.backbone or args.config) else ()  # not the default pair
    request = ScreenRequest(tuple(given), args.zoo, args.finalists, budget.images, budget.seconds, out, args.force)
    screen(cfg, dataset, request, progress=progress)
    print(f"screen: {out / 'screen.json'}")
    return 0


def _extract(cfg: RunConfig, dataset: Dataset, *, progress: bool) -> int:
    from dogbench import distributed
    from dogbench.device import resolve_device
    from dogbench.protocols.frozen import extract_stage

    ranks = distributed.init(resolve_device(cfg.features.device))  # torchrun's group, or one rank
    try:
        stage = extract_stage(cfg, dataset, progress=progress)
    finally:
        if ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    for label, bf in stage.items() if ranks.main else ():
        f = bf.features
        state = "cached" if f.cache_hit else f"computed {plural(f.n_computed, 'image')} in {f.extract_s:.1f} s"
        print(f"{label}: {bf.info.tag} features {f.features.shape} key {f.key[:16]} ({state}); "
              f"{len(f.skipped)} skipped")
    return 0


def _pipeline(args: argparse.Namespace, cfg: RunConfig, dataset: Dataset, *, data_s: float, start: float,
              progress: bool) -> int:
    """``tune``, ``run``, ``finetune``, ``evaluate`` (one process, or rank 0 under torchrun)."""
    from dogbench import pipeline

    if args.command == "tune":
        tunings, run_dir = pipeline.tune(cfg, dataset, progress=progress, force=args.force)
        for label, t in tunings.items():
            extra = f"; baseline C={t.baseline.C:.3g} val top-1 {t.baseline.val_top1:.4f}" if t.baseline else ""
            print(f"{label}: best {t.tune.best_params} val top-1 {t.tune.best_val_top1:.4f} "
                  f"({t.tune.n_complete} complete, {t.tune.n_pruned} pruned){extra}")
        print(f"tuning: {run_dir}")
        return 0
    if args.command in ("run", "finetune"):
        results, run_dir = pipeline.run(cfg, dataset, data_s=data_s, start=start, progress=progress, force=args.force)
    else:
        results, run_dir = pipeline.evaluate(cfg, dataset, data_s=data_s, start=start, progress=progress)
    print(results.summary_table())
    print(f"results: {run_dir / RESULTS_FILE}")
    return 0


def _ranked(args: argparse.Namespace, cfg: RunConfig, *, start: float, progress: bool) -> int:
    """A pipeline command under torchrun: rank 0 runs it (the dataset opened there once) and announces its
    extractions and trainings; every other rank follows those until rank 0 announces the end."""
    import torch.distributed as dist

    from dogbench import distributed, pipeline
    from dogbench.data.download import prepare_dataset
    from dogbench.device import resolve_device

    ranks = distributed.init(resolve_device(cfg.features.device))
    if not ranks.main:
        pipeline.follow()
        dist.destroy_process_group()
        return 0
    # on an error rank 0 exits without announcing the end, and torchrun stops the other ranks
    dataset = prepare_dataset(cfg.data, progress=progress)
    code = _pipeline(args, cfg, dataset, data_s=time.perf_counter() - start, start=start, progress=progress)
    distributed.announce("done")
    dist.destroy_process_group()
    return code

