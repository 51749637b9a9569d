"""``dogbench``: thin subcommands over the library. ``dogbench run`` is the main job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from dogbench import __version__
from dogbench.config import ConfigError, RunConfig, load_config, resolve, saved_to_doc
from dogbench.download import prepare_dataset
from dogbench.errors import DogbenchError

EPILOG = """examples:
  dogbench run --data ~/data/stanford-dogs                    # ViT-S/16 vs ResNet50 (hub weights)
  dogbench run --config benchmarks/shared-dev.toml --out runs/shared-dev
  dogbench run --data my_images --backbone cnn=resnet50 --backbone vit=vit_b16 --trials 20
  dogbench run --backbone vit=vit_small_patch14_dinov2@w.safetensors,img_size=224 --set 'tune.heads=["linear"]'
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see README)")
    p.add_argument("--data", help="dataset folder: Stanford Dogs (official or Kaggle layout, or the .tar "
                   "archives) or class-per-folder images; default: the Stanford Dogs cache, downloaded if missing")
    p.add_argument("--backbone", action="append", default=[], metavar="LABEL=SPEC",
                   help="LABEL=MODEL[@WEIGHTS][,key=value...]; MODEL an alias or timm tag; WEIGHTS hub (default), "
                   "random or a file; repeatable (default: vit=vit_s16, resnet=resnet50)")
    p.add_argument("--trials", type=int, help="Optuna trials per backbone (tune.trials)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (features.device)")
    p.add_argument("--precision", help="auto, fp32, bf16, fp16 (features.precision)")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--cache-dir", help="feature cache folder (default $DOGBENCH_CACHE/features)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--crop-to-box", action="store_true", help="crop Stanford Dogs images to their annotated box")
    p.add_argument("--no-download", action="store_true", help="never download the dataset")
    p.add_argument("--data-url", help="mirror URL for the Stanford Dogs archives")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set tune.timeout_s=60 (repeatable)")
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
        "evaluate": "refit tuned heads on train+val, score test once, compare; needs a tuned --out",
    }
    for name, help_text in commands.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    help_text = ("time decode alone, the model alone, end-to-end extraction and the hand-written recipe, against "
                 "the device's matmul peak; writes bench.csv (timm's columns) to --out")
    bench = sub.add_parser("bench", help=help_text, description=help_text)
    _add_common(bench)
    bench.add_argument("--images", type=int, help="images per pass (bench.images)")
    bench.add_argument("--repeats", type=int, help="rounds; figures are medians over them (bench.repeats)")
    bench.add_argument("--batch-size", type=int, help="images per forward pass (features.batch_size)")
    bench.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    bench.add_argument("--no-recipe", action="store_true", help="skip the ImageFolder + DataLoader recipe")

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

    help_text = "write attention-rollout (ViT) / Grad-CAM (CNN) overlays of photos for every model of a run"
    explain = sub.add_parser("explain", help=help_text, description=help_text)
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="photos to explain")
    explain.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                         help="a run folder: its config names the backbones, its tuned heads give the breeds")
    explain.add_argument("--out", type=Path, help="folder for the overlays (default: RUN_DIR/explain)")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")

    help_text = ("print the architecture of timm models (layers, hidden size, MLP size, heads, parameters), built on "
                 "the meta device: the ViT variants table by default, beside the ViT paper's Table 1")
    models = sub.add_parser("models", help=help_text, description=help_text)
    models.add_argument("names", nargs="*", metavar="MODEL",
                        help="aliases or timm tags (default: ViT-S/B/L/H, ResNet50)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.command == "evaluate" and not args.out:
        raise ConfigError("dogbench evaluate needs --out: the run folder that `dogbench tune` (or `run`) wrote")
    doc = load_config(args.config)
    if args.command == "evaluate" and args.out and (Path(args.out) / "config.json").is_file() and not args.config:
        doc = saved_to_doc(json.loads((Path(args.out) / "config.json").read_text()))
    overrides = list(args.set)
    flag_keys = {
        "data": "data.root", "trials": "tune.trials", "device": "features.device",
        "precision": "features.precision", "out": "out", "cache_dir": "features.cache_dir",
        "data_url": "data.data_url",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    for attr, key in (("images", "bench.images"), ("repeats", "bench.repeats"), ("batch_size", "features.batch_size")):
        if getattr(args, attr, None) is not None:
            overrides.append(f"{key}={getattr(args, attr)}")
    for attr, key, value in (("strict", "data.strict", "true"), ("crop_to_box", "data.crop_to_box", "true"),
                             ("no_download", "data.download", "false"), ("compile", "bench.compare_compile", "true"),
                             ("no_recipe", "bench.recipe", "false")):
        if getattr(args, attr, False):
            overrides.append(f"{key}={value}")
    return resolve(doc, overrides=overrides, backbone_specs=args.backbone)


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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "models":
        from dogbench.architecture import models_command

        print(models_command(args.names, as_json=args.json))
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "explain":
        return _explain(args)
    start = time.perf_counter()
    cfg = config_from_args(args)
    progress = not args.quiet
    dataset = prepare_dataset(cfg.data, progress=progress)  # before torch is imported: fails in a second
    data_s = time.perf_counter() - start

    if args.command == "bench":
        from dogbench.bench import run_bench

        bench = run_bench(cfg, dataset, progress=progress)
        out = Path(cfg.out) if cfg.out else Path("runs") / ("bench-" + time.strftime("%Y%m%d-%H%M%S"))
        bench.write(out, cfg)
        print(bench.summary_table())
        print(f"bench: {out / 'bench.csv'}")
        return 0

    from dogbench import pipeline

    if args.command == "extract":
        for label, bf in pipeline.extract_stage(cfg, dataset, progress=progress).items():
            f = bf.features
            state = "cached" if f.cache_hit else f"computed {f.n_computed} images in {f.extract_s:.1f} s"
            print(f"{label}: {bf.info.tag} features {f.features.shape} key {f.key[:16]} ({state}); "
                  f"{len(f.skipped)} skipped")
        return 0
    if args.command == "tune":
        tunings, run_dir = pipeline.tune(cfg, dataset, progress=progress)
        for label, t in tunings.items():
            extra = f"; baseline C={t.baseline.C:.3g} val top-1 {t.baseline.val_top1:.4f}" if t.baseline else ""
            print(f"{label}: best {t.tune.best_params} val top-1 {t.tune.best_val_top1:.4f} "
                  f"({t.tune.n_complete} complete, {t.tune.n_pruned} pruned){extra}")
        print(f"tuning: {run_dir}")
        return 0
    stage = pipeline.run if args.command == "run" else pipeline.evaluate
    results, run_dir = stage(cfg, dataset, data_s=data_s, start=start, progress=progress)
    print(results.summary_table())
    print(f"results: {run_dir / 'results.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dogbench.config import ReportConfig
    from dogbench.pipeline import report_stage

    saved: dict = {}  # one run folder: its own [report] settings are the defaults
    if len(args.runs) == 1 and (args.runs[0] / "config.json").is_file():
        saved = json.loads((args.runs[0] / "config.json").read_text()).get("report", {})
    d = dataclasses.replace(ReportConfig(), **{k: v for k, v in saved.items() if k in ReportConfig.__annotations__})
    examples = d.examples if args.examples is None else args.examples
    explain = d.explain if args.explain is None else args.explain
    if examples < 0 or explain < 0:
        raise ConfigError(f"--examples and --explain must be >= 0, got {examples} and {explain}")
    cfg = dataclasses.replace(d, examples=examples, explain=min(explain, examples),
                              seed=d.seed if args.seed is None else args.seed)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else Path("runs") / time.strftime("report-%Y%m%d-%H%M%S"))
    files = report_stage(args.runs, out, cfg, progress=not args.quiet)
    print("\n".join(files.verdicts))
    print(f"report: {files.html}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from dogbench.explain import explain_run

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise DogbenchError(f"No such image file: {', '.join(missing)}")
    out = args.out or args.run / "explain"
    records = explain_run(args.run, args.images, out, device=args.device)
    for r in records:
        print(f"{r['image']} {r['label']} ({r['method']}): {out / r['png']}; "
              f"top-3 {', '.join(f'{n} {p:.0%}' for n, p in r['top3']) or '(no tuned head)'}")
    for figure in dict.fromkeys(r["figure"] for r in records):
        print(f"side by side: {out / figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
