"""``dogbench``: thin subcommands over the library. ``dogbench run`` is the main job."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dogbench import __version__
from dogbench.config import FROZEN, METHODS, ConfigError, RunConfig, load_config, resolve, saved_to_doc
from dogbench.data.download import prepare_dataset
from dogbench.errors import DogbenchError
from dogbench.rundir import RESULTS_FILE, RunDir, RunFolderError

if TYPE_CHECKING:
    from dogbench.data import Dataset
    from dogbench.inference import ImagePrediction

RANKED = frozenset({"extract", "tune", "evaluate", "run", "finetune"})  # the commands torchrun can launch

EPILOG = """examples:
  dogbench run --data ~/data/stanford-dogs                    # ViT-S/16 vs ResNet50 (hub weights)
  dogbench run --config configs/shared-dev.toml --out runs/shared-dev
  dogbench run --data my_images --backbone cnn=resnet50 --backbone vit=vit_b16 --trials 20
  dogbench run --backbone vit=vit_small_patch14_dinov2@w.safetensors,img_size=224 --set 'tune.heads=["linear"]'
  dogbench predict runs/shared-dev dog.jpg photos/ --top-k 3 --format json
  dogbench evaluate runs/shared-dev                           # its config.json is the source of truth
"""


def _add_common(p: argparse.ArgumentParser, *, run_dir: str = "out") -> None:
    """The flags of the commands that build a config; ``run_dir``: "out" (--out, made if missing) or "positional"
    (an existing RUN_DIR, whose config.json is the source of truth)."""
    if run_dir == "positional":
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench tune` or `run` wrote")
    p.add_argument("--config", type=Path, help="TOML config file (see README)")
    p.add_argument("--data", help="dataset folder: Stanford Dogs (official or Kaggle layout, or the .tar "
                   "archives) or class-per-folder images; default: the Stanford Dogs cache, downloaded if missing")
    p.add_argument("--backbone", action="append", default=[], metavar="LABEL=SPEC",
                   help="LABEL=MODEL[@WEIGHTS][,key=value...]; MODEL an alias or timm tag; WEIGHTS hub (default), "
                   "random or a file; repeatable (default: vit=vit_s16, resnet=resnet50)")
    p.add_argument("--trials", type=int, help="Optuna trials per backbone (tune.trials)")
    p.add_argument("--storage", help="Optuna storage URL shared by tuning workers, e.g. "
                   "postgresql://user:password@host:5432/db (tune.storage; default SQLite in the run folder)")
    p.add_argument("--study", help="study name shared by workers (tune.study; one study per backbone: NAME-LABEL)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (features.device)")
    p.add_argument("--precision", help="auto, fp32, bf16, fp16 (features.precision)")
    if run_dir == "out":
        p.add_argument("--out", help="run folder (default runs/<timestamp>); an existing one keeps its config.json")
        p.add_argument("--force", action="store_true", help="replace an existing run folder's config.json with the "
                       "given config (stages whose inputs changed are computed again)")
    p.add_argument("--cache-dir", help="feature cache folder (default $DOGBENCH_CACHE/features)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, help="stop at the first unreadable image "
                   "(data.strict; default: skip it with a warning)")
    p.add_argument("--crop-to-box", action=argparse.BooleanOptionalAction,
                   help="crop Stanford Dogs images to their annotated box (data.crop_to_box)")
    p.add_argument("--classes", help="a subset of the classes for quick trials: the first N, or names a,b,c "
                   "(data.classes)")
    p.add_argument("--box-ablation", action=argparse.BooleanOptionalAction, help="every backbone twice, box-cropped "
                   "and whole images, as comparable rows of one run (data.box_ablation; needs Annotation/)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="download Stanford Dogs when it is not found (data.download; default on)")
    p.add_argument("--data-url", help="mirror URL for the Stanford Dogs archives")
    p.add_argument("--seeds", type=int, help="repeat split, tuning and evaluation with N seeds (evaluate.seeds)")
    p.add_argument("--shots", help="data efficiency: images per class, e.g. 1,2,5,10,20,all (shots.shots)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set tune.timeout_s=60 or --set backbones.vit.img_size=224 "
                   "(applied after --config and --backbone; repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dogbench", description="Does a Vision Transformer beat a ResNet50 on your fine-grained images?",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dogbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "run": "the main job: extract (cached), tune heads, evaluate, compare",
        "extract": "extract features into the cache (nothing else)",
        "tune": "extract (cached) and tune heads on train/val; writes <out>/<label>/tuning.json",
        "finetune": "fine-tune every backbone with --methods (default: lora,partial,full,lp-ft) beside the frozen "
                    "protocol's tuned head, tuned on validation, scored on test once; one results.json and report",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name in ("run", "finetune"):
            p.add_argument("--methods", help="rows of the ladder, comma-separated: frozen,lora,partial,full,lp-ft "
                           "(finetune.methods; run's default: frozen)")
            p.add_argument("--epochs", type=int, help="fine-tuning epochs (finetune.epochs)")
    _add_evaluate_bench(sub)
    _add_report(sub)
    _add_explain(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_models(sub)
    return parser


def _add_evaluate_bench(sub: Any) -> None:
    """``evaluate`` (a run folder's tuned heads, scored once) and ``bench`` (speed)."""
    help_text = "refit the tuned heads of RUN_DIR on train+val, score test once, compare (its config.json rules)"
    _add_common(sub.add_parser("evaluate", help=help_text, description=help_text), run_dir="positional")
    help_text = ("time decode alone, the model alone, end-to-end extraction and the hand-written recipe, against "
                 "the device's matmul peak; writes bench.csv (timm's columns) to --out")
    bench = sub.add_parser("bench", help=help_text, description=help_text)
    _add_common(bench)
    bench.add_argument("--images", type=int, help="images per pass (bench.images)")
    bench.add_argument("--repeats", type=int, help="rounds; figures are medians over them (bench.repeats)")
    bench.add_argument("--batch-size", type=int, help="images per forward pass (features.batch_size)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="also time the model under torch.compile (bench.compare_compile)")
    bench.add_argument("--train", action=argparse.BooleanOptionalAction, help="time fine-tuning instead: the "
                       "training step alone, end to end, and the hand-written recipe (bench.train)")
    bench.add_argument("--recipe", action=argparse.BooleanOptionalAction,
                       help="time the ImageFolder + DataLoader recipe too (bench.recipe; default on)")


def _add_report(sub: Any) -> None:
    """``report``: one or more run folders -> report.html and report.md."""
    help_text = ("write report.html (self-contained) and report.md from one or more run folders; several folders "
                 "(frozen and fine-tuned, other datasets) combine into one comparison")
    report = sub.add_parser("report", help=help_text, description=help_text)
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders that `dogbench run` wrote")
    report.add_argument("--out", type=Path, help="folder for the report (default: the run folder; with several "
                        "runs, runs/report-<timestamp>)")
    report.add_argument("--examples", type=int, help="test images in the predictions grid (report.examples)")
    report.add_argument("--explain", type=int, help="of those, images explained with attention rollout / Grad-CAM "
                        "when the run folder has none yet (report.explain; 0: never load a model)")
    report.add_argument("--seed", type=int, help="which test images the grid shows (report.seed)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_explain(sub: Any) -> None:
    """``explain``: attention rollout / Grad-CAM overlays of photos."""
    help_text = "write attention-rollout (ViT) / Grad-CAM (CNN) overlays of photos for every model of a run"
    explain = sub.add_parser("explain", help=help_text, description=help_text)
    explain.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="a run folder: its config names the backbones, its tuned heads give the breeds")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="photos to explain")
    explain.add_argument("--out", type=Path, help="folder for the overlays (default: RUN_DIR/explanations/photos)")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")


def _add_predict(sub: Any) -> None:
    """``predict``: top-k breeds of photos with every model of a run."""
    help_text = "classify photos (files and folders) with every model of a run: top-k breeds as a table, JSON or CSV"
    predict = sub.add_parser("predict", help=help_text, description=help_text)
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench run` wrote")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders (walked)")
    predict.add_argument("--top-k", type=int, default=5, help="breeds per model (default 5)")
    predict.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output (default table)")
    predict.add_argument("--out", type=Path, help="write the output to this file instead of standard output")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")
    predict.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's features "
                         "setting: 64 on CPU)")
    predict.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                         help="stop at the first unreadable file (default: report it and go on)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_serve(sub: Any) -> None:
    """``serve``: the Gradio demo."""
    help_text = "a web page (Gradio) where every model of a run answers uploaded photos and shows where it looked"
    serve = sub.add_parser("serve", help=help_text, description=help_text + "; binds 127.0.0.1 unless --host says "
                           "otherwise, and never opens a public share link")
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench run` wrote")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    serve.add_argument("--max-megapixels", type=float, default=50.0,
                       help="largest image in megapixels, refused before decoding (default 50)")
    serve.add_argument("--concurrency", type=int, default=2, help="requests worked on at once; the rest queue "
                       "(default 2)")
    serve.add_argument("--examples", type=int, default=8, help="test photos of the run offered as examples "
                       "(default 8)")


def _add_models(sub: Any) -> None:
    """``models``: architectures from timm, beside the ViT paper's Table 1."""
    help_text = ("print the architecture of timm models (layers, hidden size, MLP size, heads, parameters), built on "
                 "the meta device: the ViT variants table by default, beside the ViT paper's Table 1")
    models = sub.add_parser("models", help=help_text, description=help_text)
    models.add_argument("names", nargs="*", metavar="MODEL",
                        help="aliases or timm tags (default: ViT-S/B/L/H, ResNet50)")
    models.add_argument("--json", action="store_true", help="machine-readable output")


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
        "seeds": "evaluate.seeds", "epochs": "finetune.epochs",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("dogbench: interrupted; cached chunks and finished stages are kept", file=sys.stderr)
        return 130
    except DogbenchError as err:  # a user-facing error: one clear message, no traceback
        print(f"dogbench: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output path that cannot be written, a full disk, a vanished file
        target = err.filename2 or err.filename  # an atomic write's rename names the temp file first
        where = f": {target}" if target else ""
        print(f"dogbench: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from dogbench import distributed

    if distributed.launched() and args.command not in RANKED:
        raise DogbenchError(f"`dogbench {args.command}` runs as one process; under torchrun: "
                            f"{', '.join(sorted(RANKED))}")
    if args.command == "models":
        from dogbench.architecture import models_command

        print(models_command(args.names, as_json=args.json))
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "serve":
        return _serve(args)
    start = time.perf_counter()
    cfg = config_from_args(args)
    progress = not args.quiet
    if distributed.launched() and args.command != "extract":
        return _ranked(args, cfg, start=start, progress=progress)
    dataset = prepare_dataset(cfg.data, progress=progress)  # before torch is imported: fails in a second
    data_s = time.perf_counter() - start

    if args.command == "bench":
        from dogbench.bench.extract import run_bench
        from dogbench.bench.train import run_train_bench

        bench = (run_train_bench if cfg.bench.train else run_bench)(cfg, dataset, progress=progress)
        out = Path(cfg.out) if cfg.out else Path("runs") / ("bench-" + time.strftime("%Y%m%d-%H%M%S"))
        bench.write(out, cfg)
        print(bench.summary_table())
        print(f"bench: {out / ('train_bench.csv' if cfg.bench.train else 'bench.csv')}")
        return 0


    if args.command == "extract":
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
            state = "cached" if f.cache_hit else f"computed {f.n_computed} images in {f.extract_s:.1f} s"
            print(f"{label}: {bf.info.tag} features {f.features.shape} key {f.key[:16]} ({state}); "
                  f"{len(f.skipped)} skipped")
        return 0
    return _pipeline(args, cfg, dataset, data_s=data_s, start=start, progress=progress)


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


def _report(args: argparse.Namespace) -> int:
    from dogbench.config import ReportConfig
    from dogbench.pipeline import report_stage

    # one run folder: its own [report] settings are the defaults
    one = RunDir(args.runs[0]) if len(args.runs) == 1 else None
    d = one.read_config().report if one is not None and one.exists() else ReportConfig()
    examples = d.examples if args.examples is None else args.examples
    explain = d.explain if args.explain is None else args.explain
    if examples < 0 or explain < 0:
        raise ConfigError(f"--examples and --explain must be >= 0, got {examples} and {explain}")
    cfg = dataclasses.replace(d, examples=examples, explain=min(explain, examples),
                              seed=d.seed if args.seed is None else args.seed)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else Path("runs") / time.strftime("report-%Y%m%d-%H%M%S"))
    with RunDir(out).lock():  # the report's files (and a run's explanations) are written into the folder
        files = report_stage(args.runs, out, cfg, progress=not args.quiet)
    print("\n".join(files.verdicts))
    print(f"report: {files.html}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from dogbench.explain import explain_run
    from dogbench.inference import load_run

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise DogbenchError(f"No such image file: {', '.join(missing)}")
    out = args.out or RunDir(args.run_dir).photo_explanations_dir
    records = explain_run(load_run(args.run_dir, device=args.device, require_heads=False), args.images, out)
    for r in records:
        print(f"{r['image']} {r['label']} ({r['method']}): {out / r['png']}; "
              f"top-3 {', '.join(f'{n} {p:.0%}' for n, p in r['top3']) or '(no tuned head)'}")
    for figure in dict.fromkeys(r["figure"] for r in records):
        print(f"side by side: {out / figure}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dogbench.atomic import atomic_write_text
    from dogbench.device import resolve_device
    from dogbench.inference import collect_images, load_run

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    resolve_device(args.device)  # checked against this machine before anything is read
    images = collect_images(args.paths)  # before any model is loaded: a typo fails in a second
    run = load_run(args.run_dir, device=args.device, batch_size=args.batch_size)
    predictions = run.predict(images, top_k=args.top_k, strict=args.strict, progress=not args.quiet)
    text = format_predictions(predictions, fmt=args.format, run=str(run.path), top_k=args.top_k,
                              temperatures={label: m.temperature for label, m in run.models.items()})
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    bad = sum(p.error is not None for p in predictions)
    print(f"predicted {len(predictions) - bad} images with {', '.join(run.models)} ({run.path}); "
          f"{bad} unreadable, skipped" + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dogbench.device import resolve_device
    from dogbench.serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, device=args.device, max_upload_mb=args.max_upload_mb,
                         max_megapixels=args.max_megapixels, concurrency=args.concurrency, examples=args.examples)
    resolve_device(config.device)  # checked against this machine before any model is loaded
    warnings.simplefilter("ignore", ResourceWarning)  # the web server's event loops, not the user's business
    serve(args.run_dir, config)
    return 0


def format_predictions(
    predictions: Sequence[ImagePrediction], *, fmt: str, run: str, top_k: int, temperatures: dict[str, float | None]
) -> str:
    """``dogbench predict``'s output: an aligned table, JSON (run, models, calibration, top_k, predictions) or CSV
    rows of (image, model, rank, breed, probability, error). ``temperatures``: per model, the calibration its
    probabilities carry (None: uncalibrated)."""
    if fmt == "json":
        doc = {"run": run, "models": list(temperatures), "calibration": {
            label: {"temperature": t, "calibrated": t is not None} for label, t in temperatures.items()},
            "top_k": top_k, "predictions": [p.to_dict() for p in predictions]}
        return json.dumps(doc, indent=2) + "\n"
    rows = []
    for p in predictions:
        if p.error:
            rows.append([p.image, "-", "", "", "", p.error])
            continue
        for label, top in p.top.items():
            rows += [[p.image, label, str(rank), breed, f"{prob:.6f}", ""] for rank, (breed, prob) in enumerate(top, 1)]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "model", "rank", "breed", "probability", "error"])
        writer.writerows(rows)
        return buffer.getvalue()
    lines = []
    for p in predictions:
        if p.error:
            lines.append([p.image, "-", f"unreadable: {p.error}"])
        for label, top in p.top.items():
            lines.append([p.image, label, ", ".join(f"{breed} {prob:.1%}" for breed, prob in top)])
    header = ["image", "model", f"top-{top_k}"]
    widths = [max(len(r[k]) for r in [header, *lines]) for k in range(2)]
    out = [f"{header[0].ljust(widths[0])}  {header[1].ljust(widths[1])}  {header[2]}"]
    out += [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in lines]
    out.append("probabilities: " + ", ".join(
        f"{label} temperature-scaled (T = {t:.3f}, fitted on the run's validation split)" if t is not None
        else f"{label} uncalibrated" for label, t in temperatures.items()))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
